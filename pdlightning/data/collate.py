"""From tokenised examples to training batches: stochastic padding inside
spans, the three objectives' layouts, labels, roles and attention masks.

Pure torch (no Lightning), so it is tested fast.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pdlightning.masks import Role, batch_attention_mask, roles
from pdlightning.tags import TagSpec

Mode = Literal["planned", "planned_ar", "autoregressive", "diffusion"]
MODES: tuple[str, ...] = ("planned", "planned_ar", "autoregressive", "diffusion")
PLANNED_LAYOUT: tuple[str, ...] = ("planned", "planned_ar")  # modes that read the planned layout
NOISED: tuple[str, ...] = ("planned", "diffusion")  # modes whose content is masked (diffusion targets)
IGNORE = -100


def add_stochastic_pads(ids: Sequence[int], spec: TagSpec, rng: random.Random, max_pads: int) -> list[int]:
    """Insert 0..max_pads pad tokens just before every span's close tag.

    Args:
        ids: Response ids in the planned layout (no pads yet).
        spec: Tag spec with ids.
        rng: Source of the pad counts (seed it per example and epoch).
        max_pads: Upper bound of pads per span.

    Returns:
        The ids with pads; every other token unchanged and in order.
    """
    close, pad = spec.id("span_close"), spec.id("pad")
    out: list[int] = []
    for tok in ids:
        if tok == close and max_pads > 0:
            out.extend([pad] * rng.randint(0, max_pads))
        out.append(tok)
    return out


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one example's padding in one epoch (same triple, same draws)."""
    return random.Random(f"{seed}:{epoch}:{index}")


@dataclass
class Batch:
    """A collated batch, every tensor right padded to ``T``.

    Attributes:
        input_ids: ``[B, T]`` long.
        roles: ``[B, T]`` long, :class:`~pdlightning.masks.Role` values.
        ar_labels: ``[B, T]`` long: at position ``i`` the next token of the
            autoregressive stream (plan stream for ``planned``), ``-100`` where none.
        attention_mask: ``[B, 1, T, T]`` bool, True = attend.
        lengths: ``[B]`` valid lengths.
        prompt_lengths: ``[B]``.
        mode: The objective this batch is laid out for.
        causal_rows: ``[B]`` bool: rows of the planned layout trained
            autoregressively (all of a ``planned_ar`` batch; some of a
            ``planned`` batch whose stage mixes them in): spans causal, every
            content token a next-token target, never noised.
    """

    input_ids: torch.Tensor
    roles: torch.Tensor
    ar_labels: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    mode: str
    causal_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.causal_rows is None:
            rows = self.input_ids.shape[0]
            self.causal_rows = torch.full((rows,), self.mode == "planned_ar", dtype=torch.bool)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def stream_labels(ids: torch.Tensor, role: torch.Tensor) -> torch.Tensor:
    """Next-token labels over the autoregressive stream, which skips spans.

    The stream is every prompt and plan position in order. The label at a stream
    position is the next stream token when that token is a plan token (so the
    last ``</topic>`` of a round is labelled with the round's terminator that
    stands after its spans). ``ids``, ``role``: ``[B, T]``; returns ``[B, T]``.
    """
    labels = torch.full_like(ids, IGNORE)
    on_stream = (role == Role.PROMPT) | (role == Role.PLAN)
    for b in range(ids.shape[0]):
        pos = on_stream[b].nonzero().squeeze(-1)
        if pos.numel() < 2:
            continue
        src, dst = pos[:-1], pos[1:]
        target_is_plan = role[b, dst] == Role.PLAN
        labels[b, src[target_is_plan]] = ids[b, dst[target_is_plan]]
    return labels


def content_labels(ids: torch.Tensor, role: torch.Tensor) -> torch.Tensor:
    """Next-token labels of span content, for the planned layout trained autoregressively.

    Every :attr:`Role.CONTENT` token at ``i`` (pads inside spans included) is the
    label at ``i - 1``, the span's previous position (content, or its last
    scaffold token), which the stream never labels. ``[B, T]`` in and out.
    """
    labels = torch.full_like(ids, IGNORE)
    target = role[:, 1:] == Role.CONTENT
    labels[:, :-1][target] = ids[:, 1:][target]
    return labels


def collate(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    spec: TagSpec,
    mode: Mode = "planned",
    dense: bool = False,
    pad_id: int | None = None,
    causal_rows: Sequence[bool] | None = None,
) -> Batch:
    """Collate tokenised examples into a :class:`Batch`.

    Args:
        prompts: Prompt ids of each example.
        responses: Response ids: planned layout (pads already inserted) for
            ``planned``; the plain answer and end token for the baselines
            (``diffusion`` fills every response with end tokens to the longest).
        spec: Tag spec with ids.
        mode: ``planned`` (hybrid mask, AR loss on plan stream, diffusion on
            span content), ``planned_ar`` (the planned layout trained
            autoregressively: the hybrid mask with causal spans, every plan and
            content token a next-token target), ``autoregressive`` (causal),
            ``diffusion`` (bidirectional, every response token a diffusion target).
        dense: Dense hybrid mask (the planned layouts only).
        pad_id: Id of batch padding (never attended); ``spec.id("pad")`` by default.
        causal_rows: For ``planned``: the rows to lay out as ``planned_ar``
            instead (a stage's ``ar_fraction``); none by default.

    Returns:
        The batch.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    pad_id = spec.id("pad") if pad_id is None else pad_id
    if causal_rows is not None and mode != "planned":
        raise ValueError(f"causal_rows mixes planned_ar rows into a planned batch; mode is {mode!r}")
    causal = torch.tensor(
        [mode == "planned_ar"] * len(prompts) if causal_rows is None else list(causal_rows), dtype=torch.bool
    )
    if mode == "diffusion":  # fill with end tokens, so masks past the answer learn to say "end"
        longest = max(len(r) for r in responses)
        responses = [list(r) + [spec.id("end")] * (longest - len(r)) for r in responses]
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    lengths = torch.tensor([len(r) for r in rows])
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    t = int(lengths.max())
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    pos = torch.arange(t)
    valid = pos < lengths[:, None]
    is_prompt = pos < prompt_lengths[:, None]
    if mode in PLANNED_LAYOUT:
        role = roles(ids, spec, prompt_lengths, lengths)
        mask = batch_attention_mask(ids, spec, lengths, dense=dense, causal_spans=causal)
    else:
        role = torch.full_like(ids, int(Role.PLAN if mode == "autoregressive" else Role.CONTENT))
        role[is_prompt] = int(Role.PROMPT)
        role[~valid] = int(Role.PAD)
        eye = torch.eye(t, dtype=torch.bool)
        if mode == "autoregressive":
            mask = torch.ones(t, t, dtype=torch.bool).tril() & valid[:, None, :] & valid[:, :, None]
        else:
            mask = valid[:, None, :] & valid[:, :, None]
        mask = (mask | eye).unsqueeze(1)
    labels = stream_labels(ids, role) if mode != "diffusion" else torch.full_like(ids, IGNORE)
    if causal.any():
        from_content = torch.where(causal[:, None], content_labels(ids, role), IGNORE)
        labels = torch.where(labels == IGNORE, from_content, labels)
    return Batch(
        input_ids=ids,
        roles=role,
        ar_labels=labels,
        attention_mask=mask,
        lengths=lengths,
        prompt_lengths=prompt_lengths,
        mode=mode,
        causal_rows=causal,
    )
