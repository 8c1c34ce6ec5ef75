"""The LightningModule: holds the backbone and the objective; decoding is
delegated to a strategy object (``pdlightning.decoding``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from pdlightning.data.collate import NOISED, Batch
from pdlightning.masks import for_attention
from pdlightning.model.backbone import AttnImplementation, LogitsConvention, build_backbone
from pdlightning.model.objective import TSampling, add_noise, objective_loss
from pdlightning.tags import TagSpec


@dataclass
class BackboneConfig:
    """Which backbone to train.

    Attributes:
        pretrained: Local checkpoint directory (safetensors); None = from ``config``.
        config: Config fields for a model trained from scratch (``model_type`` included);
            None = the tiny Qwen2-style default.
        attn_implementation: ``sdpa``, ``eager`` or ``flex_attention`` (GPUs);
            ``flash_attention_2`` is refused with the reason (it cannot take the hybrid mask).
        dtype: Weights dtype (``bfloat16``...); None keeps the default.
        trust_remote_code: Allow a checkpoint's own modelling code.
        gradient_checkpointing: Trade compute for memory (large backbones).
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    attn_implementation: AttnImplementation = "sdpa"
    dtype: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class ObjectiveConfig:
    """Options of the training objective.

    Attributes:
        logits: ``shifted`` (token i scored at i-1) or ``aligned``.
        t_min: Masking rate drawn from ``U(t_min, 1)``.
        ar_loss_over_t: Also weight the AR term by 1/t (authors' code; paper: off).
        t_sampling: ``uniform`` (independent rates) or ``stratified`` (one rate
            per equal stratum of the batch: same expected loss, less variance).
    """

    logits: LogitsConvention = "shifted"
    t_min: float = 1e-3
    ar_loss_over_t: bool = False
    t_sampling: TSampling = "uniform"

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < 1:
            raise ValueError(f"objective.t_min must be in [0, 1), got {self.t_min}")
        if self.t_sampling not in ("uniform", "stratified"):
            raise ValueError(f"objective.t_sampling must be uniform or stratified, got {self.t_sampling!r}")


@dataclass
class Schedule:
    """Linear warm-up then linear decay, restarted at each training stage.

    Attributes:
        warmup_fraction: Fraction of each stage's steps spent warming up.
        final_fraction: Learning rate at the end of a stage, as a fraction of the peak.
        restart_per_stage: Restart warm-up and decay when the stage changes.
        stage_scales: Peak learning rate of each stage as a multiple of the
            optimiser's (e.g. ``[1.0, 0.5]``); None = 1 for every stage.
    """

    warmup_fraction: float = 0.05
    final_fraction: float = 0.0
    restart_per_stage: bool = True
    stage_scales: list[float] | None = None


@dataclass
class PredictConfig:
    """How ``pdlightning predict`` decodes the test prompts.

    Attributes:
        decoder: Short name or class path of a decoding strategy; None = the one
            that matches the last training stage (``planned``, ``dense_planned``
            when the data is dense, ``autoregressive`` or ``diffusion``).
        args: Its constructor arguments (``step_ratio``, ``max_new_tokens``...).
        seed: Seed of the decoder's sampling (each batch from ``seed + batch index``).
    """

    decoder: str | None = None
    args: dict[str, Any] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoder is not None:  # a misspelt decoder or knob is a config error, not a failure mid-run
            from pdlightning.decoding import get_strategy

            try:
                get_strategy(self.decoder, **(self.args or {}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"model.predict: {e}") from None

    def strategy(self, datamodule: Any = None) -> Any:
        """The strategy: ``decoder``, or the one of the data's last stage, with ``args``.

        Raises:
            ValueError: The strategy refuses ``args`` (a misspelt or out-of-range knob).
        """
        from pdlightning.decoding import get_strategy

        name = self.decoder
        if name is None:  # each objective's decoder shares its name
            name = datamodule.stages[-1].mode if datamodule is not None else "planned"
            if name == "planned_ar":
                raise ValueError("model.predict.decoder: the last training stage, planned_ar, is a warm-up "
                                 "with no decoder of its own; name one (e.g. planned, after a planned stage)")
            if name == "planned" and getattr(datamodule, "dense", False):
                name = "dense_planned"
        try:
            return get_strategy(name, **(self.args or {}))
        except TypeError as e:
            raise ValueError(f"model.predict: {e}") from None


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)


