"""Training throughput of the planned objective against plain causal-LM training
of the same backbone on the same data, in one run, with peak memory.

    python benchmarks/bench_training.py [--steps 60] [--batch_size 8] [--threads 2]
    python benchmarks/bench_training.py --kernels   # attention alone: mask vs causal vs none

Both arms use the tiny backbone of configs/tiny.yaml and the bundled set: the
planned arm on the planned layout (hybrid mask, noise, both loss terms), the
causal arm on the tag-stripped answers with the backbone's own causal attention
(no 4D mask, the fastest path it has). Both arms train on the same examples in
the same batches; throughput counts their *answer* tokens (prompt + plain
answer) per second, so the planned arm is not credited for its plan, tags and
pads (``processed`` tokens/s, which does credit them, is printed too).

The arms take turns, one step each (which goes first alternates), so a spell of
a slower machine (another process, a throttled core) slows both alike and the
ratio stays a ratio from one run. Peak memory is the process's peak RSS after
each arm's untimed warm-up on the longest batches (causal first), the steps
whose activations are the largest. The batch size defaults to the tiny recipe's
(``data.batch_size`` of configs/tiny.yaml).
Prints a table and one JSON line last.
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
    datasets = {mode: dm.dataset("train", mode) for mode in ("autoregressive", "planned")}
    plain = datasets["autoregressive"]
    lengths = datasets["planned"].lengths()
    plain_lengths = plain.lengths()
    index_batches = list(LengthGroupedSampler(lengths, a.batch_size, seed=0, epoch=0))[: a.steps]
    arms = {}
    for name, mode in (("causal", "autoregressive"), ("planned", "planned")):
        collate = dm.collate_fn(mode)
        batches = []
        for idx in index_batches:  # the same examples in both arms
            batch = collate([datasets[mode][i] for i in idx])
            batch.answer_tokens = sum(plain_lengths[i] for i in idx)
            batches.append(batch)
        torch.manual_seed(0)
        module = PlannedDiffusionModule(tokenizer=dm.tokenizer, spec=dm.spec, backbone=BackboneConfig(config=cfg))
        arms[name] = Arm(module, batches, causal_fast_path=(name == "causal"))
    results = run_arms(arms, a.steps)
    ratio = results["planned"]["tokens_per_s"] / results["causal"]["tokens_per_s"]
    print(f"{'arm':<10}{'step (s)':>10}{'answer tok/s':>14}{'processed tok/s':>17}{'peak RSS (MB)':>15}")
    for name in ("causal", "planned"):
        r = results[name]
        print(f"{name:<10}{r['step_s']:>10.3f}{r['tokens_per_s']:>14.0f}{r['processed_tokens_per_s']:>17.0f}"
              f"{r['peak_rss_mb']:>15.0f}")
    print(json.dumps({"bench": "training", "batch_size": a.batch_size, "threads": a.threads,
                      "causal_tokens_per_s": results["causal"]["tokens_per_s"],
                      "planned_tokens_per_s": results["planned"]["tokens_per_s"],
                      "ratio": ratio,
                      "processed_ratio": results["planned"]["processed_tokens_per_s"]
                      / results["causal"]["processed_tokens_per_s"],
                      "peak_rss_mb_causal": results["causal"]["peak_rss_mb"],
                      "peak_rss_mb_planned": results["planned"]["peak_rss_mb"], "goal": ">= 0.8"}))


if __name__ == "__main__":
    main()
