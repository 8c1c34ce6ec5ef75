"""`pdlightning bench` end to end on the smoke config: results, table, plots, ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdlightning.eval.bench import BenchConfig, pareto
from pdlightning.eval.machine import cpu_name, describe

ROOT = Path(__file__).resolve().parents[1]


def test_pareto_frontier_by_brute_force():
    pts = [(1.0, 0.5, "a"), (2.0, 0.9, "b"), (3.0, 0.8, "c"), (0.5, 0.1, "d"), (2.0, 0.5, "e")]
    assert sorted(pareto(pts)) == ["a", "b", "d"]


def test_frontier_spans_rows_and_sweep_points_fastest_first():
    """A sweep point that beats a row on both axes pushes the row off the frontier;
    the table lists the brute-force frontier, fastest first, against the baseline."""
    from pdlightning.eval.bench import markdown_frontier

    def row(lat: float, facts: float, **extra: float) -> dict:
        return {"latency_s": lat, "fact_accuracy": facts, "critical_path": 10 * lat, **extra}

    results = {"AR": row(1.0, 0.40), "PD": row(2.0, 0.45, chrf=0.5), "PD-DA": row(1.5, 0.30)}
    sweeps = {"PD/step_ratio": [row(0.5, 0.39, value=0.25), row(0.8, 0.44, value=0.5), row(1.2, 0.41, value=0.75)]}
    lines = markdown_frontier(results, sweeps, "AR").splitlines()[2:]
    names = [line.split(" | ")[0].removeprefix("| ") for line in lines]
    # AR (1.0 s, 40%) is beaten by r = 0.5 (0.8 s, 44%); r = 0.75 by r = 0.5; PD-DA by both
    assert names == ["PD/step_ratio=0.25", "PD/step_ratio=0.5", "PD"]
    assert lines[0] == "| PD/step_ratio=0.25 | 39.0% | -1.0 | – | 2.00x | 5.0 |"
    assert lines[2] == "| PD | 45.0% | +5.0 | 50.0 | 0.50x | 20.0 |"


def test_facts_by_family_by_hand_and_as_a_table():
    from pdlightning.eval.bench import markdown_families
    from pdlightning.eval.metrics import fact_accuracy_by_group

    keys = [["Ann", "Paris"], ["Bob", "Rome"], ["Cat"], []]
    texts = ["Ann lives in Paris", "Ann lives in Rome", "a dog", "anything"]
    by = fact_accuracy_by_group(texts, keys, ["people", "people", "pets", "empty"])
    assert by == {"people": {"facts": 3 / 4, "keys": 4}, "pets": {"facts": 0.0, "keys": 1}}  # no keys, no row
    other = fact_accuracy_by_group(["Ann", "Bob lives in Rome", "Cat", ""], keys, ["people", "people", "pets", "empty"])
    results = {"AR": {"facts_by_family": by}, "PD": {"facts_by_family": other}, "old": {"facts_by_family": None}}
    lines = markdown_families(results, "AR").splitlines()
    assert lines[0] == "| family | keys | AR | PD |"
    assert lines[2:] == ["| people | 4 | 75.0% | +0.0 |", "| pets | 1 | 0.0% | +100.0 |"]
    assert markdown_families({"PD": {"facts_by_family": other}}, "AR") == ""  # no baseline, no table


def test_facts_against_other_prompts_keys_by_hand_and_on_reference_answers():
    from pdlightning.data import synthetic
    from pdlightning.eval.metrics import fact_accuracy_against_others

    keys = [["Ann", "Paris"], ["Bob", "Rome"], ["Cat"]]
    texts = ["Ann lives in Paris", "Ann lives in Rome", "Cat"]
    # text 0 against Bob/Rome: 0 of 2; text 1 against Ann/Paris: 1 of 2; "c" has no other prompt
    assert fact_accuracy_against_others(texts, keys, ["a", "a", "c"]) == pytest.approx(1 / 4)
    assert fact_accuracy_against_others(texts, keys, ["a", "b", "c"]) is None
    # the reference answers look everything up: all their own keys, few of the others'
    rows = synthetic.generate_split("test", 40, seed=0)
    answers, all_keys, families = ([r[k] for r in rows] for k in ("response", "answer_keys", "family"))
    assert all(synthetic.fact_accuracy(a, k) == 1.0 for a, k in zip(answers, all_keys, strict=True))
    assert fact_accuracy_against_others(answers, all_keys, families) < 0.3
    # a model that writes one answer per family, whatever the prompt, scores the same either way on average
    first = {f: a for a, f in reversed(list(zip(answers, families, strict=True)))}
    guesses = [first[f] for f in families]
    own = sum(synthetic.fact_accuracy(g, k) * len(k) for g, k in zip(guesses, all_keys, strict=True))
    own /= sum(len(k) for k in all_keys)
    assert own < 0.5 and fact_accuracy_against_others(guesses, all_keys, families) == pytest.approx(own, abs=0.15)


def test_rows_take_turns_over_the_prompts_and_decode_as_they_would_alone():
    """A spell of a slow machine must hit every row alike: each chunk of prompts is
    decoded by every row before the next chunk starts, and taking turns changes
    no answer."""
    from mock_lm import encode, make_mock_lm

    from pdlightning.decoding import get_strategy
    from pdlightning.eval.bench import Job, evaluate_rows

    log: list[str] = []
    jobs = []
    for label, text, batch in [("A", "the cat", 1), ("B", "a dog ran", 2)]:
        lm = make_mock_lm(encode(text) + [None] * 3)
        forward = lm.forward
        lm.forward = lambda *a, _f=forward, _l=label, **k: log.append(_l) or _f(*a, **k)
        jobs.append(Job(label, lm, "autoregressive", {"max_new_tokens": 6, "batch_size": batch}))
    prompts = [{"prompt": f"prompt {i}", "answer_keys": ["cat"], "family": "f"} for i in range(5)]
    evaluated = evaluate_rows(jobs, prompts, BenchConfig(warmup=1))
    turns = [label for i, label in enumerate(log) if i == 0 or log[i - 1] != label]
    # warm-up A, warm-up B, then chunks of 2 prompts (B's batch size): A A | B, three times
    assert turns == ["A", "B"] * 4
    for job, (result, gens) in zip(jobs, evaluated, strict=True):
        alone = get_strategy(job.decoder, **job.args).generate(job.lm, [p["prompt"] for p in prompts])
        assert [g.text for g in gens] == [g.text for g in alone]
        assert result["n"] == 5
    assert evaluated[0][1][0].text.startswith("the cat") and evaluated[1][1][0].text.startswith("a dog ran")
    assert evaluated[0][0]["fact_accuracy"] == 1.0 and evaluated[1][0]["fact_accuracy"] == 0.0


def test_bench_config_refuses_unknown_keys_and_models(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modles: {}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        BenchConfig.from_yaml(bad)
    bad.write_text("models: {}\ndecoders: [{name: AR, model: nope, decoder: autoregressive}]\n")
    with pytest.raises(ValueError, match="unknown model"):
        BenchConfig.from_yaml(bad)
    bad.write_text("models: {warmup: {config: [configs/ar_tiny.yaml]}}\n")  # a row's key misspelt
    with pytest.raises(ValueError, match=r"model 'warmup'.*'config'.*its keys: configs"):
        BenchConfig.from_yaml(bad)
    bad.write_text("models: {}\ndecoders: [AR]\n")
    with pytest.raises(ValueError, match="decoder row 0 must be a mapping"):
        BenchConfig.from_yaml(bad)
    ok = "models: {m: {configs: [configs/ar_tiny.yaml]}}\ndecoders: [{name: AR, model: m, decoder: autoregressive}]\n"
    for setting, said in (("limit: three", "limit must be an integer >= 1, got 'three'"),
                          ("threads: 0", "threads must be an integer >= 1, got 0"),
                          ("warmup: true", "warmup must be an integer >= 0, got True"),
                          ("split: tset", "split must be one of train, validation, test, got 'tset'")):
        bad.write_text(ok + setting + "\n")  # said before any training, not after it
        with pytest.raises(ValueError, match=said):
            BenchConfig.from_yaml(bad)


def test_bench_config_builds_every_decoder_row_and_sweep_point_before_any_training(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    head = "models: {m: {configs: [configs/tiny.yaml]}}\ndecoders:\n  - {name: PD, model: m, decoder: planned}\n"
    for tail, said in (
        ("  - {name: X, model: m, decoder: plannd}\n", "decoder row 'X': unknown decoding strategy 'plannd'"),
        ("  - {name: X, model: m, decoder: planned, args: {r: 0.5}}\n", "decoder row 'X': .*unexpected keyword argument 'r'"),
        ("sweeps: [{row: PDX, knob: order, values: [random]}]\n", "sweep 0 sweeps row 'PDX', which is not a decoder row"),
        ("sweeps: [{row: PD, knob: ordr, values: [random]}]\n", r"sweep 0 \(PD/ordr=random\): .*'ordr'"),
        ("sweeps: [{row: PD, knob: step_ratio, values: [0.5, 2]}]\n", r"sweep 0 \(PD/step_ratio=2\): step_ratio \(r\) must be"),
    ):
        bad.write_text(head + tail + "baseline: PD\n")
        with pytest.raises(ValueError, match=said):
            BenchConfig.from_yaml(bad)
    bad.write_text(head + "sweeps: [{row: PD, knob: order, values: [random, left_to_right]}]\nbaseline: PD\n")
    assert BenchConfig.from_yaml(bad).sweeps[0].values == ["random", "left_to_right"]


def test_sweep_table_lists_every_point_with_its_ratio():
    from pdlightning.eval.bench import markdown_sweeps

    point = {"fact_accuracy": 0.25, "critical_path": 40.3, "latency_s": 0.2, "speedup_vs_ar": 1.5}
    table = markdown_sweeps({"PD/order": [{"value": "random", **point}],
                             "PD/step_ratio": [{"value": 0.5, **point, "fact_accuracy": 0.125, "chrf": 0.5}]})
    lines = table.splitlines()
    assert lines[2:] == ["| PD/order | random | 25.0% | – | – | 40.3 | 0.200 | 1.50x |",
                         "| PD/step_ratio | 0.5 | 12.5% | – | 50.0 | 40.3 | 0.200 | 1.50x |"]


def test_ratios_against_the_baseline_carry_paired_intervals_over_the_prompts():
    """Δ facts and speed-up come with 95% bootstrap intervals over the same prompts; the
    baseline's own are the points themselves; rows without per-prompt results get none."""
    from pdlightning.eval.bench import add_ratios, against_baseline, markdown_table

    def row(found: list[int], seconds: list[float]) -> dict:
        keys = [4] * len(found)
        return {"model": "m", "fact_accuracy": sum(found) / sum(keys), "latency_s": sum(seconds) / len(seconds),
                "critical_path": 10.0, "forward_passes": 10.0, "content_tokens": 5.0, "control_tokens": 0.0,
                "pad_tokens": 0.0, "per_prompt": {"facts_found": found, "answer_keys": keys, "latency_s": seconds}}

    results = {"AR": row([2, 1, 3, 2, 0, 4, 2, 1], [0.2] * 8),
               "PD": row([3, 1, 3, 2, 1, 4, 3, 1], [0.1, 0.1, 0.1, 0.1, 0.15, 0.1, 0.1, 0.05])}
    add_ratios(results, "AR")
    ar, pd = results["AR"], results["PD"]
    assert ar["fact_accuracy_minus_ar_ci"] == [0.0, 0.0] and ar["speedup_vs_ar_ci"] == [1.0, 1.0]
    low, high = pd["fact_accuracy_minus_ar_ci"]
    # PD finds as many keys as AR or one more on every prompt: Δ per prompt lies in [0, 1/4]
    assert pd["fact_accuracy_minus_ar"] == pytest.approx(3 / 32)
    assert 0.0 <= low < 3 / 32 < high <= 0.25
    low, high = pd["speedup_vs_ar_ci"]
    assert 4 / 3 <= low < pd["speedup_vs_ar"] < high <= 4.0
    table = markdown_table(results).splitlines()
    assert table[0].split(" | ")[4:8] == ["Δ facts vs AR [95% CI]", "chrF vs reference", "latency (s)",
                                          "speed-up vs AR [95% CI]"]
    cells = table[3].split(" | ")
    ci = pd["fact_accuracy_minus_ar_ci"]
    assert cells[4] == f"+9.4 [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" and cells[7].startswith("2.00x [")
    assert table[2].split(" | ")[4] == "+0.0 [+0.0, +0.0]"
    old = {k: v for k, v in pd.items() if k != "per_prompt"}  # results.json before 2026-12-06
    assert against_baseline(old, ar)["fact_accuracy_minus_ar_ci"] is None


