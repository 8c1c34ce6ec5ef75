"""The ``pdlightning`` command.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands
(``--config configs/<name>.yaml`` and any ``--model.*`` / ``--data.*`` /
``--trainer.*`` override). The others are small argparse programs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: subcommand -> (module, function, one-line help)
OTHER_SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "export": ("pdlightning.cli", "export_main", "write a trained checkpoint as a HF directory"),
    "generate": ("pdlightning.generate", "main", "decode prompts with any decoding strategy"),
    "annotate": ("pdlightning.data.annotate", "main", "tag plain responses (heuristic or LLM annotator)"),
    "bench": ("pdlightning.eval.bench", "main", "train and compare decoders on quality, latency, critical path"),
    "evaluate": ("pdlightning.eval.alpaca_cli", "main", "AlpacaEval outputs and length-controlled win rate"),
    "demo": ("pdlightning.eval.demo", "main", "the quick start: train the tiny PD and AR models, compare them"),
    "replicates": ("pdlightning.eval.replicates", "main", "bench runs that differ only in seed: mean, sd and range"),
}


def _init_arg(parsed: object, name: str) -> Any:
    """A field of a parsed class argument (``model.backbone``, a logger), None when unset."""
    args = getattr(parsed, "init_args", parsed)  # jsonargparse gives the class as class_path + init_args
    return getattr(args, name, None)


def run_roots(trainer: Any) -> list[Path]:
    """Where a run writes: its loggers' ``save_dir`` (logs, checkpoints and the HF export
    go under it) and ``trainer.default_root_dir``; ``.`` when neither is set."""
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    dirs = [_init_arg(lg, "save_dir") for lg in loggers if not isinstance(lg, bool | None)]
    dirs.append(trainer.get("default_root_dir"))
    return [Path(d) for d in dict.fromkeys(dirs) if d] or [Path(".")]


def _trusts_remote_code(backbone: object) -> bool:
    """``data.trust_remote_code`` from ``model.backbone.trust_remote_code``: one switch for
    the checkpoint's code, its model's and its tokenizer's."""
    return bool(_init_arg(backbone, "trust_remote_code"))


class _ShortUsageParser(LightningArgumentParser):
    """A parse error is the error and a pointer to ``--help``, not a usage line of
    every option (about 70 lines for ``fit``) above them."""

    def print_usage(self, file=None) -> None:  # type: ignore[no-untyped-def]
        prog = self.prog.replace(" [options]", "")
        (file or sys.stdout).write(f"usage: {prog} [--config CONFIG] [options]\n")


class PDLightningCLI(LightningCLI):
    """LightningCLI with the tokenizer and tag spec linked from data to model, the
    model's own optimiser and per-stage schedule (``model.optimizer``,
    ``model.schedule``: no second, top-level ``--optimizer`` that would silently
    replace them), and a value a class refuses (or data the config selects that
    cannot train) reported as one line."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", _ShortUsageParser)
        kwargs.setdefault("parser_kwargs", {"prog": "pdlightning"})  # also when run as python -m or from a test
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            if self.subcommand == "predict":  # the decoder's knobs, before any data is prepared
                self.model.predict_config.strategy(self.datamodule)
        except ValueError as e:  # e.g. data.batch_size: 0, an unknown tag preset: the config's fault, not a crash
            raise self._config_error(e) from None

    def _run_subcommand(self, subcommand: str) -> None:
        from pdlightning.data.datamodule import DataError

        try:
            super()._run_subcommand(subcommand)
        except DataError as e:  # e.g. a max_length no training row fits
            raise self._config_error(e) from None

    def _config_error(self, message: object) -> SystemExit:
        """The one-line exit of a config a class or check refuses."""
        return SystemExit(f"{' '.join(filter(None, ('pdlightning', self.subcommand)))}: error: {message}")

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")
        parser.link_arguments("data.spec", "model.spec", apply_on="instantiate")
        parser.link_arguments("model.backbone", "data.trust_remote_code", compute_fn=_trusts_remote_code)

    def before_instantiate_classes(self) -> None:
        """Refuse an attention the run's device cannot use, before anything is built;
        ``--ckpt_path last`` resumes from the newest ``last.ckpt`` under the run's roots
        (:func:`run_roots`: where the logger writes, and ``default_root_dir``).

        Lightning looks for ``last`` only in the checkpoint directory of the new
        run, which a versioned logger makes a fresh, empty one.
        """
        cfg = self.config.get(self.subcommand) if self.subcommand else None
        if cfg is None:
            return
        self._check_attention(cfg)
        ckpt = cfg.get("ckpt_path")
        if (self.subcommand in ("validate", "test", "predict") and ckpt is None
                and not _init_arg(cfg.get("model.backbone"), "pretrained")):
            print(f"pdlightning {self.subcommand}: no --ckpt_path, so the model is freshly initialised (untrained); "
                  "pass --ckpt_path last, or a .ckpt", file=sys.stderr)
        if ckpt is not None and ckpt not in ("last", "best", "hpc") and not str(ckpt).startswith("registry"):
            path = Path(ckpt)
            if not path.exists():
                raise self._config_error(f"--ckpt_path {ckpt}: no such checkpoint (fit saves them under "
                                         "<log dir>/checkpoints/; --ckpt_path last finds the newest)")
            if path.is_dir() and not (path / "meta.pt").is_file():  # a sharded FSDP checkpoint is a directory
                raise self._config_error(f"--ckpt_path {ckpt} is a directory: name a .ckpt file in it, "
                                         "or --ckpt_path last")
        if ckpt != "last":
            return
        roots = run_roots(cfg.trainer)
        found = sorted({p.resolve(): p for r in roots for p in r.rglob("last*.ckpt")}.values(),
                       key=lambda p: p.stat().st_mtime)  # a root inside another finds a file twice
        if not found:
            raise SystemExit(f"--ckpt_path last: no last.ckpt under {' or '.join(map(str, roots))}")
        cfg.ckpt_path = str(found[-1])
        print(f"--ckpt_path last: {found[-1]}")


    def _check_attention(self, cfg) -> None:  # type: ignore[no-untyped-def]
        import torch

        from pdlightning.masks import check_attention

        attn = cfg.get("model.backbone.attn_implementation")
        accelerator = str(cfg.trainer.get("accelerator") or "auto")
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        try:
            check_attention(attn, "cpu" if on_cpu else None)
        except ValueError as e:
            raise self._config_error(f"--model.backbone.{e}") from None


def build_cli(args: list[str] | None, run: bool = True) -> PDLightningCLI:
    """Instantiate the Lightning CLI (``run=False``: parse and build, do not run)."""
    from pdlightning.data.datamodule import PlannedDataModule
    from pdlightning.model.module import PlannedDiffusionModule

    return PDLightningCLI(
        PlannedDiffusionModule,
        PlannedDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


class _Parsed(Exception):
    def __init__(self, config: object) -> None:
        self.config = config


def parse_config(args: list[str]) -> object:
    """Parse and validate a training command line (e.g. ``["--config", path]``) without building anything."""

    class ParseOnly(PDLightningCLI):
        def before_instantiate_classes(self) -> None:
            raise _Parsed(self.config)

    from pdlightning.data.datamodule import PlannedDataModule
    from pdlightning.model.module import PlannedDiffusionModule

    try:
        ParseOnly(PlannedDiffusionModule, PlannedDataModule, args=args, run=False)
    except _Parsed as done:
        return done.config
    raise AssertionError("unreachable")


def _without_run_arguments(path: str) -> str:
    """A config for building the model: the path itself, or, for the config.yaml that
    ``fit`` saved (it also holds fit's own ``ckpt_path`` and ``weights_only``, which
    build nothing and which a parser without a subcommand refuses), its content
    without those keys."""
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # LightningCLI names the problem
    if not isinstance(content, dict) or not {"ckpt_path", "weights_only"} & content.keys():
        return path
    return yaml.safe_dump({k: v for k, v in content.items() if k not in ("ckpt_path", "weights_only")})


def _sharded_weights(directory: Path) -> dict:
    """The model weights of a sharded FSDP checkpoint, gathered whole on the CPU.

    FSDP with ``state_dict_type: sharded`` (configs/dream7b.yaml) saves each
    checkpoint as a ``torch.distributed.checkpoint`` directory plus ``meta.pt``.
    This is what Lightning's own ``python -m
    lightning.pytorch.utilities.consolidate_checkpoint`` reads, in one process,
    no GPU needed; the whole model must fit in CPU memory.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(directory)["model"]


