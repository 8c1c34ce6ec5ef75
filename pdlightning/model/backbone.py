"""Backbones: any transformers causal LM that accepts a 4D attention mask.

Built from a config (the embedded default is a small Qwen2-style model) or
loaded from a local directory with ``from_pretrained``. Pure torch and
transformers: no Lightning.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

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
        vocab_size: Resize the token embeddings to this size (tags added).
        attn_implementation: ``sdpa`` (default), ``eager``, ``flex_attention``
            (needs a GPU to train: torch has no flex backward on CPU).
            ``flash_attention_2`` cannot take the hybrid 4D mask and is
            refused (:func:`pdlightning.masks.check_attention`).
        dtype: ``"bfloat16"``, ``"float32"``...; None keeps the checkpoint's.
        trust_remote_code: Allow custom modelling code of a checkpoint.
        seed: Seed of the random initialisation from a config.

    Returns:
        The model, embeddings resized when ``vocab_size`` is given.
    """
    check_attention(attn_implementation)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(
            pretrained,
            attn_implementation=attn_implementation,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
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
    if vocab_size is not None and model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    # from_pretrained returns the model in eval mode, and Lightning keeps each
    # module's mode at the start of fit: without this a checkpoint would be
    # fine-tuned with its dropout off.
    return model.train()


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