def test_chrf_scores_the_whole_text_against_the_reference_answer():
    """Facts miss a cut or garbled fact-free sentence; chrF against the reference sees it."""
    from mock_lm import encode, make_mock_lm

    from pdlightning.eval.bench import Job, evaluate_rows

    reference = "the cat sat on the mat"
    jobs = [Job(label, make_mock_lm(encode(text)), "autoregressive", {"max_new_tokens": 12})
            for label, text in (("whole", reference), ("cut", "the cat sat"), ("other", "a dog ran far"))]
    prompts = [{"prompt": f"prompt {i}", "answer_keys": ["cat"], "family": "f", "response": reference}
               for i in range(3)]
    (whole, _), (cut, _), (other, _) = evaluate_rows(jobs, prompts, BenchConfig(warmup=0))
    assert whole["fact_accuracy"] == cut["fact_accuracy"] == 1.0  # the fact is in both
    assert whole["chrf"] == pytest.approx(1.0) and 0.2 < cut["chrf"] < 0.9 and other["chrf"] < cut["chrf"]
    without = [{k: v for k, v in p.items() if k != "response"} for p in prompts]
    assert evaluate_rows(jobs[:1], without, BenchConfig(warmup=0))[0][0]["chrf"] is None


def test_command_line_overrides_and_a_seed_replicate_gets_its_own_directory(
    capsys: pytest.CaptureFixture, tmp_path: Path
):
    from pdlightning.eval.bench import config_from_args

    quick = str(ROOT / "configs/bench/quickstart.yaml")
    cfg = config_from_args("demo", None, quick, [])
    assert (cfg.seed, cfg.out_dir, cfg.limit) == (0, "runs/quickstart", 60)
    cfg = config_from_args("demo", None, quick, ["--seed", "2", "--limit", "5"])
    assert (cfg.seed, cfg.out_dir, cfg.limit) == (2, "runs/quickstart-seed2", 5)  # never the seed-0 models
    cfg = config_from_args("demo", None, quick, ["--seed", "2", "--out_dir", "elsewhere"])
    assert (cfg.seed, cfg.out_dir) == (2, "elsewhere")
    assert config_from_args("demo", None, quick, []).split == "test"
    assert config_from_args("demo", None, quick, ["--split", "validation"]).split == "validation"
    broken = tmp_path / "broken.yaml"
    broken.write_text("modles: {}\n")
    for bad, said in ((["--limit", "0"], "--limit"), (["--config", "nope.yaml"], "nope.yaml not found"),
                      (["--config", str(broken)], "unknown keys ['modles']")):
        with pytest.raises(SystemExit):
            config_from_args("demo", None, quick, bad)
        assert said in capsys.readouterr().err


