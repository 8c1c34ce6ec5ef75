"""Roles and hybrid attention masks of planned diffusion (design section 4).

Row = attending position, column = attended position, ``True`` = may attend.

1. Start from causal attention.
2. Within one span ``<async> ... </async>`` (tags included): bidirectional.
3. A span is invisible to every position outside it until a ``<sync/>``.
4. From a ``<sync/>`` on, later positions see every span completed before it.
5. Dense variant: all spans of one round form one bidirectional region.

Everything is computed with cumulative sums over token ids, vectorised over
the batch; no Python loop per token or per span. Pure torch: no Lightning.

Example:
    >>> from pdlightning.tags import TagSpec
    >>> toks = "q <topic> t 1 </topic> <async> a </async> <eos/>".split()
    >>> m = hybrid_attention_mask(toks, TagSpec())
    >>> m[-1].int().tolist()  # EOS sees q and the plan, not the span
    [1, 1, 1, 1, 1, 0, 0, 0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from pdlightning.tags import CONTROL_NAMES, TagSpec


class Role(IntEnum):
    """What a position is. ``SCAFFOLD`` = span tags and topic heads (given, never targets)."""

    PROMPT = 0
    PLAN = 1
    CONTENT = 2
    SCAFFOLD = 3
    PAD = 4


@dataclass
class Structure:
    """Per-position structure of a batch of sequences, all tensors ``[B, T]``.

    Attributes:
        span: Index of the span holding the position (tags included), -1 outside.
        syncs: Number of ``<sync/>`` tokens at or before the position.
        scaffold: Span tags and topic-head tokens.
        valid: Not batch padding.
    """

    span: torch.Tensor
    syncs: torch.Tensor
    scaffold: torch.Tensor
    valid: torch.Tensor

    @property
    def inside(self) -> torch.Tensor:
        return self.span >= 0


def _ids_of(tokens: Sequence[str] | Sequence[int] | torch.Tensor, spec: TagSpec) -> tuple[torch.Tensor, TagSpec]:
    """Token strings or ids as a LongTensor, with a spec whose ids match."""
    if isinstance(tokens, torch.Tensor):
        return tokens.long(), spec
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], str):
        strings = spec.strings()
        code = {s: i for i, s in enumerate(strings[n] for n in CONTROL_NAMES)}
        other = len(CONTROL_NAMES)
        ids = torch.tensor([code.get(t, other) for t in tokens], dtype=torch.long)
        return ids, spec.with_ids({n: i for i, n in enumerate(CONTROL_NAMES)})
    return torch.tensor(tokens, dtype=torch.long), spec


def structure(ids: torch.Tensor, spec: TagSpec, lengths: torch.Tensor | None = None) -> Structure:
    """Span membership, sync counts and scaffold of every position.

    Args:
        ids: Token ids ``[B, T]`` (or ``[T]``), right padded.
        spec: Tag spec with token ids.
        lengths: Valid length of each row ``[B]``; all ``T`` when omitted.

    Returns:
        A :class:`Structure` of ``[B, T]`` tensors.
    """
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)
    valid = torch.ones_like(ids, dtype=torch.bool) if lengths is None else pos < lengths.view(-1, 1)
    opens = (ids == spec.id("span_open")) & valid
    closes = (ids == spec.id("span_close")) & valid
    n_open = opens.long().cumsum(-1)
    n_close_before = closes.long().cumsum(-1) - closes.long()
    inside = (n_open > n_close_before) & valid
    span = torch.where(inside, n_open - 1, torch.full_like(n_open, -1))
    syncs = ((ids == spec.id("sync")) & valid).long().cumsum(-1)

    # Topic head: from <async> up to the first </topic> inside the span, when there is one.
    head_close = (ids == spec.id("plan_close")) & inside
    slot = span.clamp(min=0)
    has_head = torch.zeros(b, t + 1, dtype=torch.long, device=ids.device)
    has_head.scatter_add_(1, slot, head_close.long())
    closes_before = head_close.long().cumsum(-1) - head_close.long()
    at_open = torch.zeros(b, t + 1, dtype=torch.long, device=ids.device)
    at_open.scatter_add_(1, slot, torch.where(opens, closes_before, torch.zeros_like(closes_before)))
    in_head = inside & (has_head.gather(1, slot) > 0) & (closes_before == at_open.gather(1, slot))
    scaffold = opens | closes | in_head
    return Structure(span=span, syncs=syncs, scaffold=scaffold, valid=valid)


def roles(
    ids: torch.Tensor, spec: TagSpec, prompt_lengths: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Role of every position (:class:`Role` values), ``[B, T]`` long.

    Args:
        ids: Token ids ``[B, T]``, each row ``prompt | response``, right padded.
        spec: Tag spec with token ids.
        prompt_lengths: Prompt length of each row ``[B]``.
        lengths: Valid length of each row ``[B]``.
    """
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    st = structure(ids, spec, lengths)
    pos = torch.arange(ids.shape[1], device=ids.device)
    out = torch.full_like(ids, int(Role.PLAN))
    out[st.inside] = int(Role.CONTENT)
    out[st.scaffold] = int(Role.SCAFFOLD)
    out[pos < prompt_lengths.view(-1, 1)] = int(Role.PROMPT)
    out[~st.valid] = int(Role.PAD)
    return out


