"""Planned decoding with the spans written by next-token prediction (``planned_ar``; ours).

The planned layout decoded the way the recipe's ``ar_fraction`` trains nine
rows in ten (``planned_ar`` rows, docs/method.md): the plan autoregressively,
then every span of the round written left to right by next-token prediction,
the spans of every row side by side, one token per span per pass. A span
position attends causally inside its span (the ``planned_ar`` mask of
:mod:`pdlightning.masks`), so a written token's keys and values never change:
they enter the KV cache at once, and a pass feeds one token per unfinished
span. Plans, repairs, rounds, ``<sync/>``, the cache of prompt and plans and
the plan-tag drafts are :class:`~pdlightning.decoding.planned.PlannedDiffusion`'s.

It is not diffusion: no two positions of one span are written in the same
pass. Its speed comes from the spans running in parallel, its critical path is
the plan's passes plus each round's longest span. It suits models trained with
``ar_fraction`` (or ``planned_ar`` stages); a model trained on the paper's
objective alone has never seen a causal span.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pdlightning.decoding.base import register
from pdlightning.decoding.planned import PlannedDiffusion


@register("planned_ar")
class PlannedAR(PlannedDiffusion):
    """Planned decoding, each span written left to right by next-token prediction, spans in parallel.

    Args:
        pad_ends_span: A span's first pad ends it: the rest of it is pads, as a
            trained span's pads all stand after its content (the span needs no
            more passes). False writes every position.
        length_scale: Multiplies every planned length.
        topic_heads: Open each span with its topic words and ``</topic>``.
        sync: Allow several rounds; False ends after the first round.
        max_plan_tokens: Plan tokens per round before the round is closed.
        max_spans: Plan entries kept per round.
        max_span_tokens: Upper bound of one span's length in tokens.
        max_rounds: Rounds per response.
        use_cache: Cache the keys and values of prompt, plans and written span
            tokens (exact); False recomputes everything each pass.
        draft_plan_tags: Draft the plan tags the grammar predicts (as in PD).
        max_new_tokens: Cap on everything generated after the prompt: plans,
            span tags, topic heads and pads as well as the answer (600: on the
            bundled set PD writes up to about 310 tokens where AR writes 215).
        temperature: 0 = greedy.
        top_p: Nucleus mass.
        top_k: Top-k cut (0 = off).
        batch_size: Prompts decoded together.
    """

    causal_spans: ClassVar[bool] = True

    def __init__(
        self,
        pad_ends_span: bool = True,
        length_scale: float = 1.0,
        topic_heads: bool = True,
        sync: bool = True,
        max_plan_tokens: int = 64,
        max_spans: int = 16,
        max_span_tokens: int = 256,
        max_rounds: int = 8,
        use_cache: bool = True,
        draft_plan_tags: bool = True,
        max_new_tokens: int = 600,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__(
            step_ratio=1.0,  # one token per span per pass
            order="left_to_right",
            length_scale=length_scale,
            topic_heads=topic_heads,
            sync=sync,
            max_plan_tokens=max_plan_tokens,
            max_spans=max_spans,
            max_span_tokens=max_span_tokens,
            max_rounds=max_rounds,
            use_cache=use_cache,
            span_cache=use_cache,  # exact here: a written token's keys see only its left
            draft_plan_tags=draft_plan_tags,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            batch_size=batch_size,
        )
        self.pad_ends_span = pad_ends_span

    def _scored(self, is_mask: torch.Tensor) -> torch.Tensor:
        """The leftmost mask of each span (a span's masks are the suffix not yet written)."""
        front = is_mask.clone()
        front[:, 1:] &= ~is_mask[:, :-1]
        return front

    def _commit(
        self,
        tokens: torch.Tensor,
        probs: torch.Tensor,
        grp: torch.Tensor,
        pos: torch.Tensor,
        left: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Every scored position commits: one token per span per pass."""
        return torch.ones_like(tokens, dtype=torch.bool)