class PlannedDiffusionModule(L.LightningModule):
    """Trains a backbone with the planned-diffusion objective or a baseline's.

    The objective follows each batch's ``mode`` (set by the data module's
    current stage): ``planned``, ``autoregressive`` or ``diffusion``.

    Args:
        tokenizer: Linked from the data module (``data.tokenizer``).
        spec: Linked from the data module (``data.spec``).
        backbone: Which backbone.
        objective: Objective options.
        optimizer: Optimiser factory (AdamW by default).
        schedule: Learning-rate schedule (ignored when ``lr_scheduler`` is given).
        lr_scheduler: A scheduler factory replacing ``schedule``.
        seed: Seed of the initial weights (a backbone built from a config) and of
            the diffusion noise; None (the default) takes the run's seed
            (``seed_everything``), so a replicate with another seed draws both anew.
        predict: How ``predict`` decodes (the decoder and its knobs).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        spec: TagSpec | None = None,
        backbone: BackboneConfig | None = None,
        objective: ObjectiveConfig | None = None,
        optimizer: OptimizerCallable = _adamw,
        schedule: Schedule | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int | None = None,
        predict: PredictConfig | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is None or spec is None:
            raise ValueError("tokenizer and spec are required (LightningCLI links them from the data module)")
        # `predict` is a run-time choice, not the model's: LightningCLI applies a checkpoint's
        # hyperparameters over the command line's, so saving it would pin the decoder of `fit`
        self.save_hyperparameters(ignore=["tokenizer", "spec", "optimizer", "lr_scheduler", "predict"])
        self.tokenizer, self.spec = tokenizer, spec
        self.backbone_config = backbone or BackboneConfig()
        self.objective = objective or ObjectiveConfig()
        self.schedule = schedule or Schedule()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        # torch.initial_seed() is what seed_everything (LightningCLI's, before any class is built) set
        self.seed = torch.initial_seed() % 2**31 if seed is None else seed
        self.predict_config = predict or PredictConfig()
        bc = self.backbone_config
        self.backbone = build_backbone(
            pretrained=bc.pretrained,
            config=bc.config,
            vocab_size=len(tokenizer),
            attn_implementation=bc.attn_implementation,
            dtype=bc.dtype,
            trust_remote_code=bc.trust_remote_code,
            seed=self.seed,
        )
        if bc.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()
        self._noise_generator: torch.Generator | None = None
        self._separable_head: bool | None = None
        metrics = {
            "ar_loss": torchmetrics.SumMetric(),
            "ar_count": torchmetrics.SumMetric(),
            "diffusion_loss": torchmetrics.SumMetric(),
            "masked_count": torchmetrics.SumMetric(),
            "plan_correct": torchmetrics.SumMetric(),
            "masked_correct": torchmetrics.SumMetric(),
        }
        self.val_sums = torch.nn.ModuleDict(metrics)
        self.train_plan_accuracy = torchmetrics.MeanMetric()
        self.train_masked_accuracy = torchmetrics.MeanMetric()

    # ------------------------------------------------------------------ loss

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._noise_generator is None or self._noise_generator.device != device:
            rank = self.global_rank if self._trainer is not None else 0
            self._noise_generator = torch.Generator(device=device).manual_seed(self.seed + 1000 * rank)
        return self._noise_generator

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ids ``[B, T]`` under a 4D bool mask ``[B, 1, T, T]``."""
        mask = for_attention(attention_mask, self.backbone.config._attn_implementation)
        return self.backbone(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    def loss_terms(self, batch: Batch, generator: torch.Generator | None = None):
        """Noise the batch as its mode requires, run the backbone, compute the loss terms."""
        noised = None
        ids = batch.input_ids
        if batch.mode in NOISED:
            noised = add_noise(
                batch, self.spec.id("mask"), self.objective.t_min, generator, self.objective.t_sampling
            )
            ids = noised.input_ids
        # A plain AR batch is right padded, so the backbone's own causal attention gives every
        # real position what its 4D mask would, on a faster kernel; every other layout needs the mask.
        if batch.mode == "autoregressive":
            mask = None
        else:
            mask = for_attention(batch.attention_mask, self.backbone.config._attn_implementation)
        logits: Any
        if self._head_is_separable():  # the output head runs only where a token is scored
            hidden = self.backbone.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            head = self.backbone.get_output_embeddings()

            def logits(needed: torch.Tensor) -> torch.Tensor:
                return head(hidden[needed])
        else:
            logits = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return objective_loss(
            logits, batch, noised, self.objective.logits, ar_loss_over_t=self.objective.ar_loss_over_t
        )

    def _head_is_separable(self) -> bool:
        """Whether the backbone's logits are its output head applied to its base model's last hidden state.

        True for the usual decoder LMs (Qwen2, Llama, Dream); False where the
        forward does more (logit soft-capping or scaling) or the parts are not
        exposed. Checked once, on a few tokens, in eval mode and without grad.
        """
        if self._separable_head is None:
            bb = self.backbone
            head, base = bb.get_output_embeddings(), bb.base_model
            ok = isinstance(head, torch.nn.Module) and base is not bb
            if ok:
                was_training = bb.training
                bb.eval()
                try:
                    with torch.no_grad():
                        ids = torch.arange(4, device=self.device)[None] % len(self.tokenizer)
                        full = bb(input_ids=ids, use_cache=False).logits
                        hidden = getattr(base(input_ids=ids, use_cache=False), "last_hidden_state", None)
                        ok = hidden is not None and torch.allclose(head(hidden), full, rtol=1e-4, atol=1e-4)
                finally:
                    bb.train(was_training)
            self._separable_head = ok
        return self._separable_head

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch, self._generator(batch.input_ids.device))
        n = len(batch)
        loss = terms.loss
        if self.trainer.world_size > 1:
            # normalise by the mean target count over ranks, so that averaging the ranks'
            # gradients gives the token mean of the global batch, as one process would
            mean_count = self.trainer.strategy.reduce(terms.n_targets.float(), reduce_op="mean")
            loss = terms.total_sum / mean_count.clamp_min(1)
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=n)
        if terms.ar_count > 0:
            self.log("train/ar_loss", terms.ar_sum / terms.ar_count, batch_size=n)
            self.train_plan_accuracy.update(terms.ar_correct / terms.ar_count)
            self.log("train/plan_accuracy", self.train_plan_accuracy, batch_size=n)
        if terms.masked_count > 0:
            self.log("train/diffusion_loss", terms.diffusion_sum / terms.masked_count, batch_size=n)
            self.train_masked_accuracy.update(terms.masked_correct / terms.masked_count)
            self.log("train/masked_accuracy", self.train_masked_accuracy, batch_size=n)
        self.log("train/mode_planned", float(batch.mode == "planned"), batch_size=n)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_sums("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_sums("test")

    def _eval_step(self, batch: Batch, batch_idx: int, prefix: str) -> torch.Tensor:
        generator = torch.Generator(device=batch.input_ids.device).manual_seed(self.seed + batch_idx)
        terms = self.loss_terms(batch, generator)
        self.val_sums["ar_loss"].update(terms.ar_sum)
        self.val_sums["ar_count"].update(terms.ar_count)
        self.val_sums["diffusion_loss"].update(terms.diffusion_sum)
        self.val_sums["masked_count"].update(terms.masked_count)
        self.val_sums["plan_correct"].update(terms.ar_correct)
        self.val_sums["masked_correct"].update(terms.masked_correct)
        self.log(f"{prefix}/loss", terms.loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        return terms.loss

    def _log_eval_sums(self, prefix: str) -> None:
        s = {k: m.compute() for k, m in self.val_sums.items()}
        if s["ar_count"] > 0:
            self.log(f"{prefix}/ar_loss", s["ar_loss"] / s["ar_count"])
            self.log(f"{prefix}/plan_accuracy", s["plan_correct"] / s["ar_count"])
        if s["masked_count"] > 0:
            self.log(f"{prefix}/diffusion_loss", s["diffusion_loss"] / s["masked_count"])
            self.log(f"{prefix}/masked_accuracy", s["masked_correct"] / s["masked_count"])
        for m in self.val_sums.values():
            m.reset()

    def predict_strategy(self) -> Any:
        """The decoding strategy ``predict`` uses (:class:`PredictConfig`)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return self.predict_config.strategy(dm)

    def on_predict_start(self) -> None:
        self._predict_strategy = self.predict_strategy()  # a bad decoder or knob fails before any batch
        self._predict_lm = self.language_model()

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Decode a batch of test prompts (rows with ``prompt_ids``, ``index`` and
        maybe ``answer_keys``); one result dict per prompt, scored against its keys."""
        from pdlightning.data.synthetic import fact_accuracy

        strategy, lm = self._predict_strategy, self._predict_lm  # on_predict_start
        generator = torch.Generator().manual_seed(self.predict_config.seed + batch_idx)
        gens = strategy.generate(lm, [r["prompt_ids"] for r in batch], generator)
        out = []
        name = self.predict_config.decoder or strategy.name
        for row, g in zip(batch, gens, strict=True):
            result = {"index": row["index"], "decoder": name, **g.to_dict()}
            if row.get("prompt") is not None:
                result["prompt"] = row["prompt"]  # the text, not the chat-formatted ids decoded
            if row.get("answer_keys") is not None:
                result["answer_keys"] = row["answer_keys"]
                result["fact_accuracy"] = fact_accuracy(g.text, row["answer_keys"])
            out.append(result)
        return out

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        starts = [0]
        dm = getattr(self.trainer, "datamodule", None)
        max_epochs = self.trainer.max_epochs or 1
        if self.schedule.restart_per_stage and dm is not None and hasattr(dm, "stage_starts") and max_epochs > 0:
            per_epoch = total / max_epochs
            starts = sorted({int(round(e * per_epoch)) for e in dm.stage_starts() if e < max_epochs})
        bounds = [*starts, total]
        warm, final = self.schedule.warmup_fraction, self.schedule.final_fraction
        scales = self.schedule.stage_scales or []

        def factor(step: int) -> float:
            k = max(i for i, s in enumerate(starts) if s <= step) if step >= starts[0] else 0
            begin, end = bounds[k], max(bounds[k + 1], bounds[k] + 1)
            length = end - begin
            local = step - begin
            w = max(1, math.ceil(warm * length))
            scale = scales[k] if k < len(scales) else 1.0
            if local < w:
                return scale * (local + 1) / w
            progress = min(1.0, (local - w) / max(1, length - w))
            return scale * (final + (1 - final) * (1 - progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints and export

    def language_model(self):
        """A :class:`~pdlightning.decoding.LanguageModel` view of this module for decoding."""
        from pdlightning.decoding.lm import LanguageModel

        return LanguageModel(self.backbone, self.tokenizer, self.spec, logits=self.objective.logits)

    def export(self, directory: str) -> str:
        """Write a HF directory (safetensors, config, tokenizer, tag spec) every decoder loads."""
        was_training = self.backbone.training
        self.language_model().save_pretrained(directory)
        self.backbone.train(was_training)
        return directory