def answer_ids(ids: Sequence[int], spec: TagSpec) -> list[int]:
    """The answer a generated sequence carries, as ids (what ``tags.strip`` gives as text).

    Everything from the first end token on is dropped, and pads and masks anywhere.
    A sequence with no tag (plan or span tags, ``<sync/>``) is all answer: an
    untagged response, or a planned decoder's span contents. A tagged one (a
    baseline decoder run on a planned model writes the layout token by token)
    keeps only what the layout makes :attr:`Role.CONTENT`: span text, without
    plan entries, topic heads or tags; an unclosed last span counts.

    Args:
        ids: Generated ids (prompt excluded).
        spec: Tag spec with token ids.
    """
    ids = list(ids)
    end = spec.id("end")
    if end in ids:
        ids = ids[: ids.index(end)]
    dropped = {spec.id("pad"), spec.id("mask")}
    tags = {spec.id(n) for n in ("plan_open", "plan_close", "span_open", "span_close", "sync")}
    if tags.isdisjoint(ids):
        return [t for t in ids if t not in dropped]
    role = roles(torch.tensor(ids), spec, prompt_lengths=torch.zeros(1, dtype=torch.long))[0].tolist()
    return [t for t, r in zip(ids, role, strict=True) if r == Role.CONTENT and t not in dropped]


