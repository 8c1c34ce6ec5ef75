"""``pdlightning demo``: the quick start. Trains the tiny planned-diffusion model
and its AR baseline on the bundled set (reused when already trained), decodes
the test prompts with AR and PD, and prints the comparison table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pdlightning.eval.bench import BenchConfig, run

CONFIG = "configs/bench/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdlightning demo", description=__doc__)
    p.add_argument("--config", default=CONFIG, help="bench YAML of the demo")
    p.add_argument("--out_dir", help="override out_dir")
    p.add_argument("--limit", type=int, help="number of test prompts")
    a = p.parse_args(argv)
    if not Path(a.config).exists():
        raise SystemExit(f"pdlightning demo: {a.config} not found; run it from the repository root")
    cfg = BenchConfig.from_yaml(a.config)
    cfg.out_dir = a.out_dir or cfg.out_dir
    cfg.limit = a.limit or cfg.limit
    summary = run(cfg)
    pd, ar = summary["results"]["PD"], summary["results"]["AR"]
    print(
        f"PD runs at {pd['speedup_vs_ar']:.2f}x AR's speed with {pd['critical_path_vs_ar']:.2f}x its critical path "
        f"and {100 * pd['fact_accuracy_minus_ar']:+.1f} points of fact accuracy "
        f"({100 * pd['fact_accuracy']:.1f}% vs {100 * ar['fact_accuracy']:.1f}%)."
    )
    return 0
