"""Training callbacks: export a HF directory when fitting ends, and a small
generation check on validation prompts with a configured decoder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class ExportHF(L.Callback):
    """Write the trained model as a HF directory when ``fit`` ends (rank 0).

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
        last = [c for c in trainer.callbacks if isinstance(c, ExportHF)][-1]
        if trainer.is_global_zero and self is last:
            out = pl_module.export(str(self.target(trainer)))
            log.info("exported the trained model to %s", out)
            print(f"exported the trained model to {out}")


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