def export_main(argv: list[str]) -> int:
    """``pdlightning export --config CFG --ckpt_path CKPT --output DIR``."""
    import argparse
    import pickle

    import torch

    p = argparse.ArgumentParser(prog="pdlightning export", description=OTHER_SUBCOMMANDS["export"][2])
    p.add_argument("--config", required=True, action="append",
                   help="the YAML(s) the model was trained with, or the config.yaml fit saved in its log dir")
    p.add_argument("--ckpt_path", required=True,
                   help="a Lightning checkpoint (.ckpt), or the directory FSDP's sharded state_dict_type writes")
    p.add_argument("--output", required=True, help="directory to write")
    p.epilog = ("Any other option (--model.X=V, --data.X=V) is passed on, as the training run had it "
                "on its command line; the config.yaml fit saved already holds them.")
    a, overrides = p.parse_known_args(argv)
    ckpt = Path(a.ckpt_path)
    if not ckpt.exists():
        p.error(f"{a.ckpt_path}: checkpoint not found (fit saves them under <log dir>/checkpoints/)")
    if ckpt.is_dir() and not (ckpt / "meta.pt").is_file():
        p.error(f"{a.ckpt_path}: a directory, but not a sharded FSDP checkpoint (no meta.pt in it)")
    try:  # read first: a damaged file is named before a model is built
        state = (_sharded_weights(ckpt) if ckpt.is_dir()
                 else torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    except (RuntimeError, OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        p.error(f"{a.ckpt_path}: not a readable Lightning checkpoint ({reason})")
    args = [x for c in a.config for x in ("--config", _without_run_arguments(c))]
    cli = build_cli([*args, *overrides], run=False)
    cli.model.load_state_dict(state)
    out = cli.model.export(a.output)
    print(f"exported {a.ckpt_path} to {out}")
    return 0


def _usage() -> str:
    w = max(map(len, [*LIGHTNING_SUBCOMMANDS, *OTHER_SUBCOMMANDS]))
    lines = ["usage: pdlightning <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<{w}} LightningCLI {name} (--config configs/<name>.yaml)" for name in LIGHTNING_SUBCOMMANDS]
    lines += [f"  {name:<{w}} {info[2]}" for name, info in OTHER_SUBCOMMANDS.items()]
    lines += ["", "pdlightning <subcommand> --help shows the options of one subcommand."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in OTHER_SUBCOMMANDS:
        module, func, _ = OTHER_SUBCOMMANDS[argv[0]]
        fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
        return int(fn(argv[1:]) or 0)
    if argv[0] not in LIGHTNING_SUBCOMMANDS:
        print(f"pdlightning: unknown subcommand {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    build_cli(None if from_command_line else argv)  # None: LightningCLI reads sys.argv (no warning)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
