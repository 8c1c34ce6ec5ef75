"""What every decoder talks to: a backbone with its tokenizer, tag spec and
logits convention, counting forward passes. Pure torch: no Lightning.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pdlightning.masks import check_attention, for_attention
from pdlightning.model.backbone import LogitsConvention, load_pretrained, model_class
from pdlightning.tags import TagSpec
from pdlightning.tokenizer import load_spec, load_tokenizer, save_spec

META_FILE = "pdlightning.json"


@dataclass
class ForwardOutput:
    """Logits ``[B, T, V]`` of the positions fed, and the updated KV cache."""

    logits: torch.Tensor
    past_key_values: Any = None


def check_device(device: str | torch.device) -> None:
    """Refuse a device this torch cannot use, in one line, before anything loads.

    Raises:
        ValueError: Not a device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or an
            accelerator this build or machine does not have.
    """
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {str(device)!r} is not a torch device ({str(e).splitlines()[0]})") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(d.type, True):
        raise ValueError(f"device {str(device)!r}: this torch has no {d.type} device here; use cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")


class LanguageModel:
    """A backbone ready for decoding.

    Args:
        backbone: A transformers causal LM accepting a 4D bool attention mask.
        tokenizer: Its tokenizer, control tokens added.
        spec: Tag spec with token ids.
        logits: ``"shifted"``: token ``i`` is scored by the logits at ``i - 1``
            (AR-initialised backbones); ``"aligned"``: at ``i`` itself.

    Attributes:
        forward_passes: Forward passes since the last :meth:`reset_counter`.
        fed_positions: Positions fed to the backbone since then (batch x new
            tokens of every pass, holes included): what the passes computed.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: TagSpec,
        logits: LogitsConvention = "shifted",
    ) -> None:
        if logits not in ("shifted", "aligned"):
            raise ValueError(f"logits convention must be 'shifted' or 'aligned', got {logits!r}")
        self.backbone = backbone.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.logits_convention = logits
        self.forward_passes = 0
        self.fed_positions = 0
        params = inspect.signature(backbone.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def shift(self) -> int:
        """How many positions before a token its logits stand (1 shifted, 0 aligned)."""
        return 1 if self.logits_convention == "shifted" else 0

    @property
    def max_positions(self) -> int | None:
        """Positions the backbone was built for (``max_position_embeddings``), None if it does not say."""
        return getattr(getattr(self.backbone, "config", None), "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def reset_counter(self) -> None:
        self.forward_passes = 0
        self.fed_positions = 0

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        keep: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """One forward pass (counted).

        Args:
            input_ids: ``[B, T]`` new tokens.
            attention_mask: ``[B, 1, T, P + T]`` bool, ``True`` = attend, over
                the cached ``P`` positions and the new ones.
            position_ids: ``[B, T]``.
            past_key_values: A transformers cache holding ``P`` positions, or None.
            use_cache: Return the cache extended with the new positions.
            keep: Sorted indices ``[K]`` of the fed positions whose logits are
                wanted (the same for every row); None = all. Backbones that
                accept ``logits_to_keep`` skip the output head elsewhere.

        Returns:
            Logits ``[B, T, V]``, or ``[B, K, V]`` with ``keep``.
        """
        self.forward_passes += 1
        self.fed_positions += input_ids.numel()
        extra = {"logits_to_keep": keep} if keep is not None and self._logits_to_keep else {}
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=for_attention(attention_mask, self.backbone.config._attn_implementation),
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_arg: past_key_values},
            **extra,
        )
        logits = out.logits if keep is None or extra else out.logits[:, keep]
        cache = getattr(out, self._cache_arg) if use_cache else None
        return ForwardOutput(logits=logits.float(), past_key_values=cache)

    def new_cache(self) -> Any:
        """An empty KV cache for this backbone."""
        from transformers import DynamicCache

        return DynamicCache(config=self.backbone.config)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a HF directory: safetensors, config, tokenizer, tag spec, convention."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        save_spec(self.spec, directory)
        (directory / META_FILE).write_text(json.dumps({"logits": self.logits_convention}, indent=2))
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        logits: LogitsConvention | None = None,
        attn_implementation: str = "sdpa",
    ) -> LanguageModel:
        """Load a directory written by :meth:`save_pretrained` (or ``pdlightning export``).

        A plain HF checkpoint without ``tag_spec.json`` gets the ``paper``
        control tokens added; pass ``logits`` to override the convention.

        Raises:
            FileNotFoundError: No such directory, no ``config.json``, or no tokenizer
                files in it (see :func:`load_tokenizer`), before the weights load.
            ValueError: A corrupt ``tokenizer_config.json`` or ``tag_spec.json`` (named),
                a tokenizer that encodes text to nothing, or a checkpoint with its own
                modelling code and ``trust_remote_code`` off (before the tokenizer's own
                code can fail less clearly; see :func:`pdlightning.model.backbone.model_class`).
        """
        from pdlightning.tokenizer import add_control_tokens

        check_device(device)
        check_attention(attn_implementation, device)
        directory = Path(directory)
        if directory.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is a file, not a model directory: decoders load the HF directory that fit "
                "writes to <log dir>/hf, or that `pdlightning export --ckpt_path CKPT --output DIR` writes"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
        if not (directory / "config.json").is_file():
            # a bounded look (exports sit at most 4 levels down: models/<name>/<name>/version_0/hf),
            # not a walk of whatever tree the user named
            under = ("hf", "*/hf", "*/*/hf", "*/*/*/hf", "*/*/*/*/hf")
            found = [str(c.parent) for pat in under for c in sorted(directory.glob(f"{pat}/config.json"))][:3]
            hint = f"; the exported model directories under it: {', '.join(found)}" if found else ""
            raise FileNotFoundError(
                f"{str(directory)!r} is not a model directory (no config.json){hint}. Training writes "
                "one to <log dir>/hf, and `pdlightning export` writes one from a checkpoint"
            )
        # custom code without trust_remote_code: refused in one line, before a custom tokenizer's code fails
        model_class(directory, trust_remote_code)
        tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        try:
            spec = load_spec(directory)
        except FileNotFoundError:
            spec = add_control_tokens(tokenizer, TagSpec())
        backbone = load_pretrained(directory, attn_implementation, dtype, trust_remote_code)
        if backbone.get_input_embeddings().num_embeddings < len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        meta_path = directory / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        convention = logits or meta.get("logits", "shifted")
        return cls(backbone.to(device), tokenizer, spec, logits=convention)
