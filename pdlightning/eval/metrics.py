"""Quality metrics as torchmetrics: fact accuracy against answer keys, plan
validity rate, span-length error (planned against realised), tokens per answer;
and the paired comparisons of a decoder with the baseline on the same prompts
(difference in fact accuracy, speed-up), with a bootstrap confidence interval.
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


def fact_accuracy_by_group(
    texts: Sequence[str], answer_keys: Sequence[Sequence[str]], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Fact accuracy within each group (the bundled set's task family): where a decoder finds its facts.

    Returns:
        ``{group: {"facts": accuracy, "keys": answer keys}}`` for every group with keys.
    """
    metrics: dict[str, FactAccuracy] = {}
    for text, keys, group in zip(texts, answer_keys, groups, strict=True):
        metrics.setdefault(group, FactAccuracy()).update([text], [keys])
    return {g: {"facts": float(m.compute()), "keys": int(m.total)} for g, m in sorted(metrics.items()) if int(m.total)}


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


class FactAccuracyDelta(Metric):
    """Fact accuracy of a decoder minus the baseline's, on the same prompts, over all their keys.

    ``update(found, found_base, keys)`` takes per-prompt tensors ``[N]``: keys the
    decoder found, keys the baseline found, keys in the prompt."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("difference", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, found: torch.Tensor, found_base: torch.Tensor, keys: torch.Tensor) -> None:
        self.difference += (found - found_base).sum()
        self.total += keys.sum()

    def compute(self) -> torch.Tensor:
        return self.difference / self.total.clamp_min(1)


class SpeedUp(Metric):
    """The baseline's seconds over the decoder's, summed over the same prompts.

    ``update(seconds, seconds_base)`` takes per-prompt tensors ``[N]``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("seconds", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seconds_base", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, seconds: torch.Tensor, seconds_base: torch.Tensor) -> None:
        self.seconds += seconds.sum()
        self.seconds_base += seconds_base.sum()

    def compute(self) -> torch.Tensor:
        return self.seconds_base / self.seconds.clamp_min(1e-12)


def paired_bootstrap(
    metric: Metric, *per_prompt: torch.Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile confidence interval of a paired comparison, over prompts drawn with replacement.

    Every tensor is resampled with the same draw of prompts (torchmetrics'
    ``BootStrapper``, multinomial sampling), so both decoders are always scored on
    the same prompts: the interval covers the spread that another draw of prompts
    from the same task would give, not timing noise between runs.

    Args:
        metric: A paired metric, e.g. :class:`FactAccuracyDelta` or :class:`SpeedUp`.
        per_prompt: Its ``update`` arguments, one tensor ``[N]`` each.
        resamples: Bootstrap resamples.
        level: Coverage of the interval.
        seed: Seeds the draws (the global RNG is left as it was).

    Returns:
        ``(low, high)``.
    """
    from torchmetrics.wrappers import BootStrapper

    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    tail = (1 - level) / 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boot = BootStrapper(metric, num_bootstraps=resamples, mean=False, std=False,
                            quantile=torch.tensor([tail, 1 - tail], dtype=torch.float64), sampling_strategy="multinomial")
        boot.update(*(t.double() for t in per_prompt))
        low, high = boot.compute()["quantile"].tolist()
    return low, high
