"""Training end to end through the CLI: the smoke config lowers the loss,
every shipped config parses, resume after a real kill, DDP on 2 CPU processes.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/bench/ is tested in test_bench.py


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pdlightning.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def smoke_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/smoke.yaml"),
        f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
        f"--data.cache_dir={ROOT / '.cache/pdlightning'}", *extra,
    ]


def metrics(tmp: Path) -> list[dict[str, str]]:
    files = sorted(tmp.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {tmp}"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_training_config_parses(path: Path):
    cfg = yaml.safe_load(path.read_text())
    if not {"model", "data"} <= set(cfg):
        pytest.skip("not a training config")
    from pdlightning.cli import parse_config

    parsed = parse_config(["--config", str(path)])
    assert parsed.data.source and parsed.trainer.max_epochs


def test_a_bad_config_value_is_refused_with_its_name(tmp_path: Path):
    from pdlightning.cli import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--config", str(ROOT / "configs/smoke.yaml"), "--data.max_pads=lots"])


def test_a_misspelt_option_is_named_without_a_usage_line_of_every_option(tmp_path: Path, capsys):
    from pdlightning.cli import build_cli

    typo = tmp_path / "typo.yaml"  # in a config file as on the command line
    typo.write_text((ROOT / "configs/smoke.yaml").read_text().replace("batch_size:", "batchsize:"))
    for args, said in ((["--config", str(ROOT / "configs/smoke.yaml"), "--model.objective.tmin=0.1"],
                        "Option 'tmin' is not accepted"),
                       (["--config", str(typo)], "does not accept option 'data.batchsize'")):
        with pytest.raises(SystemExit) as exit_:
            build_cli(["fit", *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err
        assert err.startswith("usage: pdlightning fit [--config CONFIG] [options]\n"), err[:300]
        assert "pdlightning fit --help" in err and len(err.splitlines()) < 15, err


def test_a_value_a_class_refuses_is_one_line_and_no_second_optimizer_exists(tmp_path: Path, capsys):
    from pdlightning.cli import build_cli, parse_config

    args = smoke_args(tmp_path)[1:]
    for bad, said in (("--data.batch_size=0", "data.batch_size must be >= 1, got 0"),
                      ("--data.max_pads=-3", "data.max_pads must be >= 0, got -3"),
                      ("--data.tag_preset=papr", "unknown tag preset 'papr'")):
        with pytest.raises(SystemExit, match=f"^pdlightning: error: {said}"):
            build_cli([*args, bad], run=False)
    for attn, said in (("flex_attention", "'flex_attention' is for GPUs"),  # smoke.yaml trains on the CPU
                       ("flash_attention_2", "'flash_attention_2' cannot take the hybrid attention mask")):
        with pytest.raises(SystemExit, match=f"^pdlightning fit: error: --model.backbone.attn_implementation {said}"):
            build_cli(["fit", *args, f"--model.backbone.attn_implementation={attn}"])  # exits before building
    # a checkpoint path that is not there, or a directory, is named before anything is built
    (tmp_path / "checkpoints").mkdir()
    for sub, ckpt, said in (("validate", tmp_path / "checkpoints", "is a directory: name a .ckpt file in it"),
                            ("test", tmp_path / "nope.ckpt", "no such checkpoint")):
        with pytest.raises(SystemExit, match=f"^pdlightning {sub}: error: --ckpt_path .* {said}"):
            build_cli([sub, *args, f"--ckpt_path={ckpt}"])
    # predict's knobs are checked against the decoder it would use, named or not (and with no
    # checkpoint, the command says the model is untrained)
    with pytest.raises(SystemExit, match=r"^pdlightning predict: error: model.predict: .*keyword argument 'r'"):
        build_cli(["predict", *args, "--model.predict.args={r: 0.5}"])
    assert "no --ckpt_path, so the model is freshly initialised (untrained)" in capsys.readouterr().err
    # the module's optimiser and per-stage schedule are the only ones: no top-level --optimizer replaces them
    with pytest.raises(SystemExit):
        parse_config([*args, "--optimizer=torch.optim.SGD"])
    assert parse_config([*args, "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.1"]).model.optimizer


def test_ckpt_path_last_looks_where_the_logger_writes_too(tmp_path: Path):
    """Moving a run with ``--trainer.default_root_dir`` alone leaves the config's logger
    writing elsewhere (checkpoints and export included); ``last`` is found there."""
    from pdlightning.cli import PDLightningCLI
    from pdlightning.data.datamodule import PlannedDataModule
    from pdlightning.model.module import PlannedDiffusionModule

    class Resolved(Exception):
        pass

    class StopBeforeBuilding(PDLightningCLI):
        def instantiate_classes(self) -> None:
            raise Resolved(self.config.validate.ckpt_path)

    root, logs = tmp_path / "root", tmp_path / "logs"
    args = ["validate", "--config", str(ROOT / "configs/smoke.yaml"), f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={logs}", "--ckpt_path=last"]
    with pytest.raises(SystemExit, match=f"no last.ckpt under {logs} or {root}$"):
        StopBeforeBuilding(PlannedDiffusionModule, PlannedDataModule, args=args)
    older, newer = (logs / f"smoke/version_{v}/checkpoints/last.ckpt" for v in (0, 1))
    for ckpt in (older, newer):
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    os.utime(older, (1, 1))
    with pytest.raises(Resolved) as found:
        StopBeforeBuilding(PlannedDiffusionModule, PlannedDataModule, args=args)
    assert found.value.args[0] == str(newer)


def test_a_tokenizer_path_is_loaded_as_saved_and_checked(tmp_path: Path):
    from pdlightning.cli import build_cli, parse_config
    from pdlightning.data.datamodule import PlannedDataModule

    cache = str(ROOT / ".cache/pdlightning")
    bundled = PlannedDataModule(cache_dir=cache, bundled_sizes={"train": 40, "validation": 8, "test": 8})
    model_dir = tmp_path / "model"
    bundled.tokenizer.save_pretrained(model_dir)
    (model_dir / "config.json").write_text('{"model_type": "qwen2"}')  # AutoTokenizer would pick Qwen2's class
    text = "Name: Ann Lee\nAge: 31 and 100 grams"
    loaded = PlannedDataModule(source="bundled", tokenizer_path=str(model_dir), cache_dir=cache,
                               bundled_sizes={"train": 40, "validation": 8, "test": 8})
    assert loaded.tokenizer.encode(text, add_special_tokens=False) == bundled.tokenizer.encode(
        text, add_special_tokens=False)
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only/config.json").write_text('{"model_type": "qwen2"}')
    args = smoke_args(tmp_path)[1:]
    for path, said in ((tmp_path / "weights_only", "has no tokenizer files"), (tmp_path / "nowhere", "is not a directory")):
        with pytest.raises(SystemExit, match=f"^pdlightning: error: data.tokenizer_path: .*{said}"):
            build_cli([*args, f"--data.tokenizer_path={path}"], run=False)
    with pytest.raises(SystemExit, match=r"^pdlightning: error: '.*tiny-pretraind' is not a model directory"):
        build_cli([*args, f"--model.backbone.pretrained={tmp_path / 'tiny-pretraind'}"], run=False)
    # a misspelt data file is named before any model is built
    with pytest.raises(SystemExit, match=r"^pdlightning: error: data.source: '.*slimorca.jsnl' does not exist"):
        build_cli([*args, f"--data.source={tmp_path / 'slimorca.jsnl'}", f"--data.tokenizer_path={model_dir}"],
                  run=False)
    # rows in a shape no reader knows: the error says which fields a row needs
    odd = tmp_path / "qa.jsonl"
    odd.write_text("".join(f'{{"question": "Q{i}", "answer": "A{i}"}}\n' for i in range(20)))
    dm = PlannedDataModule(source=str(odd), tokenizer_path=str(model_dir), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"all \d+ training rows were discarded \({'bad_row': \d+}\); "
                                         r"bad_row: a row needs a prompt \('prompt' or 'instruction'\)"):
        dm.setup()
    # one switch trusts a checkpoint's code, its model's and its tokenizer's
    assert parse_config([*args, "--model.backbone.trust_remote_code=true"]).data.trust_remote_code is True
    assert parse_config(args).data.trust_remote_code is False


def test_a_max_length_no_training_row_fits_is_an_error_not_an_untrained_model(tmp_path: Path):
    from pdlightning.cli import build_cli
    from pdlightning.data.datamodule import PlannedDataModule

    dm = PlannedDataModule(cache_dir=str(ROOT / ".cache/pdlightning"), max_length=4,
                           bundled_sizes={"train": 40, "validation": 8, "test": 8})
    with pytest.raises(ValueError, match=r"all 40 training rows were discarded \({'too_long': 40}\).*max_length"):
        dm.setup()
    # from the command line: one line naming the fix, and no model exported
    with pytest.raises(SystemExit, match=r"^pdlightning fit: error: data: all \d+ training rows were discarded"):
        build_cli(smoke_args(tmp_path, "--data.max_length=4"))
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.ckpt"))


def test_export_of_a_missing_checkpoint_says_so_before_building_anything(tmp_path: Path, capsys):
    from pdlightning.cli import main

    missing = tmp_path / "last.ckpt"
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--config", str(ROOT / "configs/smoke.yaml"), "--ckpt_path", str(missing),
              "--output", str(tmp_path / "hf")])
    assert exit_.value.code == 2 and f"{missing}: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    for damaged in (b"PK\x03\x04 cut short", b"not a checkpoint"):  # a truncated zip, any other file
        missing.write_bytes(damaged)
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--config", str(ROOT / "configs/smoke.yaml"), "--ckpt_path", str(missing),
                  "--output", str(tmp_path / "hf")])
        assert exit_.value.code == 2 and f"{missing}: not a readable Lightning checkpoint (" in capsys.readouterr().err
        assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_smoke_config_lowers_the_loss_and_exports(tmp_path: Path):
    out = run_cli(smoke_args(tmp_path), ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    hf = next(tmp_path.rglob("hf"))
    assert (hf / "model.safetensors").exists() and (hf / "tag_spec.json").exists()
    # `pdlightning export` from the config fit saved (it holds fit's ckpt_path) gives the same weights
    from pdlightning.cli import main

    (saved,) = tmp_path.rglob("config.yaml")
    (last,) = tmp_path.rglob("last.ckpt")
    assert "ckpt_path" in saved.read_text()
    assert main(["export", "--config", str(saved), "--ckpt_path", str(last), "--output", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again/model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    # and from the directory FSDP's sharded state_dict_type writes (made here as Lightning's FSDPStrategy
    # makes it: torch.distributed.checkpoint of {"model": ...}, the rest in meta.pt; FSDP needs a GPU)
    from torch.distributed.checkpoint import save

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    sharded = tmp_path / "sharded/last.ckpt"
    sharded.mkdir(parents=True)
    save({"model": checkpoint.pop("state_dict"), "optimizer_0": checkpoint.pop("optimizer_states")[0]},
         checkpoint_id=sharded)
    torch.save(checkpoint, sharded / "meta.pt")
    assert main(["export", "--config", str(saved), "--ckpt_path", str(sharded), "--output", str(tmp_path / "fsdp")]) == 0
    assert (tmp_path / "fsdp/model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()


def test_export_hf_under_fsdp_names_the_export_command_instead_of_hanging(tmp_path: Path, capsys):
    """Under FSDP rank 0 holds a shard: saving there alone would hang the other ranks."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from pdlightning.model.callbacks import ExportHF

    class Module:
        def export(self, directory: str) -> str:
            raise AssertionError("exported a sharded model")

    callback = ExportHF(dirpath=str(tmp_path / "hf"))
    trainer = SimpleNamespace(callbacks=[callback], strategy=FSDPStrategy(), is_global_zero=True,
                              log_dir=str(tmp_path / "version_0"), default_root_dir=str(tmp_path))
    callback.on_fit_end(trainer, Module())
    said = capsys.readouterr().out
    assert f"pdlightning export --config {tmp_path}/version_0/config.yaml" in said
    assert f"--ckpt_path {tmp_path}/version_0/checkpoints/last.ckpt --output {tmp_path / 'hf'}" in said


