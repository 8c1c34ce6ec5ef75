"""Where a decoder's time goes: the backbone's forward passes against the
decoder's own work and, for planned diffusion, planning against denoising.

    python benchmarks/time_split.py [--models runs/quickstart/models] [--limit 30]

Uses the models `pdlightning demo` trained (the AR baseline and the planned
model). Decodes the test prompts at batch 1 with AR and with PD at step ratios
1, 0.5 and 0.25 and with planned_ar (spans by next-token prediction), timing every backbone call and PD's two phases (the plan's
autoregressive passes, then the round's denoising passes). Prints a table and
one JSON line last. Seconds are per response; shares are of the decode time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pdlightning.decoding import LanguageModel, get_strategy
from pdlightning.eval.bench import BenchConfig, load_prompts
from pdlightning.eval.machine import machine_info

ROWS = [  # name, model directory, decoder, args
    ("AR", "autoregressive", "autoregressive", {"max_new_tokens": 400}),
    ("PD", "planned", "planned", {"max_new_tokens": 600}),
    ("PD r=0.5", "planned", "planned", {"max_new_tokens": 600, "step_ratio": 0.5}),
    ("PD r=0.25", "planned", "planned", {"max_new_tokens": 600, "step_ratio": 0.25}),
    ("planned_ar", "planned", "planned_ar", {"max_new_tokens": 600}),
]


class Clock:
    """Seconds spent in the functions it wraps, and the backbone passes made inside each, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.passes: dict[str, int] = {}
        self.backbone_calls = 0

    def wrap(self, name: str, fn: Callable[..., Any], backbone: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, calls0 = time.perf_counter(), self.backbone_calls
            self.backbone_calls += backbone
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.passes[name] = self.passes.get(name, 0) + self.backbone_calls - calls0

        return timed


def split(lm: LanguageModel, decoder: str, args: dict, prompts: list[str]) -> dict[str, float]:
    """Seconds and passes per response: all, in the backbone, and in each of PD's phases."""
    strategy = get_strategy(decoder, **args)
    strategy.generate(lm, prompts[:2])  # warm-up, not timed
    clock = Clock()
    # instance attributes shadow the class's methods; nn.Module.__call__ looks forward up on the instance
    lm.backbone.forward = clock.wrap("backbone", lm.backbone.forward, backbone=True)
    phases = {"_plan_round": "plan", "_denoise_round": "denoise"}
    for method, label in phases.items():
        if hasattr(strategy, method):
            setattr(strategy, method, clock.wrap(label, getattr(strategy, method)))
    try:
        t0 = time.perf_counter()
        strategy.generate(lm, prompts)
        total = time.perf_counter() - t0
    finally:
        del lm.backbone.forward
    n = len(prompts)
    out = {"seconds": total / n, "backbone_s": clock.seconds["backbone"] / n, "passes": clock.passes["backbone"] / n}
    out["decoder_s"] = out["seconds"] - out["backbone_s"]
    for label in phases.values():
        if label in clock.seconds:
            out[f"{label}_s"] = clock.seconds[label] / n
            out[f"{label}_passes"] = clock.passes[label] / n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="runs/quickstart/models")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    prompts = [r["prompt"] for r in load_prompts(BenchConfig(limit=a.limit))]
    paths = {name: Path(a.models) / name / "hf" for _, name, _, _ in ROWS}
    missing = [str(p) for p in paths.values() if not (p / "model.safetensors").exists()]
    if missing:
        raise SystemExit(f"no model at {', '.join(missing)}: run `pdlightning demo` first")
    lms = {model: LanguageModel.from_pretrained(path) for model, path in paths.items()}
    out = {name: split(lms[model], decoder, args, prompts) for name, model, decoder, args in ROWS}
    print(f"{'decoder':<12}{'s/resp':>8}{'backbone':>10}{'decoder':>9}{'passes':>8}"
          f"{'plan s':>8}{'plan passes':>13}{'denoise s':>11}{'denoise passes':>16}")
    for name, r in out.items():
        phases = (f"{r['plan_s']:>8.3f}{r['plan_passes']:>13.1f}{r['denoise_s']:>11.3f}"
                  f"{r['denoise_passes']:>16.1f}" if "plan_s" in r else "")
        print(f"{name:<12}{r['seconds']:>8.3f}{r['backbone_s'] / r['seconds']:>9.0%}"
              f"{r['decoder_s'] / r['seconds']:>9.0%}{r['passes']:>8.1f}{phases}")
    print(json.dumps({"bench": "time_split", "limit": a.limit, "results": out,
                      "machine": machine_info(a.threads)}))


if __name__ == "__main__":
    main()
