"""Decoding strategies behind one interface (:class:`DecodingStrategy`).

Built-in strategies register short names when this package is imported; a
user's subclass is usable by ``class_path`` without registration.
"""

from pdlightning.decoding.autoregressive import Autoregressive
from pdlightning.decoding.base import (
    Counters,
    DecodingStrategy,
    Generation,
    RowOutput,
    get_strategy,
    list_strategies,
    register,
)
from pdlightning.decoding.dense_planned import DensePlannedDiffusion
from pdlightning.decoding.diffusion import Diffusion
from pdlightning.decoding.fast_dllm import FastDLLM
from pdlightning.decoding.lm import LanguageModel
from pdlightning.decoding.planned import PlannedDiffusion
from pdlightning.decoding.planned_ar import PlannedAR

__all__ = [
    "Autoregressive",
    "Counters",
    "DecodingStrategy",
    "DensePlannedDiffusion",
    "Diffusion",
    "FastDLLM",
    "Generation",
    "LanguageModel",
    "PlannedAR",
    "PlannedDiffusion",
    "RowOutput",
    "get_strategy",
    "list_strategies",
    "register",
]