def mask_from_structure(
    st: Structure,
    dense: bool = False,
    rows_from: int = 0,
    causal_spans: bool | torch.Tensor = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T - rows_from, T]`` from a :class:`Structure`.

    ``causal_spans`` makes rules 2 and 5 causal: a span position sees only the
    part of its span (or round, dense) to its left, the mask of the planned
    layout trained autoregressively (``planned_ar``). A ``[B]`` bool tensor
    makes them causal in the rows where it is True only. "To its left" compares
    ``positions`` (``[B, T]`` logical positions, for columns laid out in another
    order, as a KV cache with holes is) when given, else the column indices.
    """
    span_i, span_j = st.span[:, rows_from:, None], st.span[:, None, :]
    sync_i, sync_j = st.syncs[:, rows_from:, None], st.syncs[:, None, :]
    inside_i, inside_j = span_i >= 0, span_j >= 0
    t = st.span.shape[1]
    row = torch.arange(rows_from, t, device=st.span.device)[:, None]
    col = torch.arange(t, device=st.span.device)[None, :]
    causal = col <= row
    allowed = causal & (~inside_j | (sync_i > sync_j))  # rules 1, 3, 4
    causal_rows = torch.as_tensor(causal_spans, dtype=torch.bool, device=causal.device).expand(st.span.shape[0])
    left = causal if positions is None else positions[:, None, :] <= positions[:, rows_from:, None]
    within = left | ~causal_rows[:, None, None]  # per row: causal, or the whole span
    allowed |= inside_i & (span_i == span_j) & within  # rule 2
    if dense:
        allowed |= inside_i & inside_j & (sync_i == sync_j) & within  # rule 5
    allowed &= st.valid[:, rows_from:, None] & st.valid[:, None, :]  # batch padding never attended
    allowed |= row == col  # every row attends to itself (padding rows: only itself)
    return allowed.unsqueeze(1)


def batch_attention_mask(
    ids: torch.Tensor,
    spec: TagSpec,
    lengths: torch.Tensor | None = None,
    dense: bool = False,
    causal_spans: bool | torch.Tensor = False,
) -> torch.Tensor:
    """Hybrid attention mask for a right-padded batch.

    Args:
        ids: Token ids ``[B, T]``.
        spec: Tag spec with token ids.
        lengths: Valid length of each row ``[B]``.
        dense: Dense variant (spans of a round attend to each other).
        causal_spans: Spans (dense: rounds) causal inside, not bidirectional;
            a ``[B]`` bool tensor: in those rows only.

    Returns:
        ``[B, 1, T, T]`` bool, ``True`` = row attends to column (the form HF
        backbones accept as a 4D attention mask).
    """
    return mask_from_structure(structure(ids, spec, lengths), dense=dense, causal_spans=causal_spans)


def extension_mask(
    ids: torch.Tensor, spec: TagSpec, prefix_length: int, lengths: torch.Tensor | None = None, dense: bool = False
) -> torch.Tensor:
    """Rows of the new positions when tokens are appended to a cached prefix.

    Args:
        ids: The whole sequence ``[B, T]``: cached prefix then the new tokens.
        spec: Tag spec with token ids.
        prefix_length: Number of cached positions ``P``.
        lengths: Valid length of each row ``[B]``.
        dense: Dense variant.

    Returns:
        ``[B, 1, T - P, T]`` bool: what each new position may attend to.
    """
    return mask_from_structure(structure(ids, spec, lengths), dense=dense, rows_from=prefix_length)


def hybrid_attention_mask(
    tokens: Sequence[str] | Sequence[int] | torch.Tensor, spec: TagSpec, dense: bool = False
) -> torch.Tensor:
    """The ``[T, T]`` mask of one sequence, for inspection.

    Args:
        tokens: Token strings (control strings as in ``spec``) or token ids
            (then ``spec`` must carry ids).
        spec: Tag spec.
        dense: Dense variant.

    Returns:
        ``[T, T]`` bool, ``True`` = row attends to column.
    """
    ids, spec = _ids_of(tokens, spec)
    return batch_attention_mask(ids.view(1, -1), spec, dense=dense)[0, 0]


def check_attention(attn_implementation: str | None, device: torch.device | str | None = None) -> None:
    """Refuse an attention implementation that cannot take the hybrid mask (on ``device``).

    ``flash_attention_2`` (and 3) take only causal or padding masks, never the
    hybrid mask that every pdlightning objective and decoder uses.
    ``flex_attention`` is refused on CPU: transformers runs it compiled, and
    torch 2.13's compiled CPU kernel has no backward and returned NaN or wrong
    outputs on an AVX2 machine (8 queries over 24 keys, every key visible),
    where eager flex and sdpa agree. It is for GPUs.

    Raises:
        ValueError: Naming the implementation and what to use instead.
    """
    if attn_implementation is not None and attn_implementation.startswith("flash_attention"):
        raise ValueError(
            f"attn_implementation {attn_implementation!r} cannot take the hybrid attention mask that every "
            "pdlightning objective and decoder uses; use 'flex_attention' (GPU) or 'sdpa'"
        )
    if attn_implementation == "flex_attention" and device is not None and torch.device(device).type == "cpu":
        raise ValueError(
            "attn_implementation 'flex_attention' is for GPUs: torch's compiled CPU flex kernel has no backward "
            "and returned wrong outputs (NaN) on some CPUs; use 'sdpa' on CPU"
        )


def for_attention(mask: torch.Tensor, attn_implementation: str | None) -> Any:
    """A 4D bool mask ``[B, 1, Q, K]`` in the form the backbone's attention takes.

    ``sdpa`` and ``eager`` take the bool tensor itself. transformers'
    ``flex_attention`` adds a tensor mask to the attention scores (a bool mask
    would add 1 where it should block), so for it the mask becomes a
    ``BlockMask``, which also lets flex skip the blocks no row may see.
    """
    check_attention(attn_implementation, mask.device)
    return block_mask(mask) if attn_implementation == "flex_attention" else mask


def block_mask(mask: torch.Tensor) -> Any:
    """A 4D bool mask ``[B, 1, Q, K]`` as a flex ``BlockMask`` (one per row, shared by the heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, q, k = mask.shape
    return create_block_mask(lambda bi, hi, qi, ki: mask[bi, 0, qi, ki], b, None, q, k, device=mask.device)
