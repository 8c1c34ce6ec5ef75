"""``pdlightning replicates``: mean, sd and range per decoder row over bench runs of one config."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pdlightning.eval.machine import cpu_name, describe
from pdlightning.eval.replicates import (
    load_runs,
    markdown,
    markdown_families,
    summarise,
    summarise_families,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"out_dir": "runs/q", "seed": 0, "threads": 2, "limit": 60, "baseline": "AR",
          "decoders": [{"name": "AR"}, {"name": "PD"}]}


def write_run(root: Path, name: str, facts: dict[str, float], speedup: float,
              families: dict[str, dict[str, tuple[float, int]]] | None = None,
              machine: dict | None = None, **config) -> Path:
    """A bench run's results.json; ``families``: per row, ``{family: (facts, keys)}``."""
    d = root / name
    d.mkdir()
    results = {row: {"fact_accuracy": f, "fact_accuracy_minus_ar": f - facts["AR"],
                     "speedup_vs_ar": 1.0 if row == "AR" else speedup,
                     "critical_path_vs_ar": 1.0 if row == "AR" else 0.5} for row, f in facts.items()}
    for row, table in (families or {}).items():
        results[row]["facts_by_family"] = {f: {"facts": v, "keys": k} for f, (v, k) in table.items()}
    data = {"config": {**CONFIG, "out_dir": str(d), **config}, "results": results}
    if machine is not None:
        data["machine"] = machine
    (d / "results.json").write_text(json.dumps(data))
    return d


def test_summary_of_three_replicates_by_hand(tmp_path: Path):
    dirs = [write_run(tmp_path, "a", {"AR": 0.40, "PD": 0.25}, 2.0, seed=0),
            write_run(tmp_path, "b", {"AR": 0.30, "PD": 0.25}, 1.5, seed=1, threads=1),
            write_run(tmp_path, "c", {"AR": 0.35, "PD": 0.22}, 1.0, seed=2)]
    summary = summarise(load_runs(dirs))
    pd = summary["PD"]
    assert pd["fact_accuracy"] == pytest.approx({"mean": 24.0, "sd": 3 ** 0.5, "min": 22.0, "max": 25.0})
    # paired: each run's PD minus that run's AR (-15, -5, -13)
    assert pd["fact_accuracy_minus_ar"] == pytest.approx({"mean": -11.0, "sd": 28 ** 0.5, "min": -15.0, "max": -5.0})
    assert pd["speedup_vs_ar"] == pytest.approx({"mean": 1.5, "sd": 0.5, "min": 1.0, "max": 2.0})
    assert summary["AR"]["fact_accuracy_minus_ar"] == pytest.approx({"mean": 0.0, "sd": 0.0, "min": 0.0, "max": 0.0})
    table = markdown(summary, 3, "AR").splitlines()
    assert table[0].startswith("| decoder (3 replicates) | facts (%) | Δ facts vs AR (points) |")
    assert table[3] == ("| PD | 24.0 ± 1.7 (22.0 to 25.0) | -11.0 ± 5.3 (-15.0 to -5.0) "
                        "| 1.50 ± 0.50 (1.00 to 2.00) | 0.50 ± 0.00 (0.50 to 0.50) |")


def test_runs_that_are_not_replicates_are_refused_by_name(tmp_path: Path):
    a = write_run(tmp_path, "a", {"AR": 0.4, "PD": 0.2}, 2.0)
    with pytest.raises(ValueError, match="at least two"):
        load_runs([a])
    with pytest.raises(ValueError, match="nope/results.json not found"):
        load_runs([a, tmp_path / "nope"])
    b = write_run(tmp_path, "b", {"AR": 0.4, "PD": 0.2}, 2.0, seed=1, limit=30)
    with pytest.raises(ValueError, match="differ in 'limit' \\(60 vs 30\\): not replicates"):
        load_runs([a, b])
    c = write_run(tmp_path, "c", {"AR": 0.4, "PD r=0.5": 0.2}, 2.0, seed=1)
    with pytest.raises(ValueError, match="different decoder rows"):
        load_runs([a, c])


