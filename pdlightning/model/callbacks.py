"""Callbacks: export a HF directory when fitting ends, write ``predict``'s
generations, and a small generation check on validation prompts with a
configured decoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


def _is_last_of_kind(callback: L.Callback, kind: type, trainer: L.Trainer) -> bool:
    """Whether ``callback`` is the trainer's last ``kind``: only that one acts, so
    appending one on the command line redirects a config's instead of doubling it."""
    return [c for c in trainer.callbacks if isinstance(c, kind)][-1] is callback


class ExportHF(L.Callback):
    """Write the trained model as a HF directory when ``fit`` ends (rank 0).

    Under FSDP it prints the ``pdlightning export`` command that writes the
    directory from the last (sharded) checkpoint instead.

    If the trainer has several, only the last one writes: appending one on the
    command line (``--trainer.callbacks+=...ExportHF --trainer.callbacks.dirpath=DIR``)
    redirects a config's export instead of writing the model twice.

    Args:
        dirpath: Output directory; default ``<log_dir>/hf``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def target(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf"

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if not _is_last_of_kind(self, ExportHF, trainer):
            return
        target = self.target(trainer)  # on every rank: trainer.log_dir is a broadcast from rank 0
        if isinstance(trainer.strategy, FSDPStrategy):
            # the weights are sharded over the processes: rank 0 alone cannot save them (gathering
            # them there would hang the others); the checkpoint holds them all, and export reads it
            if trainer.is_global_zero:
                log_dir = trainer.log_dir or trainer.default_root_dir
                print(f"ExportHF: FSDP shards the model, so it is exported from its checkpoint: pdlightning export "
                      f"--config {log_dir}/config.yaml --ckpt_path {log_dir}/checkpoints/last.ckpt --output {target}")
            return
        if trainer.is_global_zero:
            out = pl_module.export(str(target))
            log.info("exported the trained model to %s", out)
            print(f"exported the trained model to {out}")


class WriteGenerations(BasePredictionWriter):
    """Write ``predict``'s generations as JSON lines, batch by batch, and print a summary.

    Each line is one prompt's result (``index``, ``prompt``, ``text``, plan and
    spans, counters, and ``fact_accuracy`` where the data has answer keys).
    With several processes each writes its own file, ``<stem>.rank<N>.jsonl``.
    As with :class:`ExportHF`, only the last one of the trainer's writes, so
    ``--trainer.callbacks+=pdlightning.model.callbacks.WriteGenerations
    --trainer.callbacks.path=FILE`` redirects a config's.

    Args:
        path: Output file; default ``<log_dir>/predictions.jsonl``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._file: Any = None
        self._count, self._facts, self._scored = 0, 0.0, 0

    def target(self, trainer: L.Trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not _is_last_of_kind(self, WriteGenerations, trainer):
            return
        out = self.target(trainer)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._file = out.open("w")
        self._count, self._facts, self._scored = 0, 0.0, 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: Any, prediction: Any, batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self._file is None:  # not the last writer
            return
        for row in prediction:
            self._file.write(json.dumps(row) + "\n")
            self._count += 1
            if row.get("fact_accuracy") is not None:
                self._facts += row["fact_accuracy"]
                self._scored += 1
        self._file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        facts = f"; fact accuracy {100 * self._facts / self._scored:.1f}%" if self._scored else ""
        print(f"wrote {self._count} generations to {self.target(trainer)}{facts}")


class GenerationCheck(L.Callback):
    """Every ``every_n_epochs``, decode a few validation prompts and log fact accuracy.

    Args:
        decoder: Short name or class path of a decoding strategy.
        decoder_args: Its constructor arguments.
        num_prompts: Validation prompts to decode.
        every_n_epochs: How often (in epochs).
        only_modes: Run only while the current stage's mode is one of these.
    """

    def __init__(
        self,
        decoder: str = "planned",
        decoder_args: dict[str, Any] | None = None,
        num_prompts: int = 8,
        every_n_epochs: int = 1,
        only_modes: list[str] | None = None,
    ) -> None:
        self.decoder, self.decoder_args = decoder, dict(decoder_args or {})
        self.num_prompts, self.every_n_epochs = num_prompts, every_n_epochs
        self.only_modes = only_modes

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        dm = trainer.datamodule
        if self.only_modes is not None and dm.stage_at(trainer.current_epoch).mode not in self.only_modes:
            return
        from pdlightning.data.synthetic import fact_accuracy
        from pdlightning.decoding import get_strategy

        rows = dm.rows("validation")
        n = min(self.num_prompts, len(rows))
        if n == 0 or rows[0].get("answer_keys") is None:
            return
        strategy = get_strategy(self.decoder, **self.decoder_args)
        was_training = pl_module.training
        pl_module.eval()
        gens = strategy.generate(
            pl_module.language_model(), [rows[i]["prompt_ids"] for i in range(n)],
            torch.Generator().manual_seed(0),
        )
        pl_module.train(was_training)
        score = sum(fact_accuracy(g.text, rows[i]["answer_keys"]) for i, g in enumerate(gens)) / n
        path = sum(g.counters.critical_path for g in gens) / n
        pl_module.log(f"val/fact_accuracy_{strategy.name}", score)
        pl_module.log(f"val/critical_path_{strategy.name}", float(path))
