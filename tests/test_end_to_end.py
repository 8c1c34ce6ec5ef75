"""End to end: train the smoke config for a few steps through the CLI, then
decode with every registered strategy, through Python and `pdlightning generate`,
and export a Lightning checkpoint with `pdlightning export`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdlightning.decoding import LanguageModel, get_strategy, list_strategies
from pdlightning.tags import parse

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Describe this person in a few sentences.\nName: Ann Lee\nAge: 31\nCity: Paris",
    "Write short instructions to repair a chair.\nStep 1: sort the lid (4 minutes)\nStep 2: fold the door (15 minutes)",
]


def cli(*args: str, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_vars}
    return subprocess.run([sys.executable, "-m", "pdlightning.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smoke")
    out = cli("fit", "--config", "configs/smoke.yaml", f"--trainer.default_root_dir={root}",
              f"--trainer.logger.init_args.save_dir={root}", f"--trainer.callbacks.init_args.dirpath={root / 'hf'}",
              f"--data.cache_dir={ROOT / '.cache/pdlightning'}",
              "--trainer.callbacks+=pdlightning.model.callbacks.GenerationCheck",
              "--trainer.callbacks.num_prompts=2", "--trainer.callbacks.decoder_args={max_new_tokens: 64}")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.slow
def test_generation_check_logs_fact_accuracy_during_validation(trained: Path):
    import csv

    with next(trained.rglob("metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/fact_accuracy_planned")]
    assert len(rows) == 2  # once per epoch of the smoke run
    assert all(0.0 <= float(r["val/fact_accuracy_planned"]) <= 1.0 for r in rows)
    assert all(float(r["val/critical_path_planned"]) > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_strategies())
def test_every_strategy_decodes_the_trained_smoke_model(trained: Path, name: str):
    lm = LanguageModel.from_pretrained(trained / "hf")
    strategy = get_strategy(name, max_new_tokens=96)
    gens = strategy.generate(lm, PROMPTS, torch.Generator().manual_seed(0))
    assert [g.prompt for g in gens] == PROMPTS
    mask = lm.spec.id("mask")
    for g in gens:
        assert len(g.token_ids) <= 96
        assert mask not in g.token_ids  # every mask was filled
        assert g.counters.forward_passes >= g.counters.critical_path > 0
        assert g.counters.seconds > 0
        if g.plan is not None:  # planned strategies: the spans are the answer, in plan order
            assert g.spans is not None and len(g.spans) == len(g.plan)
            assert all(lm.spec.span_open not in s for s in g.spans)


@pytest.mark.slow
def test_generate_command_shows_plan_and_writes_results(trained: Path, tmp_path: Path):
    out_file = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out_file.write_text("an earlier run's results\n")
    out = cli("generate", "--checkpoint", str(trained / "hf"), "--decoder", "planned", "--input", str(prompts),
              "--r", "0.5", "--tau", "0.5", "--max_new_tokens", "96", "--show-plan", "--output", str(out_file))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plan:" in out.stdout and "critical path" in out.stdout
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and not list(tmp_path.glob("*.partial"))
    # each prompt, then its spans as they stream, each once, then its plan and answer
    blocks = out.stdout.split("> ")[1:]
    assert [b.startswith(p) for b, p in zip(blocks, PROMPTS, strict=True)] == [True, True]
    for block, row in zip(blocks, rows, strict=True):
        streamed = [line for line in block.splitlines() if line.startswith("  ... [")]
        assert len(streamed) == len(row["spans"]) and not any(line.startswith("[") for line in block.splitlines())
        assert block.find("  ... [") < block.index("plan:") < block.index("answer:")  # -1: the smoke model planned no span


@pytest.mark.slow
def test_predict_decodes_the_test_prompts_from_the_checkpoint_and_writes_them(trained: Path, tmp_path: Path):
    from pdlightning.data.sources import load_rows

    common = ("--config", "configs/smoke.yaml", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.cache_dir={ROOT / '.cache/pdlightning'}",
              "--ckpt_path", str(next(trained.rglob("last.ckpt"))), "--data.batch_size=3",
              "--trainer.limit_predict_batches=1", "--model.predict.args={max_new_tokens: 64}")
    out = cli("predict", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote 3 generations to" in out.stdout and "fact accuracy" in out.stdout
    rows = [json.loads(line) for line in next(tmp_path.rglob("predictions.jsonl")).read_text().splitlines()]
    test = load_rows("bundled", ROOT / ".cache/pdlightning", bundled_sizes={"train": 400, "validation": 32, "test": 32})["test"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prompt"] for r in rows] == [test[i]["prompt"] for i in range(3)]
    assert all(r["decoder"] == "planned" and 0 <= r["fact_accuracy"] <= 1 for r in rows)
    # the checkpoint's weights decode: the same as its export, with the same decoder and seed
    lm = LanguageModel.from_pretrained(trained / "hf")
    ref = get_strategy("planned", max_new_tokens=64).generate(lm, [r["prompt"] for r in rows],
                                                              torch.Generator().manual_seed(0))
    assert [r["token_ids"] for r in rows] == [g.token_ids for g in ref]
    # another decoder and knobs from the command line; a misspelt one is refused by name
    out = cli("predict", *common, "--model.predict.decoder=autoregressive",
              "--trainer.callbacks+=pdlightning.model.callbacks.WriteGenerations",
              f"--trainer.callbacks.path={tmp_path / 'ar.jsonl'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list(tmp_path.rglob("predictions.jsonl"))) == 1  # the appended writer replaced the config's
    rows = [json.loads(line) for line in (tmp_path / "ar.jsonl").read_text().splitlines()]
    assert all(r["decoder"] == "autoregressive" and r["counters"]["critical_path"] == len(r["token_ids"])
               for r in rows)
    out = cli("predict", *common, "--model.predict.decoder=fast_dlm")
    assert out.returncode != 0 and "unknown decoding strategy 'fast_dlm'" in out.stderr


@pytest.mark.slow
def test_validate_and_test_a_checkpoint_score_the_last_stage_under_their_own_names(trained: Path, tmp_path: Path):
    common = ("--config", "configs/smoke.yaml", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.cache_dir={ROOT / '.cache/pdlightning'}",
              "--ckpt_path", str(next(trained.rglob("last.ckpt"))))
    for sub, prefix in (("validate", "val"), ("test", "test")):
        out = cli(sub, *common)
        assert out.returncode == 0, out.stderr[-3000:]
        # the smoke run ends on the planned objective (its first stage is AR): both terms are scored
        for key in ("loss", "ar_loss", "plan_accuracy", "diffusion_loss", "masked_accuracy"):
            assert f" {prefix}/{key} " in out.stdout, (sub, key, out.stdout[-2000:])
        assert sub == "validate" or " val/" not in out.stdout


@pytest.mark.slow
def test_generate_command_refuses_a_bad_knob(trained: Path):
    out = cli("generate", "--checkpoint", str(trained / "hf"), "--decoder", "planned", "--prompt", "hi",
              "--r", "-1")
    assert out.returncode != 0 and "step_ratio" in out.stderr
    out = cli("generate", "--checkpoint", str(trained / "hf"), "--prompt", "hi", "--attn_implementation",
              "flex_attention")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "'sdpa' on CPU" in out.stderr
    # a device this machine lacks, or a checkpoint file instead of the exported directory: one line each
    ckpt = next(trained.rglob("last.ckpt"))
    hf = str(trained / "hf")
    for args, said in ((("--checkpoint", hf, "--device", "gpu"), "'gpu' is not a torch device"),
                       (("--checkpoint", str(ckpt)), "is a file, not a model directory"),
                       (("--checkpoint", hf, "--threads", "-1"), "--threads must be at least 1"),
                       # the prompt checks a strategy makes before its first pass
                       (("--checkpoint", hf, "--prompt", " "), "prompt 0 is blank"),
                       (("--checkpoint", hf, "--max_new_tokens", "5000"), "(max_position_embeddings)")):
        out = cli("generate", *args, "--prompt", "hi")
        assert out.returncode != 0 and "Traceback" not in out.stderr and said in out.stderr, out.stderr[-2000:]
    # prompt files: empty, not JSON, not UTF-8, missing; each named with the file
    files = {"empty.jsonl": (b"\n", "no prompts in it"), "bad.jsonl": (b'{"prompt": "a"}\n{oops\n', "bad.jsonl:2: not JSON"),
             "latin.jsonl": (b'{"prompt": "caf\xe9"}\n', "not UTF-8 text"), "missing.jsonl": (None, "no such file")}
    for name, (content, said) in files.items():
        path = trained / name
        if content is not None:
            path.write_bytes(content)
        out = cli("generate", "--checkpoint", hf, "--input", str(path))
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.startswith("pdlightning generate: ") and said in out.stderr, out.stderr


def test_a_subclass_passing_kwargs_on_keeps_every_inherited_knob_typed():
    import argparse

    from pdlightning.decoding import PlannedDiffusion
    from pdlightning.generate import add_strategy_arguments, strategy_kwargs

    class ShortPlans(PlannedDiffusion):  # the natural subclass: its own knob, unannotated, the rest passed on
        def __init__(self, keep=2, **kwargs):
            super().__init__(max_spans=keep, **kwargs)

    p = argparse.ArgumentParser()
    add_strategy_arguments(p, ShortPlans)
    got = strategy_kwargs(p.parse_args(["--keep", "1", "--r", "0.5", "--topic_heads", "false", "--order", "random"]))
    assert got == {"keep": 1, "step_ratio": 0.5, "topic_heads": False, "order": "random"}
    assert type(got["step_ratio"]) is float
    with pytest.raises(SystemExit):  # a Literal's values are the choices
        p.parse_args(["--order", "sideways"])
    ShortPlans(**got)  # and the strategy takes them


def test_generate_help_describes_every_knob_from_the_docstrings():
    import argparse

    from pdlightning.decoding import PlannedDiffusion, list_strategies
    from pdlightning.decoding.base import strategy_class
    from pdlightning.generate import add_strategy_arguments

    class ShortPlans(PlannedDiffusion):
        """Plans of at most ``keep`` entries.

        Args:
            keep: Plan entries kept per round (100% of them when 0).
        """

        def __init__(self, keep=2, **kwargs):
            super().__init__(max_spans=keep, **kwargs)

    for cls in [ShortPlans] + [strategy_class(n) for n in list_strategies()]:
        for name, text in helps_of(cls).items():  # a description, not the bare "<Class> argument"
            assert " argument (default" not in text, (cls.__name__, name, text)
    assert helps_of(ShortPlans)["keep"] == "Plan entries kept per round (100%% of them when 0). (default 2)"
    p = argparse.ArgumentParser()
    add_strategy_arguments(p, ShortPlans)
    assert "(100% of them when 0)" in p.format_help()  # argparse %-formats help: a bare % would break --help
    assert helps_of(ShortPlans)["step_ratio"].startswith("r: a round denoises in ceil(r * longest span) steps.")


def helps_of(cls: type) -> dict[str, str]:
    import argparse

    from pdlightning.generate import add_strategy_arguments

    p = argparse.ArgumentParser()
    add_strategy_arguments(p, cls)
    return {a.dest.removeprefix("strategy__"): a.help for a in p._actions if a.dest.startswith("strategy__")}


def test_a_prompt_file_row_keeps_its_own_system_prompt(tmp_path: Path):
    import argparse

    from pdlightning.generate import _read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "a", "system": "Be brief."}, {"prompt": "b"}, {"instruction": "c", "system": None})) + "\n")
    args = argparse.Namespace(prompt=None, input=str(path), system="Default.")
    assert _read_prompts(args) == (["a", "b", "c"], ["Be brief.", "Default.", "Default."])
    args.system = None
    assert _read_prompts(args) == (["a", "b", "c"], ["Be brief.", None, None])
    path.write_text(json.dumps({"prompt": "a", "system": ["Be brief."]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: 'system' must be a string \(or null\), got list"):
        _read_prompts(args)


@pytest.mark.slow
def test_generate_command_finds_a_users_strategy_on_the_python_path(trained: Path, tmp_path: Path):
    args = ("generate", "--checkpoint", str(trained / "hf"), "--decoder", "mypackage.strategies.Greedy",
            "--max_new_tokens", "8", "--prompt", "hi")
    out = cli(*args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "cannot import 'mypackage.strategies'" in out.stderr and "PYTHONPATH" in out.stderr
    (tmp_path / "mypackage").mkdir()
    (tmp_path / "mypackage/__init__.py").write_text("")
    (tmp_path / "mypackage/strategies.py").write_text(
        "from pdlightning.decoding import Autoregressive\n\n\nclass Greedy(Autoregressive):\n    pass\n")
    out = cli(*args, PYTHONPATH=str(tmp_path))  # as docs/decoding-strategies.md says: the package on the path
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("> hi\n")


@pytest.mark.slow
def test_export_writes_a_directory_every_decoder_loads(trained: Path, tmp_path: Path):
    ckpt = next(trained.rglob("last.ckpt"))
    out = cli("export", "--config", "configs/smoke.yaml", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf"),
              )
    assert out.returncode == 0, out.stderr[-3000:]
    a = LanguageModel.from_pretrained(trained / "hf")
    b = LanguageModel.from_pretrained(tmp_path / "hf")
    assert a.spec.ids == b.spec.ids and len(a.tokenizer) == len(b.tokenizer)
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(v, b.backbone.state_dict()[k]), k
    text = "<topic>name 1</topic><async>Her name is Ann.</async>" + a.spec.end
    ids = a.tokenizer.encode(text, add_special_tokens=False)
    assert parse(a.tokenizer.decode(ids), a.spec).span_texts() == ["Her name is Ann."]


@pytest.mark.slow
def test_evaluate_alpaca_command_writes_alpaca_eval_outputs(trained: Path, tmp_path: Path):
    from pdlightning.eval.alpaca_cli import main

    prompts = tmp_path / "alpaca.json"
    prompts.write_text(json.dumps([{"instruction": p, "dataset": "test"} for p in PROMPTS]))
    assert main(["alpaca", "--prompts", str(prompts), "--checkpoint", str(trained / "hf"), "--decoder", "planned",
                 "--out", str(tmp_path / "out"), "--max_new_tokens", "48", "--r", "0.5"]) == 0
    rows = json.loads((tmp_path / "out/model_outputs.json").read_text())
    assert [r["instruction"] for r in rows] == PROMPTS
    assert all(r["generator"] == "planned" and isinstance(r["output"], str) for r in rows)
    assert all(r["critical_path"] > 0 and r["latency_s"] > 0 for r in rows)


@pytest.mark.slow
def test_training_can_start_from_an_exported_model(trained: Path, tmp_path: Path):
    """``--model.backbone.pretrained`` (the bench's ``init_from``): the run starts from those weights.

    With a learning rate of 0 the exported result must equal the source exactly."""
    out = cli("fit", "--config", "configs/smoke.yaml", f"--model.backbone.pretrained={trained / 'hf'}",
              "--model.optimizer.init_args.lr=0.0",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              f"--trainer.callbacks.init_args.dirpath={tmp_path / 'hf'}", f"--data.cache_dir={ROOT / '.cache/pdlightning'}",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0")
    assert out.returncode == 0, out.stderr[-3000:]
    source = LanguageModel.from_pretrained(trained / "hf").backbone.state_dict()
    result = LanguageModel.from_pretrained(tmp_path / "hf").backbone.state_dict()
    assert source.keys() == result.keys()
    for k, v in source.items():
        assert torch.equal(v, result[k]), k


@pytest.mark.slow
def test_generate_command_points_from_a_run_directory_to_its_model(trained: Path, tmp_path: Path):
    out = cli("generate", "--checkpoint", str(trained), "--prompt", "hi")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "not a model directory" in out.stderr and str(trained / "hf") in out.stderr
    out = cli("generate", "--checkpoint", str(trained / "hf"), "--input", str(tmp_path / "missing.jsonl"))
    assert out.returncode != 0 and "Traceback" not in out.stderr and "missing.jsonl" in out.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    out = cli("generate", "--checkpoint", str(trained / "hf"), "--input", str(prompts), "--output", str(prompts))
    assert out.returncode != 0 and "would overwrite the prompts" in out.stderr
    assert prompts.read_text() == json.dumps({"prompt": "hi"}) + "\n"
    # every prompt prints an answer line; an empty answer says why (its repairs)
    out = cli("generate", "--checkpoint", str(trained / "hf"), "--input", str(prompts), "--output", str(tmp_path / "o"),
              "--max_new_tokens", "3")
    answer = out.stdout.split("> hi\n", 1)[1].splitlines()[0]
    text, repairs = (lambda r: (r["text"], r["repairs"]))(json.loads((tmp_path / "o").read_text()))
    assert answer == (text or f"(no answer; {', '.join(repairs) or 'the model ended at once'})") and answer
