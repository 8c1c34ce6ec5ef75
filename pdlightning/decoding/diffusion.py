"""Vanilla masked diffusion decoding (the Dream / LLaDA baseline).

The prompt is followed by a budget of ``max_new_tokens`` mask tokens and the
whole sequence, prompt included, is denoised under full bidirectional
attention (padding columns excepted). Each of ``steps`` passes commits
``ceil(masks left / steps left)`` positions of every row, chosen by
``order``: lowest entropy first (Dream's default), highest confidence, at
random, or left to right. The response is read up to its first end token; pads are dropped
from the answer.

Rows are LEFT padded, so every row's generation region is the same columns
and the whole step is one tensor operation; explicit ``position_ids`` make a
padded row decode exactly as it would alone.

Under the ``shifted`` convention (AR-initialised models) masked position
``i`` is predicted by the logits at ``i - 1``, so the last prompt position
predicts the first mask.
"""

from __future__ import annotations

import math

import torch

from pdlightning.decoding.autoregressive import ban_tokens, left_pad
from pdlightning.decoding.base import DecodingStrategy, RowOutput, register
from pdlightning.decoding.lm import LanguageModel
from pdlightning.decoding.sampling import UnmaskOrder, check_order, sample_tokens, unmask_scores


def bidirectional_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """4D mask where every position sees every valid column (and itself).

    Args:
        key_valid: ``[B, T]`` attendable columns.

    Returns:
        ``[B, 1, T, T]`` bool; a padding query sees only itself (no NaNs).
    """
    t = key_valid.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=key_valid.device)
    return (key_valid[:, None, :] | eye[None])[:, None]


def read_response(region: list[int], end: int, pad: int) -> tuple[list[int], list[int]]:
    """Token ids and answer ids of one denoised region.

    Args:
        region: The ids after the prompt.
        end: End token id.
        pad: Pad token id.

    Returns:
        ``(token_ids, answer_ids)``: the region up to and including its first end
        token (trailing pads dropped when there is none), and the tokens before
        the first end token without pads.
    """
    if end in region:
        cut = region.index(end)
        return region[: cut + 1], [t for t in region[:cut] if t != pad]
    n = len(region)
    while n > 0 and region[n - 1] == pad:
        n -= 1
    return region[:n], [t for t in region[:n] if t != pad]


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each score within its row, 0 = highest (ties: earlier position first).

    Args:
        scores: ``[B, N]``.

    Returns:
        ``[B, N]`` long ranks.
    """
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


@register("diffusion")
class Diffusion(DecodingStrategy):
    """Masked diffusion over a fixed budget of ``max_new_tokens`` masks.

    Args:
        steps: Denoising passes (None = the budget, one position per pass);
            at most the budget.
        order: Which masked positions commit first: ``entropy`` (lowest
            entropy, Dream's default), ``confidence`` (highest probability of
            the drawn token), ``random`` or ``left_to_right``.
        max_new_tokens: The budget: masks appended after the prompt.
        temperature: 0 = greedy.
        top_p: Nucleus mass (1 = off).
        top_k: Top-k cut (0 = off).
        batch_size: Prompts decoded together.
    """

    def __init__(
        self,
        steps: int | None = None,
        order: UnmaskOrder = "entropy",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__(max_new_tokens, temperature, top_p, top_k, batch_size)
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_order(order)
        self.steps = steps
        self.order = order

    @property
    def n_steps(self) -> int:
        """Passes per response: ``steps`` capped by the budget (the budget when None)."""
        return min(self.steps or self.max_new_tokens, self.max_new_tokens)

    def check_prompts(self, lm: LanguageModel, prompts: list[list[int]]) -> None:
        """An empty prompt is fine with aligned logits (each position scores itself)."""
        if lm.shift:
            super().check_prompts(lm, prompts)

    def decode_batch(
        self, lm: LanguageModel, prompts: list[list[int]], generator: torch.Generator
    ) -> list[RowOutput]:
        """Decode one batch of tokenised prompts; one :class:`RowOutput` per prompt."""
        spec = lm.spec
        end, pad, mask = spec.id("end"), spec.id("pad"), spec.id("mask")
        n = self.max_new_tokens
        ids, valid, pos = left_pad(prompts, pad, lm.device)
        b, p = ids.shape
        x = torch.cat([ids, torch.full((b, n), mask, dtype=torch.long, device=lm.device)], 1)
        key_valid = torch.cat([valid, torch.ones(b, n, dtype=torch.bool, device=lm.device)], 1)
        positions = torch.cat([pos, valid.sum(1, keepdim=True) + torch.arange(n, device=lm.device)], 1)
        attn = bidirectional_mask(key_valid)
        steps = self.n_steps
        columns = torch.arange(n, device=lm.device).expand(b, n)  # for the left_to_right order
        for s in range(steps):
            region = x[:, p:]
            is_mask = region == mask
            left = int(is_mask[0].sum())  # every row commits the same number per step
            k = math.ceil(left / (steps - s))
            logits = lm.forward(x, attn, positions).logits[:, p - lm.shift : p + n - lm.shift]
            tokens, probs = sample_tokens(
                ban_tokens(logits, lm, [mask]), generator, self.temperature, self.top_p, self.top_k
            )
            scores = unmask_scores(probs, tokens, self.order, generator, columns)
            scores = scores.masked_fill(~is_mask, float("-inf"))
            commit = (rank_desc(scores) < k) & is_mask
            x[:, p:] = torch.where(commit, tokens, region)
        rows = []
        for i in range(b):
            token_ids, answer = read_response(x[i, p:].tolist(), end, pad)
            rows.append(RowOutput(token_ids=token_ids, answer_ids=answer, critical_path=steps))
        return rows
