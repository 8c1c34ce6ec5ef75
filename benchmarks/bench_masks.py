"""Mask construction for a batch of 8 x 1024 tokens, as a fraction of one
forward + backward pass of the tiny backbone on the same batch.

    python benchmarks/bench_masks.py [--threads 2] [--repeats 5]

Prints a table and one JSON line last (goal: ratio < 0.05).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from pdlightning.eval.machine import machine_info
from pdlightning.masks import batch_attention_mask
from pdlightning.model.backbone import TINY_QWEN2, build_backbone
from pdlightning.tags import CONTROL_NAMES, TagSpec

SPEC = TagSpec().with_ids({n: i for i, n in enumerate(CONTROL_NAMES)})
PO, PC, SO, SC, SY, END, PAD, MASK = range(8)
VOCAB = 2048


def planned_row(rng: random.Random, length: int) -> list[int]:
    """A prompt, then rounds of plan entries and spans with pads, until ``length``."""
    ids = [rng.randrange(8, VOCAB) for _ in range(rng.randint(40, 120))]
    while len(ids) < length - 60:
        n = rng.randint(2, 6)
        ids += [x for _ in range(n) for x in (PO, rng.randrange(8, VOCAB), rng.randrange(8, VOCAB), PC)]
        for _ in range(n):
            ids += [SO, *[rng.randrange(8, VOCAB) for _ in range(rng.randint(5, 40))], *[PAD] * rng.randint(0, 10), SC]
        ids.append(SY)
    return (ids + [END] * length)[:length]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    ids = torch.tensor([planned_row(rng, 1024) for _ in range(8)])
    lengths = torch.full((8,), 1024)
    model = build_backbone(config=TINY_QWEN2, vocab_size=VOCAB)
    mask = batch_attention_mask(ids, SPEC, lengths)

    def fwd_bwd() -> None:
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().mean().backward()
        model.zero_grad(set_to_none=True)

    mask_ms = median_ms(lambda: batch_attention_mask(ids, SPEC, lengths), a.repeats)
    step_ms = median_ms(fwd_bwd, max(2, a.repeats // 2))
    print(f"{'mask (ms)':>10}{'fwd+bwd (ms)':>14}{'ratio':>8}")
    print(f"{mask_ms:>10.1f}{step_ms:>14.1f}{mask_ms / step_ms:>8.3f}")
    print(json.dumps({"bench": "masks", "batch": 8, "seq_len": 1024, "threads": a.threads, "mask_ms": mask_ms,
                      "fwd_bwd_ms": step_ms, "ratio": mask_ms / step_ms, "goal": "< 0.05",
                      "machine": machine_info(a.threads)}))


if __name__ == "__main__":
    main()
