"""``pdlightning demo``: the quick start. Trains the tiny planned-diffusion model
and its AR baseline on the bundled set (reused when already trained), decodes
the test prompts with AR, PD and planned_ar, and prints the comparison table.
"""

from __future__ import annotations

from pdlightning.eval.bench import config_from_args, run

CONFIG = "configs/bench/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args("pdlightning demo", __doc__, CONFIG, argv)
    summary = run(cfg)
    rows, ar = summary["results"], summary["results"]["AR"]
    print(_sentence("PD", rows["PD"], ar))
    if "planned_ar" in rows:  # the same model, its spans written by next-token prediction
        print(_sentence("With its spans written left to right by next-token prediction (planned_ar), PD",
                        rows["planned_ar"], ar))
    if "planned" in cfg.models:  # the quick start's models (another --config may name its own)
        print(next_steps(cfg.out_dir, cfg.seed))
    return 0


def _sentence(label: str, row: dict, ar: dict) -> str:
    """How a row compares with AR's, in one sentence."""
    return (
        f"{label} runs at {row['speedup_vs_ar']:.2f}x AR's speed with {row['critical_path_vs_ar']:.2f}x its "
        f"critical path and {100 * row['fact_accuracy_minus_ar']:+.1f} points of fact accuracy "
        f"({100 * row['fact_accuracy']:.1f}% vs {100 * ar['fact_accuracy']:.1f}%{_interval(row)})"
        + (f"; chrF against the reference answers {100 * row['chrf']:.1f} vs {100 * ar['chrf']:.1f}."
           if row.get("chrf") is not None and ar.get("chrf") is not None else ".")
    )


def _interval(pd: dict) -> str:
    """The 95% interval of PD's Δ facts over the prompts, for the closing sentence."""
    ci = pd.get("fact_accuracy_minus_ar_ci")
    return "" if ci is None else f"; 95% interval over the prompts {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"


def next_steps(out_dir: str, seed: int = 0) -> str:
    """What to run after the quick start (in the venv), for the models trained under ``out_dir`` with ``seed``."""
    # pd_knobs.yaml has the quick start's out_dir and seed 0; --seed N alone moves it to <out_dir>-seedN
    knobs = f" --seed {seed}" if seed else ""
    if out_dir != "runs/quickstart" + (f"-seed{seed}" if seed else ""):
        knobs += f" --out_dir {out_dir}"
    return (
        "\nNext (after `source .venv/bin/activate`):\n"
        f"  pdlightning generate --checkpoint {out_dir}/models/planned/hf --decoder planned --show-plan \\\n"
        '      --prompt "Describe this person in a few sentences.\nName: Ann Lee\nAge: 31\nCity: Paris"\n'
        f"  pdlightning bench --config configs/bench/pd_knobs.yaml{knobs}   # PD's r, tau and order (~8 min)\n"
        "  pdlightning bench --config configs/bench/tiny.yaml       # every decoder and ablation (~1 hour)"
    )
