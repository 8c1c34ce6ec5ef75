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
Its span passes after a round's first are as narrow as PD's plan passes: a fed
token's mask is its span head's row of the first pass, plus its own span's
columns (10% faster than the general pass, the same tokens:
``python benchmarks/ab_strategy.py --ref <before> --module pdlightning/decoding/planned_ar.py --strategy planned_ar``).

It is not diffusion: no two positions of one span are written in the same
pass. Its speed comes from the spans running in parallel, its critical path is
the plan's passes plus each round's longest span. It suits models trained with
``ar_fraction`` (or ``planned_ar`` stages); a model trained on the paper's
objective alone has never seen a causal span.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pdlightning.decoding.autoregressive import ban_tokens
from pdlightning.decoding.base import register
from pdlightning.decoding.lm import LanguageModel
from pdlightning.decoding.planned import _FORBIDDEN_IN_SPANS, PlannedDiffusion, _State
from pdlightning.decoding.sampling import sample_tokens


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
        draft_plan_lengths: With ``draft_plan_tags``, draft an entry's length too (as in PD).
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
        draft_plan_lengths: bool = True,
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
            draft_plan_lengths=draft_plan_lengths,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            batch_size=batch_size,
        )
        self.pad_ends_span = pad_ends_span

    def _denoise_round(
        self,
        lm: LanguageModel,
        st: _State,
        plans: list[list[tuple[str, int]]],
        generator: torch.Generator,
    ) -> None:
        """Write every planned span of every row left to right, the spans side by side, then close the round.

        With the cache and a shifted head, a pass after the round's first feeds each
        unfinished span its newest token and nothing else, as :meth:`_plan_pass` does
        for plan tokens: the token sees what its span's head saw (kept from the first
        pass's mask) and its span's columns, which are all to its left. Otherwise
        (no cache, or an aligned head, which scores a mask at its own position) the
        general pass of :class:`PlannedDiffusion` runs.
        """
        if st.cache is None or lm.shift != 1:
            return super()._denoise_round(lm, st, plans, generator)
        rnd = self._lay_out_round(lm, st, plans)
        if rnd is None:
            return
        dev, x, content, n_rows = lm.device, rnd.x, rnd.content, len(plans)
        c0 = st.col_pos.shape[1]
        before = torch.zeros_like(content)
        before[:, 1:] = content[:, :-1]
        after = torch.zeros_like(content)
        after[:, :-1] = content[:, 1:]
        row, front = (content & ~before).nonzero(as_tuple=True)  # span n: row[n], content [front[n], end[n])
        end = (content & ~after).nonzero(as_tuple=True)[1] + 1
        forbidden = [lm.spec.id(n) for n in _FORBIDDEN_IN_SPANS]
        pad = lm.spec.id("pad")
        # The first pass caches every span's tags and head (and the plan's last token) and
        # scores each span's first content position from its head's last token.
        want = torch.zeros_like(content)
        want[row, front - 1] = True
        feed = self._feed(lm, st, x, rnd.lengths, content.any(1), skip=content, hold=~content)
        logits, slot = self._forward(lm, st, x, feed, want, keep=False)
        lg = ban_tokens(logits[row, slot[row, front - 1]], lm, forbidden)
        # what a content token of span n sees in the cache: what its head's last token sees
        column = ((feed.pos[row] == (front - 1)[:, None]) & feed.valid[row]).int().argmax(1)
        sees = feed.mask[row, 0, column, : st.col_pos.shape[1]]
        alive = torch.ones_like(front, dtype=torch.bool)
        while True:
            st.critical += torch.bincount(row[alive], minlength=n_rows) > 0
            tokens, _ = sample_tokens(lg, generator, self.temperature, self.top_p, self.top_k)
            live = alive.nonzero().squeeze(1)
            x[row[live], front[live]] = tokens
            front[live] += 1
            alive &= front < end
            if self.pad_ends_span:  # a span that wrote a pad is pads to its end
                for n in live[tokens == pad].tolist():
                    x[row[n], front[n] : end[n]] = pad
                    alive[n] = False
            if not bool(alive.any()):
                break
            live = alive.nonzero().squeeze(1)
            r = row[live]
            counts = torch.bincount(r, minlength=n_rows)
            k = torch.arange(len(live), device=dev) - (counts.cumsum(0) - counts)[r]  # column within its row
            width = int(counts.max())
            ids = torch.full((n_rows, width), pad, dtype=torch.long, device=dev)
            pos = torch.zeros_like(ids)
            fed = torch.zeros_like(ids, dtype=torch.bool)
            ids[r, k], pos[r, k], fed[r, k] = x[r, front[live] - 1], front[live] - 1, True
            old = torch.zeros(n_rows, width, sees.shape[1], dtype=torch.bool, device=dev)
            old[r, k] = sees[live]
            new = torch.eye(width, dtype=torch.bool, device=dev).expand(n_rows, width, width)
            out = lm.forward(ids, torch.cat([old, new], 2)[:, None], pos, past_key_values=st.cache, use_cache=True)
            lg = ban_tokens(out.logits[r, k], lm, forbidden)
            st.col_pos = torch.cat([st.col_pos, torch.where(fed, pos, -1)], dim=1)
            mine = torch.zeros(len(front), width, dtype=torch.bool, device=dev)  # span n sees its new column
            mine[live, k] = True
            sees = torch.cat([sees, mine], dim=1)
        st.cache.crop(c0 - st.col_pos.shape[1])  # the next round recomputes the spans with their closing tags
        st.col_pos = st.col_pos[:, :c0]
        self._close_spans(lm, st, rnd)

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
