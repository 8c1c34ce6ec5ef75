"""``pdlightning replicates``: bench runs that differ only in seed, summarised row by row.

At the tiny scale one training moves fact accuracy by 10 points or more from
another that differs only in its seed, so compare replicates
(``pdlightning demo --seed N`` or ``pdlightning bench --seed N``), not single
runs. This reads each run's ``results.json`` and prints, per decoder row, the
mean, standard deviation and range of its facts and of its ratios against the
baseline measured in the same run (so the facts difference is paired)::

    pdlightning replicates runs/quickstart runs/quickstart-seed1 runs/quickstart-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

#: Config keys that may differ between replicates; any other difference is refused.
FREE_KEYS = ("seed", "out_dir", "threads", "warmup", "cache_dir")

#: (results.json key, column head, scale, format) of each summarised measure.
MEASURES: tuple[tuple[str, str, float, str], ...] = (
    ("fact_accuracy", "facts (%)", 100.0, ".1f"),
    ("fact_accuracy_minus_ar", "Δ facts vs baseline (points)", 100.0, "+.1f"),
    ("speedup_vs_ar", "speed-up", 1.0, ".2f"),
    ("critical_path_vs_ar", "critical path ratio", 1.0, ".2f"),
)


def load_runs(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Each directory's ``results.json``; refused unless the runs are replicates of one config.

    Raises:
        ValueError: Fewer than two runs, a missing file, configs that differ in
            a key outside :data:`FREE_KEYS`, or different decoder rows.
    """
    if len(dirs) < 2:
        raise ValueError(f"give at least two run directories to compare, got {len(dirs)}")
    runs = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise ValueError(f"{path} not found: run `pdlightning bench` (or `demo`) with --out_dir {d} first")
        runs.append({"path": str(path), **json.loads(path.read_text())})
    first = runs[0]
    for run in runs[1:]:
        for key in sorted(set(first["config"]) | set(run["config"])):
            a, b = first["config"].get(key), run["config"].get(key)
            if key not in FREE_KEYS and a != b:
                raise ValueError(f"{first['path']} and {run['path']} differ in {key!r} "
                                 f"({_short(a)} vs {_short(b)}): not replicates of one config")
        if list(run["results"]) != list(first["results"]):
            raise ValueError(f"{first['path']} and {run['path']} have different decoder rows")
    return runs


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{row: {measure: {mean, sd, min, max}}}`` over the runs (sd: sample standard deviation)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in runs[0]["results"]:
        out[row] = {}
        for key, _, scale, _ in MEASURES:
            values = [scale * run["results"][row][key] for run in runs]
            out[row][key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values),
                             "min": min(values), "max": max(values)}
    return out


def markdown(summary: dict[str, dict[str, dict[str, float]]], n_runs: int, baseline: str) -> str:
    """One row per decoder: ``mean ± sd (min to max)`` of every measure."""
    heads = [head.replace("baseline", baseline) for _, head, _, _ in MEASURES]
    lines = [f"| decoder ({n_runs} replicates) | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 1)]
    for row, measures in summary.items():
        cells = []
        for key, _, _, fmt in MEASURES:
            m = measures[key]
            cells.append(f"{m['mean']:{fmt}} ± {m['sd']:{fmt.lstrip('+')}} ({m['min']:{fmt}} to {m['max']:{fmt}})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdlightning replicates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="bench output directories (each with a results.json)")
    p.add_argument("--json", help="also write the summary here")
    a = p.parse_args(argv)
    try:
        runs = load_runs(a.dirs)
    except ValueError as e:
        p.error(str(e))
    summary = summarise(runs)
    print(markdown(summary, len(runs), runs[0]["config"]["baseline"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": [r["path"] for r in runs], "rows": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
