"""Quality metrics as torchmetrics: fact accuracy against answer keys, plan
validity rate, span-length error (planned against realised), tokens per answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from pdlightning.decoding.base import Generation


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def facts_found(text: str, answer_keys: Sequence[str]) -> int:
    """How many answer keys appear verbatim (whitespace-normalised) in ``text``."""
    body = _normalise(text)
    return sum(_normalise(k) in body for k in answer_keys)


class FactAccuracy(Metric):
    """Fraction of answer keys reproduced exactly, over all keys of all answers."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("found", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str], answer_keys: Sequence[Sequence[str]]) -> None:
        for text, keys in zip(texts, answer_keys, strict=True):
            self.found += facts_found(text, keys)
            self.total += len(keys)

    def compute(self) -> torch.Tensor:
        return self.found.float() / self.total.clamp_min(1)


def fact_accuracy_against_others(
    texts: Sequence[str], answer_keys: Sequence[Sequence[str]], groups: Sequence[str]
) -> float | None:
    """Fact accuracy of each text against the answer keys of the *other* prompts of its group.

    A model that ignored its prompt and wrote its family's usual values would
    score as well here as against its own keys, so the difference between the
    two is what it looked up in the prompt rather than guessed.

    Args:
        texts: One answer per prompt.
        answer_keys: The keys of each prompt.
        groups: Each prompt's group (the bundled set's task family).

    Returns:
        The fraction of found keys over all (answer, other prompt's key) pairs;
        None when no group holds two prompts.
    """
    facts = FactAccuracy()
    for i, (text, group) in enumerate(zip(texts, groups, strict=True)):
        others = [k for j, (k, g) in enumerate(zip(answer_keys, groups, strict=True)) if g == group and j != i]
        if others:
            facts.update([text] * len(others), others)
    return float(facts.compute()) if int(facts.total) else None


class PlanValidity(Metric):
    """Fraction of planned responses that needed no repair (every entry parsed, lengths sane)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("valid", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, generations: Sequence[Generation]) -> None:
        for g in generations:
            if g.plan is None:
                continue
            self.valid += int(bool(g.plan) and not g.repairs)
            self.total += 1

    def compute(self) -> torch.Tensor:
        return self.valid.float() / self.total.clamp_min(1)


class SpanLengthError(Metric):
    """Mean absolute difference, in tokens, between a span's planned and realised length.

    Realised = content tokens of the span (pads excluded), measured with ``count``.
    """

    full_state_update = False

    def __init__(self, length_unit: int = 10) -> None:
        super().__init__()
        self.length_unit = length_unit
        self.add_state("error", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("spans", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, generations: Sequence[Generation], count_tokens: object) -> None:
        for g in generations:
            if not g.plan or g.spans is None:
                continue
            for entry, span in zip(g.plan, g.spans, strict=False):
                self.error += abs(entry.length * self.length_unit - count_tokens(span))  # type: ignore[operator]
                self.spans += 1

    def compute(self) -> torch.Tensor:
        return self.error / self.spans.clamp_min(1)


class TokensPerAnswer(Metric):
    """Mean content tokens generated per answer (control and pad tokens excluded)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("tokens", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("answers", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, generations: Sequence[Generation]) -> None:
        for g in generations:
            self.tokens += g.counters.content_tokens
            self.answers += 1

    def compute(self) -> torch.Tensor:
        return self.tokens.float() / self.answers.clamp_min(1)