@pytest.mark.slow
def test_resume_after_a_kill_continues_from_the_last_checkpoint(tmp_path: Path):
    args = smoke_args(
        tmp_path, "--trainer.max_epochs=4", "--trainer.limit_train_batches=6",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_last=true",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pdlightning.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    last = None
    while time.time() < deadline:
        found = sorted(tmp_path.rglob("last.ckpt"))
        if found:
            step = torch.load(found[0], map_location="cpu", weights_only=False)["global_step"]
            if step >= 8:  # mid-way through epoch 2 of 4
                last = found[0]
                break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last is not None, "no checkpoint appeared before the kill"
    # the smoke config's per-epoch checkpoint writes a last file too (last-v1.ckpt or
    # last.ckpt, whichever callback comes second); `--ckpt_path last` takes the newest
    last = max(tmp_path.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert killed_at < 24
    out = run_cli([*args, "--ckpt_path=last"], ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--ckpt_path last: {last}" in out.stdout
    newest = max(tmp_path.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    final = torch.load(newest, map_location="cpu", weights_only=False)
    assert final["global_step"] == 24  # 4 epochs x 6 batches, counted across the kill
    logged = [int(r["step"]) for r in metrics(newest.parents[1]) if r.get("train/loss")]
    assert min(logged) > killed_at  # the resumed run went on from the checkpoint, not from 0


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path: Path):
    common = [
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
        "--trainer.use_distributed_sampler=false", "--data.length_grouped=false",
        "--data.stages=[{mode: autoregressive, epochs: null}]",
        "--model.optimizer.init_args.lr=0.001",
    ]
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    a = run_cli(smoke_args(single, *common, "--data.batch_size=8",
                           f"--trainer.callbacks.init_args.dirpath={single / 'hf'}"), ROOT)
    assert a.returncode == 0, a.stderr[-3000:]
    # the config's own export, to <log_dir>/hf: finding log_dir is a collective every rank must join
    b = run_cli(smoke_args(ddp, *common, "--data.batch_size=4", "--trainer.devices=2", "--trainer.strategy=ddp"), ROOT)
    assert b.returncode == 0, b.stderr[-3000:]
    (exported,) = ddp.rglob("hf/model.safetensors")
    from safetensors.torch import load_file

    from pdlightning.model.backbone import build_backbone

    wa = load_file(str(single / "hf/model.safetensors"))
    wb = load_file(str(exported))
    cfg = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())["model"]["backbone"]["config"]
    init = build_backbone(config=cfg, vocab_size=wa["model.embed_tokens.weight"].shape[0]).state_dict()
    moved = sum((wa[k] - init[k]).norm() ** 2 for k in wa) ** 0.5
    apart = sum((wa[k] - wb[k]).norm() ** 2 for k in wa) ** 0.5
    assert moved > 0
    assert apart < 0.05 * moved, f"DDP differs from one process by {apart:.3g} (training moved {moved:.3g})"


def _tiny_module(run_seed: int = 0, **kwargs):
    from pdlightning.model.module import BackboneConfig, PlannedDiffusionModule
    from pdlightning.tags import TagSpec
    from pdlightning.tokenizer import build_tokenizer

    texts = ["Name: Ann Lee\nAge: 31", "Ann is 31 years old. She lives in Paris."] * 20
    tokenizer, spec = build_tokenizer(texts, TagSpec(), vocab_size=300)
    config = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    torch.manual_seed(run_seed)  # what seed_everything does before LightningCLI builds the model
    return PlannedDiffusionModule(tokenizer=tokenizer, spec=spec, backbone=BackboneConfig(config=config), **kwargs)


def test_the_runs_seed_draws_the_initial_weights_and_noise_unless_the_model_names_its_own():
    def weights(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    a, b, pinned = _tiny_module(0), _tiny_module(1), _tiny_module(1, seed=0)
    assert (a.seed, b.seed, pinned.seed) == (0, 1, 0)  # the noise generator is seeded from it
    assert not torch.equal(weights(a), weights(b))
    assert torch.equal(weights(a), weights(pinned))


def _one_span_example(module) -> tuple[list[int], list[int], list[int]]:
    """A prompt, a response with one plan entry and one span (its words and a pad), and the words."""
    tok, spec = module.tokenizer, module.spec
    prompt = tok.encode("Name: Ann Lee\nAge: 31\n", add_special_tokens=False)
    words = tok.encode("Ann is 31 years old.", add_special_tokens=False)
    po, pc, so, sc = (spec.id(n) for n in ("plan_open", "plan_close", "span_open", "span_close"))
    return prompt, [po, *words[:1], pc, so, *words, spec.id("pad"), sc, spec.id("end")], words


def test_the_output_head_runs_only_where_a_token_is_scored_with_the_same_loss_and_gradients():
    from pdlightning.data.collate import collate

    module = _tiny_module()
    spec = module.spec
    prompt, response, words = _one_span_example(module)
    batch = collate([prompt] * 3, [response] * 3, spec, "planned")
    runs = []
    for separable in (True, False):
        module._separable_head = separable
        module.zero_grad()
        terms = module.loss_terms(batch, torch.Generator().manual_seed(0))
        terms.loss.backward()
        runs.append((terms, [p.grad.clone() for p in module.parameters()]))
    (fast, fast_grads), (full, full_grads) = runs
    assert fast.masked_count > 0 and fast.masked_count == full.masked_count
    assert fast.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast_grads, full_grads, strict=True))


def test_a_plain_ar_batch_trains_on_the_backbones_causal_attention_with_the_masked_loss_and_gradients():
    """Right-padded AR rows of different lengths: no 4D mask goes to the backbone, and the loss and
    gradients are those of the batch's causal-and-padding mask, with either output head."""
    import torch.nn.functional as F

    from pdlightning.data.collate import IGNORE, collate

    module = _tiny_module()
    tok = module.tokenizer
    prompts = [tok.encode(p, add_special_tokens=False) for p in ("Name: Ann Lee\n", "Age: 31\nName: Ann\n")]
    answers = [tok.encode(a, add_special_tokens=False) + [module.spec.id("end")]
               for a in ("Ann is 31 years old.", "She lives in Paris. Ann Lee is 31.")]
    batch = collate(prompts, answers, module.spec, "autoregressive")
    assert batch.lengths.unique().numel() == 2  # one row is padded

    def grads() -> list[torch.Tensor]:
        out = [q.grad.clone() for q in module.parameters()]
        module.zero_grad()
        return out

    # the reference: the backbone under the batch's own 4D mask, every labelled token's cross-entropy
    logits = module.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labelled = batch.ar_labels != IGNORE
    reference = F.cross_entropy(logits[labelled], batch.ar_labels[labelled])
    reference.backward()
    reference_grads = grads()
    seen = []
    module.backbone.base_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    for separable in (True, False):
        module._separable_head = separable
        terms = module.loss_terms(batch, torch.Generator().manual_seed(0))
        terms.loss.backward()
        assert seen[-1] is None
        assert terms.ar_count == labelled.sum() == sum(len(a) for a in answers)
        assert terms.loss.item() == pytest.approx(reference.item(), rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(), reference_grads, strict=True))

