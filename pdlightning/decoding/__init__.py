"""Decoding strategies behind one interface (:class:`DecodingStrategy`).

Built-in strategies register short names when this package is imported; a
user's subclass is usable by ``class_path`` without registration.
"""

from pdlightning.decoding.base import (
    Counters,
    DecodingStrategy,
    Generation,
    RowOutput,
    get_strategy,
    list_strategies,
    register,
)
from pdlightning.decoding.lm import LanguageModel

__all__ = [
    "Counters",
    "DecodingStrategy",
    "Generation",
    "LanguageModel",
    "RowOutput",
    "get_strategy",
    "list_strategies",
    "register",
]
