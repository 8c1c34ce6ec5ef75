"""Planned diffusion decoding (Algorithm 1 of the paper), sparse attention.

Round after round, until the end token or the length cap:

1. **Plan**: decode autoregressively (KV cached) until the round's terminator
   (``<sync/>`` or EOS): plan entries ``<topic>WORDS N</topic>``.
2. **Scaffold**: one span ``<async>[WORDS</topic>]<mask/>*L</async>`` per entry,
   ``L = N * length_unit * length_scale``, inserted before the terminator.
3. **Denoise** every span of every row in parallel, one forward pass per step,
   under the hybrid mask (:mod:`pdlightning.masks`), then append the spans and
   the terminator; after ``<sync/>`` the next plan sees the spans.

Batching and caching: each row keeps its own *logical* sequence (positions
``0..L-1`` give ``position_ids`` and the hybrid mask). The batch shares one KV
cache whose *physical* columns grow in lockstep; a row with fewer new tokens
leaves holes that nothing attends. ``col_pos[b, c]`` maps a column to its
logical position (-1 = hole), so each pass's 4D mask is the logical hybrid mask
gathered onto the columns. Denoising passes feed the uncached tail and the
scaffold, then are cropped from the cache; a span that is complete is fed no
more (sparse variant: nothing else in the round sees it); the filled spans and
terminator are cached by the next round's first planning pass. The round's later
planning passes feed each row its one new plan token, which the hybrid mask lets
see every cached column: they skip the packing and the mask of the general pass,
and cost what an AR pass does. A batch thus decodes like its rows one by one
(temperature 0).

``draft_plan_tags`` (on by default; ours): the plan's grammar often knows
the next tokens (``<topic>`` to open a round, ``</topic>`` after an entry's length,
``<topic>`` after that), so a planning pass also feeds them as drafts, each seeing
the token before it. The token drawn after the last real token is compared with
the first draft; if they agree the draft is kept and the token drawn after it is
compared with the next, and so on (speculative decoding with the grammar as
drafter). With ``draft_plan_lengths`` (on by default; ours) an entry's topic words
are followed by a draft of its length too, the length of the round's entry
before it, then ``</topic> <topic>``: a plan's entries mostly share one length,
and an entry whose length is guessed right costs one pass instead of two.
Drafts that are not kept stay holes in the cache. The response is the
one a pass per plan token writes, in fewer passes, up to floating-point rounding:
keys computed in a wider pass may round differently, which can flip a near-tie,
as caching itself can (1 answer of 300 on the tiny model, at r = 0.25).

``span_cache`` (off by default; approximate, ours) goes further within a round:
a span position that is settled (its tag, topic head, or a token committed in
an earlier step) is fed once more and its keys and values are then *held* in the
cache for the rest of the round (delayed caching, as dKV-Cache does for
diffusion LMs), so a pass feeds only the masked positions, the positions whose
logits score them (``shifted``: the one before each) and the tokens committed
by the step before. Held keys and values are stale: they were computed while
other positions of their span were still masked. At the end of the round they
are dropped, and the next round's first pass recomputes the filled spans exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pdlightning.decoding.base import DecodingStrategy, RowOutput, register
from pdlightning.decoding.lm import LanguageModel
from pdlightning.decoding.sampling import (
    UnmaskOrder,
    check_order,
    sample_tokens,
    top_probability,
    unmask_scores,
)
from pdlightning.layout import head_ids
from pdlightning.masks import Structure, mask_from_structure, structure
from pdlightning.tags import PlanEntry

_ENTRY = re.compile(r"^\s*(?P<topic>.*?)\s*(?P<n>\d+)\s*$", re.DOTALL)
_NUMBER = re.compile(r"^\s*\d+\s*$")
_FORBIDDEN_IN_SPANS = ("plan_open", "plan_close", "span_open", "span_close", "sync", "end", "mask")
_SPAN_TOKENS = ("span_open", "span_close", "pad", "mask")


def parse_plan(ids: list[int], lm: LanguageModel) -> tuple[list[PlanEntry], list[str]]:
    """Plan entries in the ids of one round's plan, skipping what does not parse.

    Args:
        ids: Plan ids of one round (terminator excluded).
        lm: Supplies the tag spec and the tokenizer that decodes entry bodies.

    Returns:
        The entries (length in units, as written) and a repair note per skip.
    """
    spec = lm.spec
    po, pc = spec.id("plan_open"), spec.id("plan_close")
    entries: list[PlanEntry] = []
    repairs: list[str] = []
    body: list[int] | None = None
    stray = False
    for tok in ids:
        if tok == po:
            if body is not None:
                repairs.append("unclosed plan entry skipped")
            body = []
        elif tok == pc and body is not None:
            text = lm.tokenizer.decode(body)
            m = _ENTRY.match(text)
            if m is None:
                repairs.append(f"unparseable plan entry {text[:30]!r} skipped")
            else:
                entries.append(PlanEntry(topic=m.group("topic").strip(), length=int(m.group("n"))))
            body = None
        elif body is not None:
            body.append(tok)
        else:
            stray = True
    if body is not None:
        repairs.append("unclosed plan entry skipped")
    if stray:
        repairs.append("text outside plan entries ignored")
    return entries, repairs


@dataclass
class _Feed:
    """The layout of one pass: per row, the logical positions fed and the mask over the cache.

    Attributes:
        pos: ``[B, K]`` logical position fed in each column (any position where not valid).
        valid: ``[B, K]`` which columns feed a real position (the others are holes).
        lens: ``[B]`` positions fed per row.
        cols: ``[B, C + K]`` logical position of every cache column after the pass, -1 = hole.
        mask: ``[B, 1, K, C + K]`` bool attention mask.
        lead: ``[B]`` leading fed positions of each row that a cropped pass holds
            in the cache (``span_cache``; 0 otherwise).
    """

    pos: torch.Tensor
    valid: torch.Tensor
    lens: torch.Tensor
    cols: torch.Tensor
    mask: torch.Tensor
    lead: torch.Tensor


@dataclass
class _Round:
    """One round's scaffold of a batch, filled in place by the denoising passes.

    Attributes:
        x: ``[B, L]`` logical ids: each row's sequence, then its spans (tag, head, masks, tag).
        lengths: ``[B]`` valid length of each row.
        group: ``[B, L]`` span of each position, ``row * width + k`` (-1 outside spans).
        content: ``[B, L]`` bool, span content (not a tag, not a head).
        width: Spans of the row with the most.
        n_spans: Spans of each row.
        rows: Rows with spans this round.
    """

    x: torch.Tensor
    lengths: torch.Tensor
    group: torch.Tensor
    content: torch.Tensor
    width: int
    n_spans: list[int]
    rows: list[int]


class _State:
    """Per-row bookkeeping of one batch (lists indexed by row) and the shared KV cache.

    Attributes:
        n_cached: ``[B]`` logical positions held by the cache (a prefix of ``seq``).
        col_pos: ``[B, C]`` logical position of each cache column, -1 = hole.
        critical: ``[B]`` planning passes + denoising steps.
    """

    def __init__(self, prompts: list[list[int]], cache: Any, device: torch.device) -> None:
        b = len(prompts)
        self.seq = [list(p) for p in prompts]
        self.prompt_len = [len(p) for p in prompts]
        self.cache = cache
        self.n_cached = torch.zeros(b, dtype=torch.long, device=device)
        self.col_pos = torch.zeros(b, 0, dtype=torch.long, device=device)
        self.critical = torch.zeros(b, dtype=torch.long, device=device)
        self.done, self.rounds = [False] * b, [0] * b
        self.plan_start, self.terminator = [0] * b, [0] * b
        self.repairs: list[list[str]] = [[] for _ in range(b)]
        self.entries: list[list[PlanEntry]] = [[] for _ in range(b)]
        self.spans: list[list[str]] = [[] for _ in range(b)]
        self.answer: list[list[int]] = [[] for _ in range(b)]

    def generated(self, b: int) -> int:
        return len(self.seq[b]) - self.prompt_len[b]


@register("planned")
class PlannedDiffusion(DecodingStrategy):
    """Planned diffusion: autoregressive plan, then parallel diffusion of the spans.

    Each denoising step is one pass over the spans of every unfinished row;
    a span commits ``ceil(masks left / steps left)`` positions (at least its
    top-1), so it is complete within ``ceil(r * longest span)`` steps (more
    when ``threshold`` holds unsure positions back, fewer when
    ``parallel_threshold`` commits sure ones early). An
    imperfect plan is repaired, never fatal (``RowOutput.repairs``): bad
    entries are skipped, lengths clamped, and a plan closed by force (runaway,
    span token while planning, length cap) ends the response after its spans.

    Args:
        step_ratio: ``r``: a round denoises in ``ceil(r * longest span)`` steps.
        threshold: ``tau``: of its quota, a span holds back the positions whose
            sampled token has probability below ``tau`` (its top-1 always
            commits, so every span finishes; more steps, higher quality);
            None or 0 = off.
        parallel_threshold: Fast-dLLM's rule inside the spans: besides its quota, a
            span commits every masked position whose sampled token has
            probability at least this, so a span the model is sure of finishes
            in fewer passes than ``r`` allows (``r`` still bounds them: the
            quota is recomputed from the masks left). None = off.
        length_scale: Multiplies every planned length.
        topic_heads: Open each span with its topic words and ``</topic>``
            (models trained here: True; the authors' checkpoints: False).
        sync: Allow several rounds; False ends after the first round (a
            generated ``<sync/>`` is replaced by EOS).
        order: Which masked positions of a span commit first: ``entropy``
            (lowest), ``confidence`` (highest), ``random`` or ``left_to_right``
            (the leftmost: at r = 1 each span is written left to right, the
            spans still in parallel).
        max_plan_tokens: Plan tokens per round before the round is closed.
        max_spans: Plan entries kept per round.
        max_span_tokens: Upper bound of one span's length in tokens.
        max_rounds: Rounds per response; a later ``<sync/>`` becomes EOS.
        use_cache: Reuse keys and values of the prompt, plans and filled spans
            (False recomputes everything each pass: same output, slower).
        span_cache: Approximate: hold a settled span position's keys and values
            in the cache for the rest of its round instead of recomputing them
            each pass (module docstring). Fewer positions per pass; the output
            may differ from the exact decoder's. Needs ``use_cache``.
        draft_plan_tags: Feed the plan tags that the plan grammar predicts
            (``<topic>`` to open a round or after ``</topic>``, ``</topic>``
            after an entry's length) in the same pass as the token before them,
            and keep each one the model then draws (ours; speculative decoding:
            the same response in fewer passes, up to floating-point rounding;
            with ``use_cache`` only). False = one plan token per pass.
        draft_plan_lengths: With ``draft_plan_tags``, also draft an entry's
            length once it has topic words: the length of the round's entry
            before it, then ``</topic> <topic>`` (ours; entries of a plan mostly
            share one length, so an entry costs one pass instead of two).
        max_new_tokens: Cap on everything generated after the prompt: plans,
            span tags, topic heads and pads as well as the answer (600: on the
            bundled set PD writes up to about 310 tokens where AR writes 215).
        temperature: 0 = greedy (plan and spans).
        top_p: Nucleus mass.
        top_k: Top-k cut (0 = off).
        batch_size: Prompts decoded together.
    """

    #: Spans of one round attend to each other (the dense variant).
    dense: ClassVar[bool] = False
    #: Stop feeding a span once it is complete (sparse variant only; exact, as no
    #: other span sees it). False feeds every span to the end of the round.
    skip_finished_spans: ClassVar[bool] = True
    #: Spans attend causally inside (the ``planned_ar`` mask) and are written left to
    #: right, one token per span per pass (:class:`~pdlightning.decoding.planned_ar.PlannedAR`).
    causal_spans: ClassVar[bool] = False
    #: With ``causal_spans``: a span's first pad ends it (the rest of it is pads).
    pad_ends_span: bool = False

    def __init__(
        self,
        step_ratio: float = 1.0,
        threshold: float | None = None,
        parallel_threshold: float | None = None,
        length_scale: float = 1.0,
        topic_heads: bool = True,
        sync: bool = True,
        order: UnmaskOrder = "entropy",
        max_plan_tokens: int = 64,
        max_spans: int = 16,
        max_span_tokens: int = 256,
        max_rounds: int = 8,
        use_cache: bool = True,
        span_cache: bool = False,
        draft_plan_tags: bool = True,
        draft_plan_lengths: bool = True,
        max_new_tokens: int = 600,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__(max_new_tokens, temperature, top_p, top_k, batch_size)
        if not 0 < step_ratio <= 1:  # above 1 would silently act as 1 (a pass commits at least one per span)
            raise ValueError(f"step_ratio (r) must be in (0, 1], got {step_ratio}")
        if not 0 < length_scale < math.inf:
            raise ValueError(f"length_scale must be a number > 0, got {length_scale}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if parallel_threshold is not None and not 0 < parallel_threshold <= 1:
            raise ValueError(f"parallel_threshold must be in (0, 1] or None, got {parallel_threshold}")
        check_order(order)
        if span_cache and not use_cache:
            raise ValueError("span_cache holds span keys and values in the KV cache: it needs use_cache=True")
        if min(max_plan_tokens, max_spans, max_span_tokens, max_rounds) < 1:
            raise ValueError(
                "max_plan_tokens, max_spans, max_span_tokens and max_rounds must be >= 1"
            )
        self.step_ratio = step_ratio
        self.threshold = threshold or None
        self.parallel_threshold = parallel_threshold
        #: Called as ``on_spans(row, entries, spans)`` when a round's spans are complete
        #: (``row`` indexes the current batch), e.g. to print spans as they finish.
        self.on_spans: Callable[[int, list[PlanEntry], list[str]], None] | None = None
        self.length_scale = length_scale
        self.topic_heads = topic_heads
        self.sync = sync
        self.order = order
        self.max_plan_tokens = max_plan_tokens
        self.max_spans = max_spans
        self.max_span_tokens = max_span_tokens
        self.max_rounds = max_rounds
        self.use_cache = use_cache
        self.span_cache = span_cache
        self.draft_plan_tags = draft_plan_tags
        self.draft_plan_lengths = draft_plan_lengths

    # ------------------------------------------------------------------ driver

    def decode_batch(
        self, lm: LanguageModel, prompts: list[list[int]], generator: torch.Generator
    ) -> list[RowOutput]:
        """Decode one batch of tokenised prompts; one :class:`RowOutput` per prompt."""
        st = _State(prompts, lm.new_cache() if self.use_cache else None, lm.device)
        while not all(st.done):
            self._plan_round(lm, st, generator)
            self._denoise_round(
                lm, st, [self._scaffold_plan(lm, st, i) for i in range(len(prompts))], generator
            )
        return [
            RowOutput(
                token_ids=st.seq[i][st.prompt_len[i] :],
                answer_ids=st.answer[i],
                critical_path=int(st.critical[i]),
                plan=st.entries[i],
                spans=st.spans[i],
                repairs=st.repairs[i],
            )
            for i in range(len(prompts))
        ]

    # ------------------------------------------------------------------ forward

    def _feed(
        self,
        lm: LanguageModel,
        st: _State,
        x: torch.Tensor,
        lengths: torch.Tensor,
        active: torch.Tensor,
        skip: torch.Tensor | None = None,
        hold: torch.Tensor | None = None,
        logical: Structure | None = None,
    ) -> _Feed:
        """What a pass over the uncached tail ``x[b, n_cached[b]:lengths[b]]`` of every active row feeds.

        Args:
            lm: The model.
            st: Batch state (``n_cached``, ``col_pos``).
            x: Logical ids ``[B, L]``, right padded.
            lengths: Valid length of each row ``[B]``.
            active: Rows fed ``[B]`` bool; the others are all holes.
            skip: ``[B, L]`` bool, tail positions left out (finished spans that
                nothing fed attends to); only for passes cropped from the cache.
            hold: ``[B, L]`` bool, fed positions a cropped pass keeps in the cache
                (``span_cache``): they are fed first, and ``lead`` counts them.
            logical: ``structure(x, lm.spec, lengths)`` when the caller has it
                (it does not change while spans are filled).
        """
        n = st.n_cached
        at = torch.arange(x.shape[1], device=x.device)
        fed = (at >= n[:, None]) & (at < lengths[:, None]) & active[:, None]
        if skip is not None:
            fed &= ~skip
        lens = fed.sum(1)
        ar = torch.arange(int(lens.max()), device=x.device)
        valid = ar < lens[:, None]
        # the fed positions of each row in order (held ones first), then the others (read as holes)
        hold = fed & hold if hold is not None else torch.zeros_like(fed)
        key = 2 * (~fed).to(torch.uint8) + (~hold).to(torch.uint8)
        pos = torch.argsort(key, dim=1, stable=True)[:, : len(ar)]
        logical = structure(x, lm.spec, lengths) if logical is None else logical
        cols = torch.cat([st.col_pos, torch.where(valid, pos, -1)], dim=1)
        safe = cols.clamp(min=0)
        physical = Structure(
            span=logical.span.gather(1, safe),
            syncs=logical.syncs.gather(1, safe),
            scaffold=logical.scaffold.gather(1, safe),
            valid=cols >= 0,
        )
        mask = mask_from_structure(
            physical, dense=self.dense, rows_from=st.col_pos.shape[1],
            causal_spans=self.causal_spans, positions=cols if self.causal_spans else None,
        )
        return _Feed(pos=pos, valid=valid, lens=lens, cols=cols, mask=mask, lead=hold.sum(1))

    def _forward(
        self,
        lm: LanguageModel,
        st: _State,
        x: torch.Tensor,
        feed: _Feed,
        want: torch.Tensor,
        keep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass as laid out by ``feed``, returning logits only where ``want`` says.

        Args:
            lm: The model.
            st: Batch state (cache, ``n_cached``, ``col_pos``).
            x: Logical ids ``[B, L]`` (the fed positions are read now).
            feed: From :meth:`_feed` with the same cache state.
            want: ``[B, L]`` bool, logical positions whose logits are needed.
            keep: Keep the fed positions in the cache (else crop them again, all but
                the ``feed.lead`` first of each row, held after the cached prefix:
                ``n_cached`` is unchanged).

        Returns:
            Logits ``[B, K, V]`` and ``slot [B, L]``: the index into ``K`` of a
            logical position's logits (-1 = not computed).
        """
        ids = torch.where(feed.valid, x.gather(1, feed.pos), lm.spec.id("pad"))
        wanted = want.gather(1, feed.pos) & feed.valid
        columns = wanted.any(0).nonzero().squeeze(1)
        index = torch.full((ids.shape[1],), -1, dtype=torch.long, device=x.device)
        index[columns] = torch.arange(len(columns), device=x.device)
        slot = torch.full_like(x, -1)
        slot[feed.valid.nonzero(as_tuple=True)[0], feed.pos[feed.valid]] = index.expand_as(ids)[feed.valid]
        out = lm.forward(
            ids,
            feed.mask,
            torch.where(feed.valid, feed.pos, 0),
            past_key_values=st.cache,
            use_cache=st.cache is not None,
            keep=columns,
        )
        if st.cache is not None:
            if keep:
                st.col_pos, st.n_cached = feed.cols, st.n_cached + feed.lens
            else:
                k = int(feed.lead.max())
                st.cache.crop(k - ids.shape[1])
                lead = torch.arange(k, device=x.device) < feed.lead[:, None]
                st.col_pos = torch.cat([st.col_pos, torch.where(lead, feed.pos[:, :k], -1)], dim=1)
        logits = out.logits
        if logits.shape[-1] > len(lm.tokenizer):  # padded embedding rows are not tokens
            logits = logits.clone()
            logits[..., len(lm.tokenizer) :] = float("-inf")
        return logits, slot

    @staticmethod
    def _pack(
        lm: LanguageModel, rows: list[list[int]] | list[list[bool]], fill: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``[B, L]`` long tensor of lists (padding = ``fill``) and the lengths ``[B]``."""
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        x = torch.full((len(rows), int(lengths.max())), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return x.to(lm.device), lengths.to(lm.device)

    # ------------------------------------------------------------------ planning

    def _plan_round(self, lm: LanguageModel, st: _State, generator: torch.Generator) -> None:
        """Decode this round's plan of every unfinished row (step 1).

        The plan stream is next-token under either logits convention."""
        planning: set[int] = set()
        for b in range(len(st.seq)):
            if st.done[b]:
                continue
            if st.generated(b) >= self.max_new_tokens - 1:
                st.repairs[b].append("length cap reached before planning")
                st.done[b] = True
                continue
            st.plan_start[b] = len(st.seq[b])
            planning.add(b)
        plain = False  # the round's later passes feed one plan token a row, seeing every cached column
        while planning:
            rows = sorted(planning)
            idx = torch.tensor(rows, device=lm.device)
            drafting = self.draft_plan_tags and st.cache is not None
            drafts = [self._draft_plan(lm, st, b) if drafting else [] for b in rows]
            width = st.col_pos.shape[1]
            if plain:
                logits = self._plan_pass(lm, st, rows, drafts)
                cols = [list(range(width + 1, width + 1 + len(d))) for d in drafts]
            else:  # the round's first pass feeds the uncached tail: the prompt, or the last round's spans
                logits, plain, cols = self._first_plan_pass(lm, st, rows, drafts)
            toks, _ = sample_tokens(logits, generator, self.temperature, self.top_p, self.top_k)
            st.critical[idx] += 1
            for i, (b, row_toks) in enumerate(zip(rows, toks.tolist(), strict=True)):
                accepted = 0
                for tok in row_toks[: len(drafts[i]) + 1]:
                    if self._plan_token(lm, st, b, tok):
                        planning.discard(b)
                    if b not in planning or accepted == len(drafts[i]) or tok != drafts[i][accepted]:
                        break
                    accepted += 1  # the draft was fed after the token before it: its logits are next
                if accepted:  # the kept drafts' columns become real: the positions after the cached prefix
                    kept = torch.tensor(cols[i][:accepted], dtype=torch.long, device=lm.device)
                    st.col_pos[b, kept] = st.n_cached[b] + torch.arange(accepted, device=lm.device)
                    st.n_cached[b] += accepted

    def _first_plan_pass(
        self, lm: LanguageModel, st: _State, rows: list[int], drafts: list[list[int]]
    ) -> tuple[torch.Tensor, bool, list[list[int]]]:
        """A round's first planning pass: every row's uncached tail (the prompt, or the last
        round's spans and terminator) and its drafts, through the general :meth:`_feed`.

        Returns the logits ``[len(rows), 1 + max drafts, V]`` (as :meth:`_plan_pass`),
        whether the round's later passes may take :meth:`_plan_pass`, and each row's
        draft columns, left as holes in the cache.
        """
        dev = lm.device
        idx = torch.tensor(rows, device=dev)
        for b, d in zip(rows, drafts, strict=True):
            st.seq[b].extend(d)
        active = torch.zeros(len(st.seq), dtype=torch.bool, device=dev)
        active[rows] = True
        x, lengths = self._pack(lm, st.seq, lm.spec.id("pad"))
        k = 1 + max(map(len, drafts))
        n_drafts = torch.tensor([len(d) for d in drafts], device=dev)
        # logits after the last real token and after each draft (a row with fewer repeats its last)
        at = (lengths[idx] - 1 - n_drafts)[:, None] + torch.minimum(torch.arange(k, device=dev), n_drafts[:, None])
        want = torch.zeros_like(x, dtype=torch.bool)
        want[idx[:, None].expand_as(at), at] = True
        logical = structure(x, lm.spec, lengths)
        feed = self._feed(lm, st, x, lengths, active, logical=logical)
        out, slot = self._forward(lm, st, x, feed, want, keep=True)
        logits = out[idx[:, None], slot[idx[:, None], at]]
        cols: list[list[int]] = []
        for b, d in zip(rows, drafts, strict=True):
            del st.seq[b][len(st.seq[b]) - len(d) :]
            col = ((st.col_pos[b] >= len(st.seq[b])).nonzero().squeeze(1)).tolist()
            st.col_pos[b, col] = -1
            st.n_cached[b] -= len(d)
            cols.append(col)
        return logits, st.cache is not None and _closed(logical, lengths, idx), cols

    def _draft_plan(self, lm: LanguageModel, st: _State, b: int) -> list[int]:
        """Plan tags that the grammar predicts after row ``b``'s last token (``draft_plan_tags``).

        After a plan entry's length, ``</topic>`` and then ``<topic>`` (another entry);
        after ``</topic>`` or at the start of a round, ``<topic>``; after topic words
        with no length yet, the round's previous entry's length and both tags
        (``draft_plan_lengths``). A guess only:
        :meth:`_plan_round` keeps a draft token when the model draws it
        (speculative decoding with a grammar for drafter).
        """
        po, pc = lm.spec.id("plan_open"), lm.spec.id("plan_close")
        plan = st.seq[b][st.plan_start[b] :]
        if not plan or plan[-1] == pc:
            return [po]
        opened = len(plan) - 1 - plan[::-1].index(po) if po in plan else -1
        body = plan[opened + 1 :]
        if opened < 0 or not body or pc in body:
            return []
        if _ENTRY.match(lm.tokenizer.decode(body)) is not None:
            return [pc, po]
        length = self._last_length(lm, plan[:opened]) if self.draft_plan_lengths else []
        return [*length, pc, po] if length else []

    @staticmethod
    def _last_length(lm: LanguageModel, plan: list[int]) -> list[int]:
        """The length tokens of the last closed entry of ``plan`` (``[]`` if none)."""
        po, pc = lm.spec.id("plan_open"), lm.spec.id("plan_close")
        if pc not in plan:
            return []
        close = len(plan) - 1 - plan[::-1].index(pc)
        start = close  # the longest run of the entry's tokens before ``</topic>`` that is a number alone
        while start > 0 and plan[start - 1] != po and _NUMBER.match(lm.tokenizer.decode(plan[start - 1 : close])):
            start -= 1
        return plan[start:close]

    def _plan_pass(self, lm: LanguageModel, st: _State, rows: list[int], drafts: list[list[int]]) -> torch.Tensor:
        """One planning pass feeding each row of ``rows`` its last token and its drafts, cached.

        The exact shortcut of :meth:`_feed` and :meth:`_forward` for a pass whose fed
        positions are plan tokens after a :func:`_closed` prefix: such a token is outside
        every span, and every earlier span ends before a ``<sync/>`` it sees, so the
        hybrid mask lets it see every cached column and the tokens fed before it
        (rules 1 and 4). No packing and no structure over the whole sequence: a plan
        token costs what an AR token does.

        Draft columns enter the cache as holes; :meth:`_plan_round` makes the
        kept ones real. Returns logits ``[len(rows), 1 + max drafts, V]``:
        ``[:, j]`` is the next-token distribution after the row's ``j``-th draft.
        """
        dev, b, k = lm.device, len(st.seq), 1 + max(map(len, drafts))
        idx = torch.tensor(rows, device=dev)
        ids = torch.full((b, k), lm.spec.id("pad"), dtype=torch.long, device=dev)
        pos = torch.zeros(b, k, dtype=torch.long, device=dev)
        fed = torch.zeros(b, k, dtype=torch.bool, device=dev)
        for r, d in zip(rows, drafts, strict=True):
            n = len(st.seq[r]) - 1
            ids[r, : 1 + len(d)] = torch.tensor([st.seq[r][-1], *d], device=dev)
            pos[r, : 1 + len(d)] = torch.arange(n, n + 1 + len(d), device=dev)
            fed[r, : 1 + len(d)] = True
        # a fed column sees the row's cache and the fed columns up to itself; a hole only itself
        new = torch.tril(torch.ones(k, k, dtype=torch.bool, device=dev)) & fed[:, None, :] & fed[:, :, None]
        new |= torch.eye(k, dtype=torch.bool, device=dev)
        old = (st.col_pos >= 0)[:, None, :] & fed[:, :, None]
        out = lm.forward(ids, torch.cat([old, new], 2)[:, None], pos, past_key_values=st.cache, use_cache=True)
        real = fed & (torch.arange(k, device=dev) == 0)  # drafts stay holes until accepted
        st.col_pos = torch.cat([st.col_pos, torch.where(real, pos, -1)], dim=1)
        st.n_cached = st.n_cached + real.sum(1)
        logits = out.logits[idx]
        if logits.shape[-1] > len(lm.tokenizer):  # padded embedding rows are not tokens
            logits[..., len(lm.tokenizer) :] = float("-inf")
        return logits

    def _plan_token(self, lm: LanguageModel, st: _State, b: int, tok: int) -> bool:
        """Take one planned token of row ``b``; True when the row's plan of this round is over."""
        spec = lm.spec
        sync, end = spec.id("sync"), spec.id("end")
        if tok in (sync, end):
            st.terminator[b] = tok
            if tok == sync and not self.sync:
                st.terminator[b] = end
            elif tok == sync and st.rounds[b] + 1 >= self.max_rounds:
                st.terminator[b] = end
                st.repairs[b].append(f"max_rounds {self.max_rounds} reached: ended")
            return True
        names = {spec.id(n): n for n in _SPAN_TOKENS}
        if tok in names:
            st.terminator[b] = end
            st.repairs[b].append(f"{names[tok]} token while planning: plan closed")
            return True
        st.seq[b].append(tok)
        if st.generated(b) >= self.max_new_tokens - 1:
            st.terminator[b] = end
            st.repairs[b].append("length cap while planning: plan closed")
            return True
        if len(st.seq[b]) - st.plan_start[b] >= self.max_plan_tokens:
            st.terminator[b] = end
            st.repairs[b].append(f"runaway plan: closed after {self.max_plan_tokens} tokens")
            return True
        return False

    def _scaffold_plan(self, lm: LanguageModel, st: _State, b: int) -> list[tuple[str, int]]:
        """Topic and length in tokens of each span of row ``b``'s round (step 2), repairs recorded."""
        if st.done[b]:
            return []
        entries, notes = parse_plan(st.seq[b][st.plan_start[b] :], lm)
        st.repairs[b].extend(notes)
        if len(entries) > self.max_spans:
            st.repairs[b].append(f"{len(entries)} plan entries: kept {self.max_spans}")
            entries = entries[: self.max_spans]
        spans: list[tuple[str, int]] = []
        room = self.max_new_tokens - st.generated(b) - 1  # the terminator always fits
        for e in entries:
            n = round(e.length * lm.spec.length_unit * self.length_scale)
            if n < 1:
                st.repairs[b].append(f"length {e.length} raised to 1 token")
            elif n > self.max_span_tokens:
                st.repairs[b].append(f"length {e.length} clamped to {self.max_span_tokens} tokens")
            n = min(max(n, 1), self.max_span_tokens)
            head = head_ids(lm.tokenizer, lm.spec, e.topic) if self.topic_heads else []
            overhead = 2 + len(head)
            if room < overhead + 1:
                st.repairs[b].append("span dropped: length cap")
                continue
            if overhead + n > room:
                st.repairs[b].append(f"span truncated to {room - overhead} tokens: length cap")
                n = room - overhead
            room -= overhead + n
            spans.append((e.topic, n))
            st.entries[b].append(e)
        if not spans:
            if st.terminator[b] != lm.spec.id("end") or st.rounds[b] == 0:
                st.repairs[b].append("plan with no spans: response ended")
            st.seq[b].append(lm.spec.id("end"))
            st.done[b] = True
        return spans

    # ------------------------------------------------------------------ denoising

    def _denoise_round(
        self,
        lm: LanguageModel,
        st: _State,
        plans: list[list[tuple[str, int]]],
        generator: torch.Generator,
    ) -> None:
        """Fill every planned span of every row in parallel (steps 3-5), then close the round."""
        spec, dev = lm.spec, lm.device
        rnd = self._lay_out_round(lm, st, plans)
        if rnd is None:
            return
        x, lengths, group, content, width = rnd.x, rnd.lengths, rnd.group, rnd.content, rnd.width
        is_mask = content.clone()
        longest = torch.tensor([max((n for _, n in p), default=0) for p in plans], device=dev)
        steps = torch.ceil(self.step_ratio * longest.double()).long().clamp(min=1)
        taken = torch.zeros_like(steps)
        forbidden = torch.tensor([spec.id(n) for n in _FORBIDDEN_IN_SPANS], device=dev)
        # A finished span is fed no more in the sparse variant (no other span sees it,
        # and the next round's first pass caches it); the layout changes only then.
        n_groups = len(plans) * width
        slot_of = torch.where(group >= 0, group, n_groups)  # n_groups: outside every span

        def finished_spans() -> torch.Tensor:
            done = torch.bincount(group[is_mask], minlength=n_groups + 1) == 0
            done[-1] = False
            return done

        skipping = self.skip_finished_spans and not self.dense
        finished = finished_spans()
        logical = structure(x, spec, lengths)  # committed tokens are never tags
        feed = self._feed(lm, st, x, lengths, is_mask.any(1), logical=logical)
        holding = self.span_cache and st.cache is not None
        c0 = st.col_pos.shape[1]  # cache columns before the round (span_cache holds more after them)
        held = torch.zeros_like(is_mask)  # span_cache: logical positions whose keys and values are held
        while bool(is_mask.any()):
            active = is_mask.any(1)
            front = self._scored(is_mask)
            want = torch.zeros_like(is_mask)
            want[:, : want.shape[1] - lm.shift] = front[:, lm.shift :]
            if skipping:
                now = finished_spans()
                if bool((now != finished).any()) and not holding:
                    feed = self._feed(lm, st, x, lengths, active, skip=now[slot_of], logical=logical)
                finished = now
            if holding:  # the fed set changes every pass
                # settled and no logits needed: never needed again this round
                skip = held | finished[slot_of] if skipping else held
                if self.causal_spans:  # keys see only the left of their span: exact once written
                    hold = ~is_mask
                    skip = skip | (is_mask & ~want)  # masks no pass needs yet
                else:
                    hold = ~is_mask & ~want
                feed = self._feed(lm, st, x, lengths, active, skip=skip, hold=hold, logical=logical)
                rows_fed = torch.arange(len(x), device=dev)[:, None].expand_as(feed.pos)
                lead = torch.arange(feed.pos.shape[1], device=dev) < feed.lead[:, None]
                held[rows_fed[lead], feed.pos[lead]] = True
            logits, slot = self._forward(lm, st, x, feed, want, keep=False)
            bi, pi = front.nonzero(as_tuple=True)
            lg = logits[bi, slot[bi, pi - lm.shift]]
            lg[:, forbidden] = float("-inf")
            tokens, probs = sample_tokens(lg, generator, self.temperature, self.top_p, self.top_k)
            grp = group[bi, pi]
            left = (steps - taken).clamp(min=1).repeat_interleave(width)
            commit = self._commit(tokens, probs, grp, pi, left, generator)
            x[bi[commit], pi[commit]] = tokens[commit]
            is_mask[bi[commit], pi[commit]] = False
            if self.pad_ends_span:  # a span that wrote a pad is pads to its end
                ended = torch.zeros(n_groups + 1, dtype=torch.bool, device=dev)
                ended[grp[commit & (tokens == spec.id("pad"))]] = True
                rest = is_mask & ended[slot_of]
                x[rest], is_mask[rest] = spec.id("pad"), False
            taken += active.long()
            st.critical += active.long()
        if holding:  # drop the stale span columns: the next round recomputes the spans exactly
            st.cache.crop(c0 - st.col_pos.shape[1])
            st.col_pos = st.col_pos[:, :c0]
        self._close_spans(lm, st, rnd)

    def _lay_out_round(self, lm: LanguageModel, st: _State, plans: list[list[tuple[str, int]]]) -> _Round | None:
        """Every row's scaffold of this round: its sequence, then per planned span its tag, head and masks."""
        spec = lm.spec
        rows = [b for b, p in enumerate(plans) if p]
        if not rows:
            return None
        full, group_of, content_of = [], [], []
        width = max(len(p) for p in plans)
        for b, plan in enumerate(plans):
            ids, grp, cont = list(st.seq[b]), [-1] * len(st.seq[b]), [False] * len(st.seq[b])
            for k, (topic, n) in enumerate(plan):
                head = head_ids(lm.tokenizer, spec, topic) if self.topic_heads else []
                ids += [spec.id("span_open"), *head, *[spec.id("mask")] * n, spec.id("span_close")]
                grp += [b * width + k] * (n + 2 + len(head))
                cont += [False] * (1 + len(head)) + [True] * n + [False]
            full.append(ids)
            group_of.append(grp)
            content_of.append(cont)
        x, lengths = self._pack(lm, full, spec.id("pad"))
        group = self._pack(lm, group_of, -1)[0]
        content = self._pack(lm, content_of, False)[0].bool()
        return _Round(x, lengths, group, content, width, [len(p) for p in plans], rows)

    def _close_spans(self, lm: LanguageModel, st: _State, rnd: _Round) -> None:
        """Close the round of every row that had spans (:meth:`_close_round`)."""
        for b in rnd.rows:
            seg = slice(len(st.seq[b]), int(rnd.lengths[b]))
            self._close_round(
                lm, st, b, rnd.x[b, seg], rnd.group[b, seg] - b * rnd.width, rnd.content[b, seg], rnd.n_spans[b]
            )

    def _scored(self, is_mask: torch.Tensor) -> torch.Tensor:
        """The masked positions ``[B, L]`` a denoising pass scores: all of them."""
        return is_mask

    def _commit(
        self,
        tokens: torch.Tensor,
        probs: torch.Tensor,
        grp: torch.Tensor,
        pos: torch.Tensor,
        left: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Which scored positions commit their sampled token this step.

        Args:
            tokens: ``[N]`` tokens sampled at the scored positions.
            probs: ``[N, V]`` their distributions.
            grp: ``[N]`` span (group) of each.
            pos: ``[N]`` logical position of each.
            left: ``[G]`` steps left to each span's row, this one included.
            generator: Randomness (``order="random"``).

        Returns:
            ``[N]`` bool: each span's quota ``ceil(masks left / steps left)`` in
            ``order``, less the unsure ones (``threshold``), plus the sure ones
            (``parallel_threshold``).
        """
        scores = unmask_scores(probs, tokens, self.order, generator, pos)
        remaining = torch.bincount(grp, minlength=len(left))
        quota = torch.div(remaining + left - 1, left, rounding_mode="floor")
        rank = _rank_in_group(scores, grp)
        commit = rank < quota[grp]
        if self.threshold is not None or self.parallel_threshold is not None:
            p = top_probability(probs, tokens)
            if self.threshold is not None:  # hold back unsure positions; each span's top-1 always commits
                commit &= (p >= self.threshold) | (rank == 0)
            if self.parallel_threshold is not None:  # and commit every sure one early
                commit |= p >= self.parallel_threshold
        return commit

    def _close_round(
        self,
        lm: LanguageModel,
        st: _State,
        b: int,
        filled: torch.Tensor,
        span: torch.Tensor,
        content: torch.Tensor,
        n_spans: int,
    ) -> None:
        """Append row ``b``'s filled scaffold and terminator; record its spans and answer.

        Args:
            lm: The model.
            st: Batch state.
            b: Row.
            filled: The denoised scaffold ``[S]``.
            span: Span index (in the round) of each scaffold position ``[S]``.
            content: Content (not tag, not head) positions ``[S]`` bool.
            n_spans: Spans in the round.
        """
        pad = lm.spec.id("pad")
        for k in range(n_spans):
            ids = [t for t in filled[(span == k) & content].tolist() if t != pad]
            st.answer[b].extend(ids)
            st.spans[b].append(lm.tokenizer.decode(ids))
        if self.on_spans is not None:  # stream: the round's spans are complete
            self.on_spans(b, st.entries[b][-n_spans:], st.spans[b][-n_spans:])
        st.seq[b].extend(filled.tolist())
        st.seq[b].append(st.terminator[b])
        if st.terminator[b] == lm.spec.id("end"):
            st.done[b] = True
        else:
            st.rounds[b] += 1


def _closed(logical: Structure, lengths: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether none of ``rows`` has a span in its last ``<sync/>`` block (then :meth:`PlannedDiffusion._plan_pass` applies).

    True for a planning row after the decoder's own rounds, whose spans a ``<sync/>``
    always follows; False only for a prompt with a span tag in it, whose plan then
    takes the general path.
    """
    span, syncs = logical.span[rows], logical.syncs[rows]
    last = syncs.gather(1, (lengths[rows] - 1).clamp(min=0)[:, None])
    return not bool(((span >= 0) & (syncs == last)).any())


def _rank_in_group(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Rank of each score within its group, 0 = highest (ties: earlier index first).

    Args:
        scores: ``[N]`` priorities.
        group: ``[N]`` group ids (>= 0).

    Returns:
        ``[N]`` long ranks.
    """
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(group[by_score], stable=True)]
    sorted_groups = group[order]
    counts = torch.bincount(sorted_groups)
    starts = counts.cumsum(0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=order.device) - starts[sorted_groups]
    return ranks