def test_the_command_prints_the_table_and_writes_json(tmp_path: Path):
    dirs = [str(write_run(tmp_path, n, {"AR": 0.4, "PD": p}, 2.0, seed=s,
                          families={"AR": {"shop": (0.4, 10)}, "PD": {"shop": (p, 10)}}))
            for n, p, s in (("a", 0.2, 0), ("b", 0.3, 1))]
    out = subprocess.run([sys.executable, "-m", "pdlightning.cli", "replicates", *dirs, "--json",
                          str(tmp_path / "s.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| PD | 25.0 ± 7.1 (20.0 to 30.0) |" in out.stdout
    assert "| shop | 20 | 40.0 ± 0.0 | -15.0 ± 7.1 |" in out.stdout  # the table per family follows
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["rows"]["PD"]["fact_accuracy"]["max"] == pytest.approx(30.0)
    assert written["families"]["shop"]["PD"]["mean"] == pytest.approx(-15.0)
    bad = subprocess.run([sys.executable, "-m", "pdlightning.cli", "replicates", dirs[0]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least two run directories" in bad.stderr


def test_one_directory_twice_or_one_seed_twice_is_refused_by_name(tmp_path: Path):
    a = write_run(tmp_path, "a", {"AR": 0.4, "PD": 0.2}, 2.0, seed=0)
    with pytest.raises(ValueError, match=r"is given twice .*each replicate counts once"):
        load_runs([a, a])
    with pytest.raises(ValueError, match=r"is given twice"):
        load_runs([a, tmp_path / "x" / ".." / "a"])
    b = write_run(tmp_path, "b", {"AR": 0.3, "PD": 0.2}, 2.0, seed=0)
    with pytest.raises(ValueError, match=r"a/results.json and .*b/results.json are runs with the same seed \(0\)"):
        load_runs([a, b])


def test_a_malformed_results_json_is_refused_naming_the_file(tmp_path: Path):
    a = write_run(tmp_path, "a", {"AR": 0.4, "PD": 0.2}, 2.0, seed=0)
    b = write_run(tmp_path, "b", {"AR": 0.4, "PD": 0.3}, 2.0, seed=1)
    good = (b / "results.json").read_text()
    (b / "results.json").write_text(good[:40])
    with pytest.raises(ValueError, match=r"b/results.json: not valid JSON"):
        load_runs([a, b])
    (b / "results.json").write_text(json.dumps({"results": json.loads(good)["results"]}))
    with pytest.raises(ValueError, match=r"b/results.json: no 'config' object"):
        load_runs([a, b])
    data = json.loads(good)
    data["results"]["PD"]["speedup_vs_ar"] = None
    (b / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"b/results.json: row 'PD' has no number for 'speedup_vs_ar' \(got None\)"):
        load_runs([a, b])


def test_json_into_a_new_folder_is_written(tmp_path: Path, capsys):
    from pdlightning.eval.replicates import main

    dirs = [str(write_run(tmp_path, n, {"AR": 0.4, "PD": p}, 2.0, seed=s))
            for n, p, s in (("a", 0.2, 0), ("b", 0.3, 1))]
    target = tmp_path / "nodir" / "deeper" / "s.json"
    assert main([*dirs, "--json", str(target)]) == 0
    assert "| PD | 25.0 ± 7.1 (20.0 to 30.0) |" in capsys.readouterr().out
    assert json.loads(target.read_text())["runs"] == [str(Path(d) / "results.json") for d in dirs]
    with pytest.raises(SystemExit) as e:
        main([*dirs, "--json", str(tmp_path)])
    assert e.value.code == 2 and "is a directory" in capsys.readouterr().err


def test_facts_per_family_over_replicates_by_hand(tmp_path: Path):
    a = write_run(tmp_path, "a", {"AR": 0.4, "PD": 0.3}, 2.0, seed=0, families={
        "AR": {"shop": (0.5, 10), "profile": (0.4, 5)}, "PD": {"shop": (0.6, 10), "profile": (0.2, 5)}})
    b = write_run(tmp_path, "b", {"AR": 0.4, "PD": 0.3}, 2.0, seed=1, families={
        "AR": {"shop": (0.3, 12), "profile": (0.5, 4)}, "PD": {"shop": (0.4, 12)}})
    families = summarise_families(load_runs([a, b]))
    assert families["shop"]["keys"] == 22 and families["profile"]["keys"] == 9
    assert families["shop"]["AR"] == pytest.approx({"mean": 40.0, "sd": 200 ** 0.5})
    assert families["shop"]["PD"] == pytest.approx({"mean": 10.0, "sd": 0.0})  # paired: +10 in each run
    assert "PD" not in families["profile"]  # run b has no PD figure for it
    assert markdown_families(families, ["AR", "PD"], "AR").splitlines() == [
        "| family | keys | AR facts (%) | PD Δ |", "|---|---|---|---|",
        "| shop | 22 | 40.0 ± 14.1 | +10.0 ± 0.0 |", "| profile | 9 | 45.0 ± 7.1 | – |"]
    c = write_run(tmp_path, "c", {"AR": 0.4, "PD": 0.3}, 2.0, seed=2)  # a bench from before the families
    assert summarise_families(load_runs([a, b, c])) == {}


XEON = {"threads": 2, "cpu": "Intel(R) Xeon(R) Processor (family 6 model 207)", "cpu_capability": "AVX512", "gpu": None}
EPYC = {"threads": 2, "cpu": "AMD EPYC 7B13 (family 25 model 1)", "cpu_capability": "AVX2", "gpu": None}


def test_runs_from_different_machines_are_named_and_the_same_machine_is_not(tmp_path: Path):
    def replicates(*dirs: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pdlightning.cli", "replicates", *map(str, dirs), "--json",
                               str(tmp_path / "s.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)

    a = write_run(tmp_path, "a", {"AR": 0.4, "PD": 0.2}, 2.0, seed=0, machine=XEON)
    b = write_run(tmp_path, "b", {"AR": 0.4, "PD": 0.3}, 1.5, seed=1, machine=XEON)
    c = write_run(tmp_path, "c", {"AR": 0.4, "PD": 0.3}, 1.0, seed=2, machine=EPYC)
    d = write_run(tmp_path, "d", {"AR": 0.4, "PD": 0.3}, 1.0, seed=3)  # from before the CPU was recorded
    same = replicates(a, b)
    assert same.returncode == 0, same.stderr
    assert "kinds of machine" not in same.stdout
    mixed = replicates(a, b, c, d)
    assert mixed.returncode == 0, mixed.stderr
    note = mixed.stdout.split("These runs come from 3 kinds of machine")[1].splitlines()[1:]
    assert note == [f"- {a / 'results.json'}: Intel(R) Xeon(R) Processor (family 6 model 207), AVX512",
                    f"- {b / 'results.json'}: Intel(R) Xeon(R) Processor (family 6 model 207), AVX512",
                    f"- {c / 'results.json'}: AMD EPYC 7B13 (family 25 model 1), AVX2",
                    f"- {d / 'results.json'}: CPU not recorded (a run from before pdlightning recorded it)"]
    written = json.loads((tmp_path / "s.json").read_text())["machines"]
    assert written[str(c / "results.json")] == "AMD EPYC 7B13 (family 25 model 1), AVX2"


def test_cpu_name_keeps_family_and_model_from_cpuinfo():
    cpuinfo = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
               "model name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\ncpu family\t: 7\nmodel\t\t: 1\n"
               "model name\t: Other\n")
    assert cpu_name(cpuinfo) == "Intel(R) Xeon(R) Processor (family 6 model 207)"
    assert cpu_name("processor\t: 0\nmodel name\t: Some ARM core\n") == "Some ARM core"
    assert cpu_name("") == (platform.processor() or platform.machine() or "unknown CPU")
    assert describe("Xeon").startswith("CPU not recorded") and describe(None).startswith("CPU not recorded")
    assert describe({**XEON, "gpu": "NVIDIA H100"}) == ("Intel(R) Xeon(R) Processor (family 6 model 207), AVX512, "
                                                         "NVIDIA H100")


def test_every_benchmark_script_records_its_machine():
    """Each ``benchmarks/*.py`` ends with one JSON line; every JSON line it prints names the machine."""
    import ast

    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) >= 7
    for path in scripts:
        dumps = [node for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and ast.unparse(node.func) == "json.dumps"]
        assert dumps, f"{path.name} prints no JSON line"
        for call in dumps:
            keys = {ast.literal_eval(k) for k in call.args[0].keys if k is not None}
            assert "machine" in keys, f"{path.name}: a JSON line without the machine"
