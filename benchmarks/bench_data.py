"""Rows per second of preparing the bundled set: first run against cached run.

    python benchmarks/bench_data.py [--train 6000]

The first run generates the set, trains the tokenizer and tokenises every row
into a fresh cache directory; the cached run builds a new data module on the
same cache (generated files, tokenizer and the ``datasets`` map cache are
reused). Prints a table and one JSON line last (goal: cached >= 10x faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from pdlightning.data.datamodule import PlannedDataModule
from pdlightning.eval.machine import machine_info


def prepare(cache_dir: str, sizes: dict[str, int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    dm = PlannedDataModule(cache_dir=cache_dir, bundled_sizes=sizes)
    dm.setup()
    rows = sum(len(s) for s in dm.splits.values())
    return time.perf_counter() - t0, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", type=int, default=6000)
    a = p.parse_args()
    sizes = {"train": a.train, "validation": 200, "test": 200}
    with tempfile.TemporaryDirectory() as cache:
        first, rows = prepare(cache, sizes)
        cached, _ = prepare(cache, sizes)
    print(f"{'run':<8}{'seconds':>10}{'rows/s':>12}")
    print(f"{'first':<8}{first:>10.2f}{rows / first:>12.0f}")
    print(f"{'cached':<8}{cached:>10.2f}{rows / cached:>12.0f}")
    print(json.dumps({"bench": "data", "rows": rows, "first_rows_per_s": rows / first,
                      "cached_rows_per_s": rows / cached, "speedup": first / cached, "goal": ">= 10",
                      "machine": machine_info(torch.get_num_threads())}))


if __name__ == "__main__":
    main()