def test_every_shipped_bench_config_loads():
    for path in sorted((ROOT / "configs/bench").glob("*.yaml")):
        cfg = BenchConfig.from_yaml(path)
        assert cfg.decoders and cfg.baseline in {d.name for d in cfg.decoders}
        for spec in cfg.models.values():
            assert all((ROOT / c).exists() for c in spec.configs)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_every_model_of_every_shipped_bench_config_is_a_valid_fit_command(tmp_path: Path):
    """A typo in a model's overrides fails here, not an hour into a bench."""
    from pdlightning.cli import parse_config
    from pdlightning.eval.bench import fit_args

    for path in sorted((ROOT / "configs/bench").glob("*.yaml")):
        cfg = BenchConfig.from_yaml(path)
        trained = {name: tmp_path / name / "hf" for name in cfg.models}
        for name, spec in cfg.models.items():
            args = [a.replace("configs/", f"{ROOT}/configs/", 1) if a.startswith("configs/") else a
                    for a in fit_args(name, spec, cfg, trained)]
            try:
                parsed = parse_config(args)
            except (SystemExit, Exception) as e:  # jsonargparse raises or exits, by the error
                raise AssertionError(f"{path.name}: model {name} does not parse: {e}") from e
            assert parsed.seed_everything == cfg.seed