def test_the_planned_ar_warm_up_masks_nothing_and_scores_every_labelled_token():
    from pdlightning.data.collate import IGNORE, collate
    from pdlightning.data.datamodule import Stage
    from pdlightning.model.module import PredictConfig

    module = _tiny_module()
    spec = module.spec
    prompt, response, words = _one_span_example(module)
    batch = collate([prompt] * 2, [response] * 2, spec, "planned_ar")
    a = module.loss_terms(batch, torch.Generator().manual_seed(0))
    b = module.loss_terms(batch, torch.Generator().manual_seed(1))
    # per row: <topic>, its word, </topic> and the end tag on the stream; the span's words and its pad
    assert a.masked_count == 0 and a.ar_count == (batch.ar_labels != IGNORE).sum() == 2 * (4 + len(words) + 1)
    assert a.loss.item() == b.loss.item()  # no noise drawn
    assert module.loss_terms(collate([prompt], [response], spec, "planned"), torch.Generator()).masked_count > 0

    class Data:
        stages, dense = [Stage("planned_ar", None)], False

    with pytest.raises(ValueError, match="planned_ar, is a warm-up"):
        PredictConfig().strategy(Data())


def test_an_output_head_the_forward_does_more_than_apply_is_not_split():
    module = _tiny_module()
    assert module._head_is_separable()  # Qwen2: logits = lm_head(last hidden state)
    module = _tiny_module()

    def scale(_, __, out):  # what Cohere's forward does after the head (logit_scale)
        out.logits = 0.5 * out.logits

    module.backbone.register_forward_hook(scale)
    assert not module._head_is_separable()
    assert module.backbone.training  # the check leaves the mode as it found it


