"""Backbones: any transformers causal LM that accepts a 4D attention mask.

Built from a config (the embedded default is a small Qwen2-style model) or
loaded from a local directory with ``from_pretrained`` (:func:`load_pretrained`,
also what decoding loads with). Pure torch and transformers: no Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pdlightning.masks import check_attention

LogitsConvention = Literal["shifted", "aligned"]
AttnImplementation = Literal["sdpa", "eager", "flex_attention", "flash_attention_2"]

#: The embedded default: a Qwen2-style model of a few million parameters.
TINY_QWEN2: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def build_backbone(
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    attn_implementation: AttnImplementation = "sdpa",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    seed: int | None = 0,
) -> PreTrainedModel:
    """A causal LM backbone, from a local checkpoint or from a config dict.

    Args:
        pretrained: Local directory (or hub name when online) for
            ``from_pretrained``; safetensors only.
        config: Config fields, ``model_type`` included, for a model trained from
            scratch (used when ``pretrained`` is None; default :data:`TINY_QWEN2`).
        vocab_size: Grow the token embeddings to at least this size (tags
            added). A checkpoint's larger matrix is kept whole (Qwen2.5 and Dream
            pad theirs to 152064 rows, beyond their tokenizers' length); a model
            built from a config gets exactly this size.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flex_attention``
            (needs a GPU to train: torch has no flex backward on CPU).
            ``flash_attention_2`` cannot take the hybrid 4D mask and is
            refused (:func:`pdlightning.masks.check_attention`).
        dtype: ``"bfloat16"``, ``"float32"``...; None keeps the checkpoint's.
        trust_remote_code: Allow custom modelling code of a checkpoint.
        seed: Seed of the random initialisation from a config.

    Returns:
        The model, embeddings grown when ``vocab_size`` asks for more rows.

    Raises:
        ValueError: See :func:`load_pretrained`.
    """
    check_attention(attn_implementation)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if pretrained is not None:
        model = load_pretrained(pretrained, attn_implementation, torch_dtype, trust_remote_code)
    else:
        fields = dict(TINY_QWEN2 if config is None else config)
        model_type = fields.pop("model_type", "qwen2")
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        cfg = AutoConfig.for_model(model_type, **fields)
        cfg._attn_implementation = attn_implementation
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    # grow only: shrinking would drop rows of a pretrained matrix (and a config-built model has the size already)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    # from_pretrained returns the model in eval mode, and Lightning keeps each
    # module's mode at the start of fit: without this a checkpoint would be
    # fine-tuned with its dropout off.
    return model.train()


def load_pretrained(
    pretrained: str | Path,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A checkpoint's causal LM, built by the auto class its config registers (safetensors only).

    Args:
        pretrained: Local directory (or hub name when online).
        attn_implementation: As for :func:`build_backbone`.
        dtype: Weights dtype; None keeps the checkpoint's.
        trust_remote_code: Allow the checkpoint's own modelling code.

    Returns:
        The model, in eval mode as ``from_pretrained`` leaves it.

    Raises:
        ValueError: Custom code without ``trust_remote_code``, an ``auto_map``
            without a usable class, or a model without logits over its vocabulary
            (:func:`model_class`, :func:`check_logits`).
    """
    path = Path(pretrained).expanduser()
    if not path.is_dir() and (path.is_absolute() or str(pretrained).startswith((".", "~")) or path.exists()):
        raise ValueError(f"{str(pretrained)!r} is not a model directory (no such directory; a local checkpoint "
                         "with config.json and safetensors weights)")
    auto = model_class(pretrained, trust_remote_code)
    model = auto.from_pretrained(
        pretrained,
        attn_implementation=attn_implementation,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if auto is AutoModel:  # whatever class the checkpoint's code maps AutoModel to: it may be headless
        check_logits(model, str(pretrained))
    return model


def model_class(pretrained: str | Path, trust_remote_code: bool = False) -> type:
    """The auto class that builds a checkpoint with its LM head.

    A checkpoint with its own modelling code lists the auto classes it registers
    in ``config.json``'s ``auto_map``. Dream lists only ``AutoModel`` (its
    ``DreamModel`` carries the LM head and returns logits), so
    ``AutoModelForCausalLM`` refuses it. A model type transformers knows keeps
    ``AutoModelForCausalLM``: its ``AutoModel`` is the base model without a head.

    Raises:
        ValueError: The checkpoint needs its own code and ``trust_remote_code``
            is off (transformers refuses over several lines), or its ``auto_map``
            has neither class; one line naming the checkpoint.
    """
    name = str(pretrained)
    config, _ = PretrainedConfig.get_config_dict(name)
    auto_map = config.get("auto_map") or {}
    if not auto_map or config.get("model_type") in CONFIG_MAPPING:
        return AutoModelForCausalLM
    if not trust_remote_code:
        code = ", ".join(sorted({str(v) for v in auto_map.values()}))
        raise ValueError(f"{name!r} ships its own modelling code ({code}); set trust_remote_code to run it "
                         "(model.backbone.trust_remote_code: true when training)")
    if "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM
    if "AutoModel" in auto_map:
        return AutoModel
    raise ValueError(f"{name!r}: its config.json auto_map registers {', '.join(sorted(auto_map))}, "
                     "neither AutoModelForCausalLM nor AutoModel, so no class of it is known to give logits")


def check_logits(model: PreTrainedModel, name: str) -> None:
    """Refuse a model whose forward returns no logits over its vocabulary.

    Run once on one token: ``AutoModel`` builds whatever class a checkpoint's
    code maps it to, and a headless base model would only fail later, deep in
    training or decoding.

    Raises:
        ValueError: One line naming ``name``, the class and what is missing.
    """
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    logits = getattr(out, "logits", None)
    cls = type(model).__name__
    if logits is None:
        raise ValueError(f"{name!r}: AutoModel builds {cls}, which returns {type(out).__name__} without logits; "
                         "pdlightning needs the model with its LM head")
    if logits.shape[-1] != vocab:
        raise ValueError(f"{name!r}: {cls} returns logits over {logits.shape[-1]} entries, "
                         f"not over its {vocab}-token vocabulary")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