@pytest.mark.slow
def test_bench_smoke_writes_results_with_ratios_against_ar(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pdlightning.cli", "bench", "--config", "configs/bench/smoke.yaml",
         "--out_dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # each model is written once, where the bench reuses it from (not also beside its logs)
    exports = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.rglob("model.safetensors"))
    assert exports == [Path("models/smoke/hf")]
    summary = json.loads((tmp_path / "results.json").read_text())
    results = summary["results"]
    assert set(results) == {"AR", "diffusion", "Fast-dLLM", "PD", "PD-DA"}
    assert results["AR"]["speedup_vs_ar"] == pytest.approx(1.0)
    for r in results.values():
        assert r["n"] == 3 and 0.0 <= r["fact_accuracy"] <= 1.0
        assert r["fact_accuracy_other_prompts"] is None or 0.0 <= r["fact_accuracy_other_prompts"] <= 1.0
        assert r["critical_path_vs_ar"] == pytest.approx(r["critical_path"] / results["AR"]["critical_path"])
        low, high = r["fact_accuracy_minus_ar_ci"]  # 3 prompts: an interval all the same
        assert -1.0 <= low <= high <= 1.0 and r["speedup_vs_ar_ci"][0] <= r["speedup_vs_ar_ci"][1]
        assert len(r["per_prompt"]["facts_found"]) == 3
    assert results["diffusion"]["critical_path"] == pytest.approx(32)  # steps = budget
    assert [row["value"] for row in summary["sweeps"]["PD/step_ratio"]] == [0.5, 1.0]
    assert "| PD |" in (tmp_path / "results.md").read_text()
    machine = summary["machine"]  # which CPU: speeds differ between kinds (`replicates` names them)
    assert machine["cpu"] == cpu_name() and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"[bench] machine: {describe(machine)}" in out.stdout
    assert "| PD/step_ratio | 0.5 |" in (tmp_path / "results.md").read_text()
    for name in ("latency_vs_quality.png", "critical_path.png", "sweep_PD_step_ratio.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # the validation split (choosing a knob) reuses the model and leaves the test results alone
    test_results = (tmp_path / "results.json").read_text()
    out = subprocess.run(
        [sys.executable, "-m", "pdlightning.cli", "bench", "--config", "configs/bench/smoke.yaml",
         "--out_dir", str(tmp_path), "--split", "validation", "--limit", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model smoke: reusing" in out.stdout
    assert (tmp_path / "results.json").read_text() == test_results
    validation = json.loads((tmp_path / "validation/results.json").read_text())
    assert validation["config"]["split"] == "validation" and validation["results"]["AR"]["n"] == 1
    assert len((tmp_path / "validation/generations_AR.jsonl").read_text().splitlines()) == 1


def test_init_from_starts_a_model_from_an_earlier_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pdlightning.eval import bench

    path = tmp_path / "b.yaml"
    path.write_text("models:\n  b: {configs: [x.yaml], init_from: a}\n  a: {configs: [x.yaml]}\n"
                    "decoders: [{name: AR, model: a, decoder: autoregressive}]\n")
    with pytest.raises(ValueError, match="not a model listed before it"):
        BenchConfig.from_yaml(path)
    path.write_text(f"out_dir: {tmp_path}\nseed: 3\nmodels:\n  a: {{configs: [x.yaml]}}\n  b: {{configs: [x.yaml], init_from: a}}\n"
                    "decoders: [{name: AR, model: a, decoder: autoregressive}]\n")
    cfg = BenchConfig.from_yaml(path)
    calls: list[list[str]] = []
    envs: list[dict] = []

    def fake_fit(args: list[str], env: dict) -> subprocess.CompletedProcess:
        calls.append(args)
        envs.append(env)
        hf = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.callbacks.dirpath=")))
        hf.mkdir(parents=True)
        (hf / "model.safetensors").write_text("weights")
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_fit)
    trained: dict[str, Path] = {}
    for name, spec in cfg.models.items():
        trained[name] = bench.train_model(name, spec, cfg, trained)
    assert not any("pretrained" in a for a in calls[0])
    # one seed for the run: the models train on the bundled set the bench reads its prompts from
    assert all({"--seed_everything=3", "--data.seed=3"} <= set(c) for c in calls)
    # and on the bench's threads (the default 2 here), whatever the calling shell set
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2", "2"]
    assert f"--model.backbone.pretrained={tmp_path / 'models/a/hf'}" in calls[1]
    # a run with the same seed and recipe reuses them; another seed or recipe is refused, naming what differs
    assert bench.train_model("a", cfg.models["a"], cfg) == tmp_path / "models/a/hf" and len(calls) == 2
    cfg.seed = 4
    with pytest.raises(SystemExit, match="model a .* trained with seed 3, and this run asks for 4.*--seed 3"):
        bench.train_model("a", cfg.models["a"], cfg)
    cfg.seed, cfg.models["a"].overrides = 3, ["--trainer.max_epochs=1"]
    with pytest.raises(SystemExit, match=r"trained with overrides \[\], and this run asks for \['--trainer"):
        bench.train_model("a", cfg.models["a"], cfg)
    assert len(calls) == 2


def test_demo_ends_with_next_steps_that_reuse_its_models(capsys: pytest.CaptureFixture, monkeypatch, tmp_path):
    from pdlightning.eval import demo
    from pdlightning.eval.bench import config_from_args

    seen = []
    row = {"speedup_vs_ar": 2.0, "critical_path_vs_ar": 0.3, "fact_accuracy_minus_ar": -0.1, "fact_accuracy": 0.2}
    monkeypatch.setattr(demo, "run", lambda cfg: seen.append(cfg) or {"results": {"PD": row, "AR": row}})
    for args, knobs in (([], ""), (["--out_dir", str(tmp_path)], f" --out_dir {tmp_path}"),
                        (["--seed", "1"], " --seed 1"), (["--seed", "2", "--out_dir", str(tmp_path)],
                                                         f" --seed 2 --out_dir {tmp_path}")):
        assert demo.main(args) == 0
        said = capsys.readouterr().out
        assert "PD runs at 2.00x AR's speed" in said and "(20.0% vs 20.0%).\n" in said  # no chrF in the rows
        assert f"--checkpoint {seen[-1].out_dir}/models/planned/hf --decoder planned" in said
        assert f"pd_knobs.yaml{knobs}   #" in said
        # the knobs bench, as printed, names the very models the demo trained, with their seed: it reuses them
        knob_cfg = config_from_args("bench", None, None,
                                    ["--config", str(ROOT / "configs/bench/pd_knobs.yaml"), *knobs.split()])
        assert (knob_cfg.out_dir, knob_cfg.seed, knob_cfg.models) == (seen[-1].out_dir, seen[-1].seed, seen[-1].models)
    row["chrf"] = 0.5
    demo.main([])
    assert "(20.0% vs 20.0%); chrF against the reference answers 50.0 vs 50.0." in capsys.readouterr().out
    row["fact_accuracy_minus_ar_ci"] = [-0.052, 0.031]
    demo.main([])
    said = capsys.readouterr().out
    assert "(20.0% vs 20.0%; 95% interval over the prompts -5.2 to +3.1); chrF" in said
    assert "planned_ar" not in said.split("Next")[0]
    ar_spans = {**row, "speedup_vs_ar": 1.7, "fact_accuracy_minus_ar": 0.063}
    monkeypatch.setattr(demo, "run", lambda cfg: {"results": {"PD": row, "AR": row, "planned_ar": ar_spans}})
    demo.main([])
    said = capsys.readouterr().out
    assert "(planned_ar), PD runs at 1.70x AR's speed with 0.30x its critical path and +6.3 points" in said
