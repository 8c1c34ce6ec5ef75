"""The decoding interface: one base class that owns the call, short names
through a small registry, and the result dataclass every strategy returns.

A strategy subclasses :class:`DecodingStrategy` and implements
:meth:`DecodingStrategy.decode_batch`; the base class tokenises prompts,
batches them, times the work, counts forward passes and builds
:class:`Generation` results. Any subclass is usable from YAML by
``class_path`` without registering; :func:`register` only adds a short name.
"""

from __future__ import annotations

import importlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from pdlightning.decoding.lm import LanguageModel
from pdlightning.masks import answer_ids
from pdlightning.tags import PlanEntry
from pdlightning.tokenizer import format_prompt


@dataclass
class Counters:
    """What one response cost.

    Attributes:
        forward_passes: Forward passes of the batch this response was decoded in.
        fed_positions: Positions those passes fed the backbone (batch x new
            tokens, holes included): the work, where passes count the steps.
        critical_path: Forward passes on this response's sequential path (AR:
            generated tokens; planned diffusion: plan tokens + denoising steps).
        content_tokens: Answer tokens generated (``RowOutput.answer_ids``).
        control_tokens: Everything else generated but pads: tags, plan entries,
            topic heads, sync and end.
        pad_tokens: Pad tokens generated.
        seconds: Wall-clock seconds of the batch this response was decoded in.
    """

    forward_passes: int = 0
    fed_positions: int = 0
    critical_path: int = 0
    content_tokens: int = 0
    control_tokens: int = 0
    pad_tokens: int = 0
    seconds: float = 0.0


@dataclass
class RowOutput:
    """What a strategy returns for one row of a batch (before the base class adds timing).

    Attributes:
        token_ids: Generated ids after the prompt (control tokens included).
        answer_ids: Ids of the final answer. The base class keeps only what
            :func:`pdlightning.masks.answer_ids` finds in them (no end token,
            pads, masks, tags, plan entries or topic heads), so a strategy may
            pass its generated ids as they are.
        critical_path: Forward passes on this row's sequential path.
        plan: Plan entries (planned strategies).
        spans: Filled span texts in plan order (planned strategies).
        repairs: What was repaired in an imperfect plan.
    """

    token_ids: list[int]
    answer_ids: list[int]
    critical_path: int
    plan: list[PlanEntry] | None = None
    spans: list[str] | None = None
    repairs: list[str] = field(default_factory=list)


@dataclass
class Generation:
    """One response: its text, token ids, plan and spans, counters and repairs."""

    prompt: str
    text: str
    token_ids: list[int]
    counters: Counters
    plan: list[PlanEntry] | None = None
    spans: list[str] | None = None
    repairs: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.counters.seconds

    @property
    def critical_path(self) -> int:
        return self.counters.critical_path

    def to_dict(self) -> dict:
        return asdict(self)


_REGISTRY: dict[str, type[DecodingStrategy]] = {}


class PromptError(ValueError):
    """A prompt this strategy refuses before decoding starts (blank, empty, too long for
    the model's positions): the caller's input, reported by the CLIs as one line."""


