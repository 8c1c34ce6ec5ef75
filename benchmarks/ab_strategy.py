"""A decoding strategy's module at a git ref against the working tree's, interleaved in one process.

    python benchmarks/ab_strategy.py --ref 29c5878 [--module pdlightning/decoding/planned.py]
        [--strategy planned] [--model runs/quickstart/models/planned/hf] [--limit 40]
        [--step_ratios 1 0.5 0.25] [--old_args JSON] [--new_args JSON]

The module's source at ``--ref`` (``git show``) is loaded under another name,
its strategies registered with an ``_old`` suffix, so both versions decode with
one model in one process. Each prompt is decoded by both, the order alternating
prompt by prompt, so a slow spell of the machine lands on both. Prints, per
step ratio, the seconds per response of each and their ratio, and whether every
response's tokens are identical. Only the one module differs: the rest of the
package is the working tree's. The strategy must take ``step_ratio`` (planned,
dense_planned) for ``--step_ratios``; one without it (planned_ar) decodes once, at its defaults:

    python benchmarks/ab_strategy.py --ref HEAD --module pdlightning/decoding/planned_ar.py --strategy planned_ar

Without ``--ref`` both arms are the working tree's strategy and ``--old_args`` /
``--new_args`` (JSON objects of its arguments) set them apart: a knob against its default.

    python benchmarks/ab_strategy.py --strategy planned_ar --old_args '{"draft_plan_lengths": false}'
    python benchmarks/ab_strategy.py --strategy planned --new_args '{"parallel_threshold": 0.9}'

Each arm's mean critical path (forward passes on the response's path) is printed beside its seconds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
import time
import types

import torch

from pdlightning.decoding import LanguageModel, get_strategy
from pdlightning.decoding.base import strategy_class
from pdlightning.eval.bench import BenchConfig, load_prompts
from pdlightning.eval.machine import machine_info


def load_old(ref: str, module: str) -> None:
    """Execute ``module`` as it was at ``ref``, its ``@register("x")`` names becoming ``x_old``."""
    src = subprocess.run(["git", "show", f"{ref}:{module}"], capture_output=True, text=True, check=True).stdout
    src = re.sub(r'@register\("([^"]+)"\)', r'@register("\1_old")', src)
    mod = types.ModuleType(f"{module}@{ref}")
    sys.modules[mod.__name__] = mod  # dataclasses look their class's module up there
    exec(compile(src, f"{module}@{ref}", "exec"), mod.__dict__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ref", help="git ref of the old version (default: the working tree's, with --old_args)")
    p.add_argument("--old_args", type=json.loads, default={}, help="JSON object of the old arm's extra arguments")
    p.add_argument("--new_args", type=json.loads, default={}, help="JSON object of the new arm's extra arguments")
    p.add_argument("--module", default="pdlightning/decoding/planned.py")
    p.add_argument("--strategy", default="planned")
    p.add_argument("--model", default="runs/quickstart/models/planned/hf")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--step_ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--max_new_tokens", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.ref is None and not (a.old_args or a.new_args):
        p.error("give --ref (a git ref of the old version) or --old_args / --new_args (the arms' arguments)")
    for name in ("old_args", "new_args"):
        if not isinstance(getattr(a, name), dict):
            p.error(f"--{name} must be a JSON object, got {getattr(a, name)!r}")
    torch.set_num_threads(a.threads)
    if a.ref is not None:
        load_old(a.ref, a.module)
    prompts = [r["prompt"] for r in load_prompts(BenchConfig(limit=a.limit))]
    lm = LanguageModel.from_pretrained(a.model)
    out = {}
    ratios = a.step_ratios if "step_ratio" in inspect.signature(strategy_class(a.strategy)).parameters else [None]
    for r in ratios:
        knobs = {"max_new_tokens": a.max_new_tokens} | ({} if r is None else {"step_ratio": r})
        old_name = a.strategy + ("" if a.ref is None else "_old")
        arms = {"old": get_strategy(old_name, **knobs, **a.old_args),
                "new": get_strategy(a.strategy, **knobs, **a.new_args)}
        for s in arms.values():
            s.generate(lm, prompts[:2])  # warm-up, not timed
        seconds, passes, identical = {"old": 0.0, "new": 0.0}, {"old": 0, "new": 0}, True
        for i, prompt in enumerate(prompts):
            tokens = {}
            for v in ("old", "new") if i % 2 == 0 else ("new", "old"):
                t0 = time.perf_counter()
                (g,) = arms[v].generate(lm, [prompt])
                seconds[v] += time.perf_counter() - t0
                tokens[v], passes[v] = g.token_ids, passes[v] + g.critical_path
            identical &= tokens["old"] == tokens["new"]
        n = len(prompts)
        out[r] = {"old_s": seconds["old"] / n, "new_s": seconds["new"] / n,
                  "speedup": seconds["old"] / seconds["new"], "identical": identical,
                  "old_critical_path": passes["old"] / n, "new_critical_path": passes["new"] / n}
        label = "defaults" if r is None else f"r = {r}"
        print(f"{label}: old {out[r]['old_s']:.3f} s, new {out[r]['new_s']:.3f} s per response, "
              f"new {out[r]['speedup']:.2f}x as fast; critical path {out[r]['old_critical_path']:.1f} -> "
              f"{out[r]['new_critical_path']:.1f}; tokens identical: {identical}", flush=True)
    print(json.dumps({"bench": "ab_strategy", "ref": a.ref, "old_args": a.old_args, "new_args": a.new_args,
                      "module": a.module, "limit": a.limit, "results": out,
                      "machine": machine_info(a.threads)}))


if __name__ == "__main__":
    main()
