"""Training throughput of the planned objective against plain causal-LM training
of the same backbone on the same data, in one run, with peak memory.

    python benchmarks/bench_training.py [--steps 60] [--batch_size 8] [--threads 2]
    python benchmarks/bench_training.py --kernels   # attention alone: mask vs causal vs none

Every arm uses the tiny backbone of configs/tiny.yaml and the bundled set: the
planned arm on the planned layout (hybrid mask, noise, both loss terms: the
paper's objective), the recipe arm on the same layout with the share of
``planned_ar`` rows (spans by next-token prediction) that configs/tiny.yaml's
planned stage trains (``ar_fraction``), and the causal arm on the tag-stripped
answers with the backbone's own causal attention (no 4D mask, the fastest path
it has). The arms train on the same examples in the same batches; throughput
counts their *answer* tokens (prompt + plain answer) per second, so the planned
arms are not credited for their plan, tags and pads (``processed`` tokens/s,
which does credit them, is printed too).

The arms take turns, one step each (their order alternates), so a spell of
a slower machine (another process, a throttled core) slows every arm alike and the
ratios stay ratios from one run. Peak memory is the process's peak RSS after
each arm's untimed warm-up on the longest batches (causal first), the steps
whose activations are the largest. The batch size defaults to the tiny recipe's
(``data.batch_size`` of configs/tiny.yaml).
Prints a table, then one JSON line with the ratios and the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import yaml

from pdlightning.data.datamodule import LengthGroupedSampler, PlannedDataModule, Stage
from pdlightning.eval.machine import describe, machine_info
from pdlightning.model.module import BackboneConfig, PlannedDiffusionModule


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Arm:
    """One arm of the comparison: its own module, optimiser and batches."""

    def __init__(self, module: PlannedDiffusionModule, batches: list, causal_fast_path: bool) -> None:
        self.module, self.batches, self.causal_fast_path = module, batches, causal_fast_path
        self.opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.processed: list[int] = []

    def step(self, batch) -> float:
        t0 = time.perf_counter()
        if self.causal_fast_path:
            logits = self.module.backbone(input_ids=batch.input_ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.ar_labels.flatten(), ignore_index=-100)
        else:
            loss = self.module.loss_terms(batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - t0

    def timed_step(self, k: int) -> None:
        batch = self.batches[k]
        self.times.append(self.step(batch))
        self.tokens.append(batch.answer_tokens)
        self.processed.append(int(batch.lengths.sum()))

    def summary(self) -> dict:
        return {"step_s": statistics.median(self.times), "tokens_per_s": sum(self.tokens) / sum(self.times),
                "processed_tokens_per_s": sum(self.processed) / sum(self.times)}


def run_arms(arms: dict[str, Arm], steps: int, warmup: int = 2) -> dict:
    """Warm each arm up on its longest batches (untimed; peak RSS after each), then
    time ``steps`` steps per arm, the arms taking turns."""
    results: dict = {}
    for name, arm in arms.items():
        longest = sorted(range(len(arm.batches)), key=lambda k: -int(arm.batches[k].lengths.sum()))[:warmup]
        for k in longest:
            arm.step(arm.batches[k])
        results[name] = {"peak_rss_mb": peak_rss_mb()}
    order = list(arms)
    for k in range(steps):
        for name in order if k % 2 == 0 else order[::-1]:
            arms[name].timed_step(k)
    for name, arm in arms.items():
        results[name].update(arm.summary())
    return results


def arm_batches(dm: PlannedDataModule, steps: int, batch_size: int, ar_fraction: float) -> dict[str, list]:
    """Each arm's batches, the same examples in the same batches in every arm: ``causal``
    (tag-stripped answers), ``planned`` (the planned layout, every row noised) and ``recipe``
    (the planned layout with ``ar_fraction`` of the rows ``planned_ar``). Each batch also
    carries ``answer_tokens``, its examples' prompt + plain answer lengths."""
    datasets = {
        "causal": dm.dataset("train", "autoregressive"),
        "planned": dm.dataset("train", "planned"),
        "recipe": dm.dataset("train", "planned", ar_fraction=ar_fraction),
    }
    plain_lengths = datasets["causal"].lengths()
    index_batches = list(LengthGroupedSampler(datasets["planned"].lengths(), batch_size, seed=0, epoch=0))[:steps]
    out = {}
    for name, ds in datasets.items():
        collate = dm.collate_fn("autoregressive" if name == "causal" else "planned")
        out[name] = []
        for idx in index_batches:
            batch = collate([ds[i] for i in idx])
            batch.answer_tokens = sum(plain_lengths[i] for i in idx)
            out[name].append(batch)
    return out


