"""``pdlightning replicates``: bench runs that differ only in seed, summarised row by row.

At the tiny scale one training moves fact accuracy by 10 points or more from
another that differs only in its seed, so compare replicates
(``pdlightning demo --seed N`` or ``pdlightning bench --seed N``), not single
runs. This reads each run's ``results.json`` and prints, per decoder row, the
mean, standard deviation and range of its facts and of its ratios against the
baseline measured in the same run (so the facts difference is paired)::

    pdlightning replicates runs/quickstart runs/quickstart-seed1 runs/quickstart-seed2

A second table does the same per task family (``facts_by_family`` of the bundled
set): the baseline's facts, and every other row's paired difference in points.
Runs from different kinds of CPU are named, one line each: speed-ups differ
between kinds, and so, on a CPU, do the models one seed trains.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from pdlightning.eval.machine import describe
from pdlightning.jsonio import read_json

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
        ValueError: Fewer than two runs, one directory given twice, a missing or
            malformed file (named), two runs with the same seed, configs that differ
            in a key outside :data:`FREE_KEYS`, or different decoder rows.
    """
    if len(dirs) < 2:
        raise ValueError(f"give at least two run directories to compare, got {len(dirs)}")
    seen: dict[Path, str | Path] = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen:
            raise ValueError(f"{d} is given twice (as {seen[key]} too): each replicate counts once")
        seen[key] = d
    runs = [_read_run(d) for d in dirs]
    seeds: dict[Any, str] = {}
    for run in runs:
        seed = run["config"].get("seed")
        if seed in seeds:
            raise ValueError(f"{seeds[seed]} and {run['path']} are runs with the same seed ({seed!r}): "
                             "replicates differ in their seed")
        seeds[seed] = run["path"]
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


def _read_run(d: str | Path) -> dict[str, Any]:
    """``results.json`` of one run directory, checked (``config`` and per-row numeric measures)."""
    path = Path(d) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: run `pdlightning bench` (or `demo`) with --out_dir {d} first")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'config' and 'results', got {type(data).__name__}")
    for key in ("config", "results"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: no {key!r} object: not a results.json written by `pdlightning bench`")
    if "baseline" not in data["config"]:
        raise ValueError(f"{path}: its 'config' has no 'baseline'")
    for row, measures in data["results"].items():
        for key, *_ in MEASURES:
            value = measures.get(key) if isinstance(measures, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{path}: row {row!r} has no number for {key!r} (got {_short(value)})")
    return {**data, "path": str(path)}


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


def summarise_families(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{family: {"keys": n, row: {mean, sd}}}`` over the runs, for the families every
    run's baseline row scored: the baseline's facts (%) and every other row's difference
    from its own run's baseline (points); ``keys`` is summed over the runs. A row is
    left out of a family when some run has no figure for it; ``{}`` when a run's
    baseline has no ``facts_by_family`` (a bench before it, or prompts without families).
    """
    baseline = runs[0]["config"]["baseline"]
    bases = [run["results"][baseline].get("facts_by_family") for run in runs]
    if not all(isinstance(b, dict) and b for b in bases):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for family in sorted(set.intersection(*(set(b) for b in bases))):
        entry: dict[str, Any] = {"keys": sum(b[family]["keys"] for b in bases)}
        for row in runs[0]["results"]:
            values = []
            for run, base in zip(runs, bases, strict=True):
                got = (run["results"][row].get("facts_by_family") or {}).get(family)
                if got is not None:
                    values.append(100.0 * (got["facts"] - (0.0 if row == baseline else base[family]["facts"])))
            if len(values) == len(runs):
                entry[row] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values)}
        out[family] = entry
    return out


def markdown_families(families: dict[str, dict[str, Any]], rows: list[str], baseline: str) -> str:
    """A row per family (the most keys first): ``mean ± sd`` of the baseline's facts and of
    every other row's difference in points; "–" where a row has no figure."""
    if not families:
        return ""
    names = [baseline, *(r for r in rows if r != baseline)]
    lines = ["| family | keys | " + " | ".join([f"{baseline} facts (%)", *(f"{n} Δ" for n in names[1:])]) + " |",
             "|" + "---|" * (len(names) + 2)]
    for family, entry in sorted(families.items(), key=lambda kv: (-kv[1]["keys"], kv[0])):
        cells = []
        for i, name in enumerate(names):
            m = entry.get(name)
            fmt = ".1f" if i == 0 else "+.1f"
            cells.append("–" if m is None else f"{m['mean']:{fmt}} ± {m['sd']:.1f}")
        lines.append(f"| {family} | {entry['keys']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    if a.json and Path(a.json).is_dir():
        p.error(f"--json {a.json} is a directory: give a file name")
    try:
        runs = load_runs(a.dirs)
    except ValueError as e:
        p.error(str(e))
    summary = summarise(runs)
    families = summarise_families(runs)
    machines = {r["path"]: describe(r.get("machine")) for r in runs}
    if a.json:  # written before the table is printed: a failure shows no table as if all went well
        target = Path(a.json)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps({"runs": [r["path"] for r in runs], "rows": summary, "families": families,
                                          "machines": machines}, indent=2))
        except OSError as e:
            p.exit(1, f"{p.prog}: error: cannot write --json {target}: {e.strerror or e}\n")
    baseline = runs[0]["config"]["baseline"]
    print(markdown(summary, len(runs), baseline))
    if families:
        print(f"\nFacts per task family over the {len(runs)} replicates: {baseline}'s, and each row's difference (points)\n")
        print(markdown_families(families, list(summary), baseline))
    kinds = set(machines.values())
    if len(kinds) > 1:
        print(f"\nThese runs come from {len(kinds)} kinds of machine; their speed-ups, and the models "
              "one seed trains, differ between kinds:")
        for path, machine in machines.items():
            print(f"- {path}: {machine}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