def test_a_planned_ar_warm_up_is_set_from_the_command_line():
    from pdlightning.cli import parse_config

    parsed = parse_config(["--config", str(ROOT / "configs/tiny.yaml"),
                           "--data.stages=[{mode: planned_ar, epochs: 8}, {mode: planned, epochs: null}]"])
    assert [(s.mode, s.epochs) for s in parsed.data.stages] == [("planned_ar", 8), ("planned", None)]
    parsed = parse_config(["--config", str(ROOT / "configs/tiny.yaml"),
                           "--data.stages=[{mode: planned, epochs: null, ar_fraction: 0.25}]"])
    assert parsed.data.stages[0].ar_fraction == 0.25
    with pytest.raises(SystemExit):
        parse_config(["--config", str(ROOT / "configs/tiny.yaml"), "--data.stages=[{mode: planned_causal}]"])


def test_objective_options_are_set_from_the_command_line_and_checked():
    from pdlightning.cli import parse_config
    from pdlightning.model.module import ObjectiveConfig

    smoke = ["--config", str(ROOT / "configs/smoke.yaml")]
    parsed = parse_config([*smoke, "--model.objective.t_sampling=stratified", "--model.objective.t_min=0.05"])
    assert (parsed.model.objective.t_sampling, parsed.model.objective.t_min) == ("stratified", 0.05)
    with pytest.raises(SystemExit):
        parse_config([*smoke, "--model.objective.t_sampling=sobol"])
    with pytest.raises(ValueError, match="t_min"):
        ObjectiveConfig(t_min=1.0)
    with pytest.raises(ValueError, match="t_sampling"):
        ObjectiveConfig(t_sampling="sobol")