def time_attention_kernels(batch: int, length: int, heads: int = 4, head_dim: int = 32, reps: int = 10) -> dict:
    """Seconds of one forward and backward of ``scaled_dot_product_attention`` per mask kind.

    The hybrid mask is stood in for by a lower-triangular boolean mask (the same
    kernel path: any dense boolean mask); ``is_causal`` and no mask are the
    kernels the causal arm could use."""
    f = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(batch, heads, length, head_dim, requires_grad=True) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).contiguous()
    out = {}
    for name, kw in (("boolean mask", {"attn_mask": mask}), ("is_causal", {"is_causal": True}), ("no mask", {})):
        for _ in range(3):  # warm-up, not timed
            f(q, k, v, **kw).sum().backward()
        t0 = time.perf_counter()
        for _ in range(reps):
            f(q, k, v, **kw).sum().backward()
        out[name] = (time.perf_counter() - t0) / reps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60, help="timed steps per arm")
    p.add_argument("--batch_size", type=int, default=None, help="default: configs/tiny.yaml's data.batch_size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache_dir", default=".cache/pdlightning")
    p.add_argument("--kernels", action="store_true", help="time the attention kernels alone (rows of 270)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with open("configs/tiny.yaml") as f:
        recipe = yaml.safe_load(f)
    if a.batch_size is None:
        a.batch_size = recipe["data"]["batch_size"]
    if a.kernels:
        for name, sec in time_attention_kernels(a.batch_size, 270).items():
            print(f"{name:<14}{sec * 1e3:8.1f} ms per forward + backward")
        return
    torch.manual_seed(0)
    dm = PlannedDataModule(cache_dir=a.cache_dir, batch_size=a.batch_size, stages=[Stage("planned", None)])
    dm.setup()
    cfg = recipe["model"]["backbone"]["config"]
    ar_fraction = float(recipe["data"]["stages"][-1].get("ar_fraction", 0.0))  # the planned stage's
    arms = {}
    for name, batches in arm_batches(dm, a.steps, a.batch_size, ar_fraction).items():
        torch.manual_seed(0)
        module = PlannedDiffusionModule(tokenizer=dm.tokenizer, spec=dm.spec, backbone=BackboneConfig(config=cfg))
        arms[name] = Arm(module, batches, causal_fast_path=(name == "causal"))
    results = run_arms(arms, a.steps)
    causal = results["causal"]
    print(f"{'arm':<10}{'step (s)':>10}{'answer tok/s':>14}{'processed tok/s':>17}{'peak RSS (MB)':>15}{'vs causal':>11}")
    for name, r in results.items():
        print(f"{name:<10}{r['step_s']:>10.3f}{r['tokens_per_s']:>14.0f}{r['processed_tokens_per_s']:>17.0f}"
              f"{r['peak_rss_mb']:>15.0f}{r['tokens_per_s'] / causal['tokens_per_s']:>10.2f}x")
    machine = machine_info(a.threads)
    print(f"recipe: ar_fraction {ar_fraction} (configs/tiny.yaml's planned stage); machine: {describe(machine)}")

    def ratios(arm: str) -> dict:
        r = results[arm]
        return {"ratio": r["tokens_per_s"] / causal["tokens_per_s"],
                "processed_ratio": r["processed_tokens_per_s"] / causal["processed_tokens_per_s"]}

    print(json.dumps({"bench": "training", "batch_size": a.batch_size, "threads": a.threads,
                      "causal_tokens_per_s": causal["tokens_per_s"],
                      "planned_tokens_per_s": results["planned"]["tokens_per_s"],
                      **ratios("planned"),
                      "recipe_ar_fraction": ar_fraction,
                      "recipe_tokens_per_s": results["recipe"]["tokens_per_s"],
                      **{f"recipe_{k}": v for k, v in ratios("recipe").items()},
                      "peak_rss_mb_causal": causal["peak_rss_mb"],
                      "peak_rss_mb_planned": results["planned"]["peak_rss_mb"],
                      "peak_rss_mb_recipe": results["recipe"]["peak_rss_mb"],
                      "goal": ">= 0.8", "machine": machine}))


if __name__ == "__main__":
    main()