def register(name: str) -> Callable[[type[DecodingStrategy]], type[DecodingStrategy]]:
    """Class decorator giving a strategy a short name (``get_strategy(name)``)."""

    def deco(cls: type[DecodingStrategy]) -> type[DecodingStrategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"decoding strategy name {name!r} is already taken by {_REGISTRY[name]}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def list_strategies() -> list[str]:
    """Short names of the registered strategies."""
    _import_builtin()
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[DecodingStrategy]:
    """The strategy class behind a short name or a dotted class path.

    Raises:
        ValueError: An unknown short name, a module that does not import (with
            the import error), or a module without that class.
        TypeError: The class path names something that is not a strategy.
    """
    _import_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    module, _, cls_name = name.rpartition(".")
    if not module:
        raise ValueError(
            f"unknown decoding strategy {name!r}; registered: {sorted(_REGISTRY)}, "
            "or the class path of your own (mypackage.strategies.MyStrategy)"
        )
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f"decoding strategy {name!r}: cannot import {module!r} ({e}); the directory that holds "
            "it must be on the Python path (e.g. PYTHONPATH=. when it sits in the current directory)"
        ) from None
    cls = getattr(found, cls_name, None)
    if cls is None:
        raise ValueError(f"decoding strategy {name!r}: module {module!r} has no {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, DecodingStrategy)):
        raise TypeError(f"{name} is not a DecodingStrategy subclass")
    return cls


def get_strategy(name: str, **kwargs: object) -> DecodingStrategy:
    """Instantiate a strategy by short name or by dotted ``class_path`` (see :func:`strategy_class`)."""
    return strategy_class(name)(**kwargs)


def _import_builtin() -> None:
    import pdlightning.decoding  # noqa: F401  (its __init__ imports every built-in strategy)


class DecodingStrategy(ABC):
    """Base class of every decoder.

    Args:
        max_new_tokens: Cap on generated tokens per response (everything after
            the prompt: plan, tags, pads and content).
        temperature: 0 = greedy.
        top_p: Nucleus sampling mass (1 = off).
        top_k: Keep the k most likely tokens (0 = off).
        batch_size: Prompts decoded together.
    """

    name: ClassVar[str] = "base"

    def __init__(
        self,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 1,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a number >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.batch_size = batch_size

    @abstractmethod
    def decode_batch(
        self, lm: LanguageModel, prompts: list[list[int]], generator: torch.Generator
    ) -> list[RowOutput]:
        """Decode one batch of tokenised prompts; one :class:`RowOutput` per prompt."""

    def check_prompts(self, lm: LanguageModel, prompts: list[list[int]]) -> None:
        """Refuse prompts this strategy cannot start from (by default: an empty one,
        as the first token is predicted from the prompt's last position)."""
        for i, p in enumerate(prompts):
            if len(p) == 0:
                who = self.name if self.name != "base" else type(self).__name__  # a user's unregistered class
                raise PromptError(f"{who} decoding needs a non-empty prompt (prompt {i} is empty)")

    def _check_positions(self, lm: LanguageModel, prompts: list[list[int]]) -> None:
        """Refuse a prompt whose answer could run past the positions the backbone was built for."""
        limit = lm.max_positions
        if limit is None:
            return
        for i, p in enumerate(prompts):
            if len(p) + self.max_new_tokens > limit:
                raise PromptError(
                    f"prompt {i} has {len(p)} tokens and max_new_tokens is {self.max_new_tokens}: together "
                    f"more than the model's {limit} positions (max_position_embeddings); shorten the "
                    f"prompt or lower max_new_tokens to {max(limit - len(p), 0)}"
                )

    def generate(
        self,
        lm: LanguageModel,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        on_batch: Callable[[list[Generation]], None] | None = None,
        system: str | Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """Decode every prompt.

        Args:
            lm: The model.
            prompts: Prompt texts (formatted with the chat template) or token ids.
            generator: Source of randomness; a fresh one seeded 0 when None.
            on_batch: Called with each batch's results as soon as it is done.
            system: A system prompt for every text prompt, or one per prompt (None:
                none for that prompt), formatted as training formats a row's
                ``system`` (:func:`pdlightning.tokenizer.format_prompt`).

        Returns:
            One :class:`Generation` per prompt, in order.
        """
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        for i, p in enumerate(prompts):  # the chat template would make a blank text a non-empty prompt
            if isinstance(p, str) and not p.strip():
                raise PromptError(f"prompt {i} is blank: there is nothing to answer")
        systems = [system] * len(prompts) if system is None or isinstance(system, str) else list(system)
        if len(systems) != len(prompts):
            raise PromptError(f"{len(systems)} system prompts for {len(prompts)} prompts: give one per prompt")
        texts = [p if isinstance(p, str) else lm.tokenizer.decode(list(p)) for p in prompts]
        ids = [format_prompt(lm.tokenizer, p, s) if isinstance(p, str) else list(p)
               for p, s in zip(prompts, systems, strict=True)]
        self.check_prompts(lm, ids)
        self._check_positions(lm, ids)
        results: list[Generation] = []
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start : start + self.batch_size]
            lm.reset_counter()
            t0 = time.perf_counter()
            with torch.inference_mode():
                rows = self.decode_batch(lm, batch, generator)
            seconds = time.perf_counter() - t0
            done = [
                self._finish(lm, text, row, lm.forward_passes, seconds)
                for text, row in zip(texts[start : start + len(batch)], rows, strict=True)
            ]
            if on_batch is not None:
                on_batch(done)
            results.extend(done)
        return results

    def _finish(self, lm: LanguageModel, prompt: str, row: RowOutput, passes: int, seconds: float) -> Generation:
        pad, mask = lm.spec.id("pad"), lm.spec.id("mask")
        answer = answer_ids(row.answer_ids, lm.spec)  # a baseline run on a planned model answers with tags
        n_pad = sum(t == pad for t in row.token_ids)
        n_content = len(answer)
        counters = Counters(
            forward_passes=passes,
            fed_positions=lm.fed_positions,
            critical_path=row.critical_path,
            content_tokens=n_content,
            # tags, plan entries, topic heads, sync and end: everything generated that is not answer
            control_tokens=len(row.token_ids) - n_content - n_pad - sum(t == mask for t in row.token_ids),
            pad_tokens=n_pad,
            seconds=seconds,
        )
        text = lm.tokenizer.decode(answer, skip_special_tokens=True).strip()
        return Generation(
            prompt=prompt,
            text=text,
            token_ids=row.token_ids,
            counters=counters,
            plan=row.plan,
            spans=row.spans,
            repairs=row.repairs,
        )
