"""``pdlightning demo``: the quick start. Trains the tiny planned-diffusion model
and its AR baseline on the bundled set (reused when already trained), decodes
the test prompts with AR and PD, and prints the comparison table.
"""

from __future__ import annotations

from pdlightning.eval.bench import config_from_args, run

CONFIG = "configs/bench/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    summary = run(config_from_args("pdlightning demo", __doc__, CONFIG, argv))
    pd, ar = summary["results"]["PD"], summary["results"]["AR"]
    print(
        f"PD runs at {pd['speedup_vs_ar']:.2f}x AR's speed with {pd['critical_path_vs_ar']:.2f}x its critical path "
        f"and {100 * pd['fact_accuracy_minus_ar']:+.1f} points of fact accuracy "
        f"({100 * pd['fact_accuracy']:.1f}% vs {100 * ar['fact_accuracy']:.1f}%)."
    )
    return 0
