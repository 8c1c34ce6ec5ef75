"""Fast-dLLM decoding (Wu et al., 2025): block-wise masked diffusion with
confidence-threshold parallel commits and an approximate KV cache.

The budget of ``max_new_tokens`` masks is split into blocks of ``block_size``
decoded left to right. Within the current block, each pass commits every
masked position whose drawn token has probability ``>= threshold`` (the most
confident one always commits). With ``factor`` set, the paper's factor rule
replaces the threshold: a pass commits the ``n`` most confident positions for
the largest ``n`` at which the ``i``-th most confident has probability
``>= 1 - factor / (i + 1)`` for every ``i <= n``. Each block also has a step cap (``steps``
spread over the blocks in proportion to their length): at least
``ceil(masks left / cap steps left)`` positions commit per pass, so a block
never takes more than its cap. A row stops as soon as it has committed an end
token with every position before it filled.

``cache`` (approximate, as in Fast-dLLM; the first pass of every block
recomputes the whole sequence and refreshes it):

* ``"none"``: every pass recomputes the whole sequence.
* ``"prefix"``: everything before the current block is cached; a pass feeds
  the block and the suffix of masks after it.
* ``"dual"``: the suffix after the block is cached too; a pass feeds only
  the block.

Under the ``shifted`` convention the position just before the block is fed
with it (its logits predict the block's first position), so it is left out
of the cached prefix.

Rows are LEFT padded and advance through the blocks in lockstep: a row that
finished its block waits (no commits, not counted on its critical path), so
every row sees the same states, and refreshes, as it would alone.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from pdlightning.decoding.autoregressive import ban_tokens, left_pad
from pdlightning.decoding.base import DecodingStrategy, RowOutput, register
from pdlightning.decoding.diffusion import bidirectional_mask, rank_desc, read_response
from pdlightning.decoding.lm import LanguageModel
from pdlightning.decoding.sampling import sample_tokens, top_probability

CacheMode = Literal["none", "prefix", "dual"]


def keep_cache_columns(cache: Any, columns: torch.Tensor) -> Any:
    """Keep only ``columns`` (in that order) of every layer of a dynamic KV cache, in place.

    Args:
        cache: A transformers ``DynamicCache`` (layers with ``keys`` and ``values``
            of shape ``[B, H, S, D]``).
        columns: ``[K]`` long indices into the cached sequence.

    Returns:
        The same cache object.
    """
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise ValueError("the dual cache needs full-attention cache layers (no sliding window)")
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = layer.keys.index_select(-2, columns.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, columns.to(layer.values.device))
    return cache


def block_caps(n: int, block_size: int, steps: int) -> list[tuple[int, int, int]]:
    """Blocks of the generation region and the step cap of each.

    Args:
        n: Positions generated.
        block_size: Positions per block (the last one may be shorter).
        steps: Total steps, spread in proportion to the block lengths.

    Returns:
        ``(start, end, cap)`` per block, offsets within the region; caps are at
        least 1 and sum to ``steps`` when every block gets one.
    """
    out = []
    for a in range(0, n, block_size):
        b = min(a + block_size, n)
        cap = math.ceil(steps * b / n) - math.ceil(steps * a / n)
        out.append((a, b, max(1, cap)))
    return out


@register("fast_dllm")
class FastDLLM(DecodingStrategy):
    """Block-wise diffusion with confidence-threshold commits and an approximate KV cache.

    Args:
        block_size: Positions per block, decoded left to right.
        threshold: Commit every masked position of the block whose drawn token has
            probability ``>=`` this (the most confident always commits).
        factor: None = the threshold rule; a float ``f > 0`` = the factor rule
            instead: commit the ``n`` most confident positions for the largest
            ``n`` at which the ``i``-th has probability ``>= 1 - f / (i + 1)`` for
            every ``i <= n`` (Fast-dLLM's factor-based parallel decoding).
        steps: Step budget over all blocks (None = half the new tokens), spread
            over the blocks as a cap per block; at the cap the rest commits.
        cache: ``"dual"`` (default, Fast-dLLM's fastest), ``"prefix"`` or ``"none"``
            (exact; see the module docstring). The dual cache's confidences are
            approximate, so it may commit at other steps and make a different
            number of passes.
        max_new_tokens: The budget: masks appended after the prompt.
        temperature: 0 = greedy.
        top_p: Nucleus mass (1 = off).
        top_k: Top-k cut (0 = off).
        batch_size: Prompts decoded together.
    """

    def __init__(
        self,
        block_size: int = 32,
        threshold: float = 0.9,
        factor: float | None = None,
        steps: int | None = None,
        cache: CacheMode = "dual",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__(max_new_tokens, temperature, top_p, top_k, batch_size)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if factor is not None and factor <= 0:
            raise ValueError(f"factor must be > 0 (or null for the threshold rule), got {factor}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if cache not in ("none", "prefix", "dual"):
            raise ValueError(f"unknown cache {cache!r}; choose none, prefix or dual")
        self.block_size = block_size
        self.threshold = threshold
        self.factor = factor
        self.steps = steps
        self.cache = cache

    @property
    def n_steps(self) -> int:
        """The step budget: ``steps``, or half the new tokens; within ``[1, max_new_tokens]``."""
        steps = self.steps if self.steps is not None else self.max_new_tokens // 2
        return min(max(1, steps), self.max_new_tokens)

    def decode_batch(
        self, lm: LanguageModel, prompts: list[list[int]], generator: torch.Generator
    ) -> list[RowOutput]:
        """Decode one batch of tokenised prompts; one :class:`RowOutput` per prompt."""
        spec, dev, shift = lm.spec, lm.device, lm.shift
        end, pad, mask = spec.id("end"), spec.id("pad"), spec.id("mask")
        n = self.max_new_tokens
        ids, valid, pos = left_pad(prompts, pad, dev)
        b, p = ids.shape
        t = p + n
        x = torch.cat([ids, torch.full((b, n), mask, dtype=torch.long, device=dev)], 1)
        key_valid = torch.cat([valid, torch.ones(b, n, dtype=torch.bool, device=dev)], 1)
        positions = torch.cat([pos, valid.sum(1, keepdim=True) + torch.arange(n, device=dev)], 1)
        full_mask = bidirectional_mask(key_valid)
        cols = torch.arange(t, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        passes = torch.zeros(b, dtype=torch.long, device=dev)
        for a, e, cap in block_caps(n, self.block_size, self.n_steps):
            a, e = p + a, p + e  # block columns
            lo = a - shift  # first column whose logits predict the block
            if self.cache == "prefix":
                fed, kept = cols[lo:], cols[:lo]
            else:
                fed, kept = cols[lo:e], torch.cat([cols[:lo], cols[e:]])
            taken = torch.zeros(b, dtype=torch.long, device=dev)
            cache: Any = None
            while True:
                is_mask = x[:, a:e] == mask
                active = ~done & is_mask.any(1)
                if not bool(active.any()):
                    break
                if cache is None:  # first pass of the block (every pass without a cache)
                    use = self.cache != "none"
                    res = lm.forward(
                        x, full_mask, positions, lm.new_cache() if use else None, use_cache=use
                    )
                    logits = res.logits[:, lo : e - shift]
                    if use:
                        cache = keep_cache_columns(res.past_key_values, kept)
                else:
                    kv = torch.cat([key_valid[:, kept], key_valid[:, fed]], 1)
                    attn = kv[:, None, None, :].expand(b, 1, len(fed), kv.shape[1])
                    res = lm.forward(x[:, fed], attn, positions[:, fed], cache, use_cache=True)
                    cache = res.past_key_values
                    cache.crop(-len(fed))
                    logits = res.logits[:, : e - a]
                self._commit(x, a, e, is_mask, active, logits, lm, cap - taken, generator)
                passes += active.long()
                taken += active.long()
                done |= _finished(x[:, p:], end, mask)
        rows = []
        for i in range(b):
            token_ids, answer = read_response(x[i, p:].tolist(), end, pad)
            rows.append(RowOutput(token_ids=token_ids, answer_ids=answer, critical_path=int(passes[i])))
        return rows

    def _commit(
        self,
        x: torch.Tensor,
        a: int,
        e: int,
        is_mask: torch.Tensor,
        active: torch.Tensor,
        logits: torch.Tensor,
        lm: LanguageModel,
        steps_left: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Commit this pass's positions of the block ``x[:, a:e]`` of every active row, in place.

        Args:
            x: ``[B, T]`` sequence.
            a: First block column.
            e: End of the block (exclusive).
            is_mask: ``[B, e - a]`` masked positions of the block.
            active: ``[B]`` rows that commit.
            logits: ``[B, e - a, V]`` logits predicting the block positions.
            lm: The model (tag ids, vocabulary size).
            steps_left: ``[B]`` steps left under the block's cap.
            generator: Source of randomness.
        """
        tokens, probs = sample_tokens(
            ban_tokens(logits, lm, [lm.spec.id("mask")]),
            generator,
            self.temperature,
            self.top_p,
            self.top_k,
        )
        conf = top_probability(probs, tokens).masked_fill(~is_mask, float("-inf"))
        left = is_mask.sum(1)
        quota = torch.div(left + steps_left.clamp(min=1) - 1, steps_left.clamp(min=1), rounding_mode="floor")
        sure = confident_count(conf, self.threshold, self.factor)
        count = torch.maximum(torch.maximum(sure, quota), torch.ones_like(quota))
        commit = (rank_desc(conf) < count[:, None]) & is_mask & active[:, None]
        x[:, a:e] = torch.where(commit, tokens, x[:, a:e])


def confident_count(conf: torch.Tensor, threshold: float, factor: float | None = None) -> torch.Tensor:
    """How many positions per row are sure enough to commit together.

    Args:
        conf: ``[B, N]`` probability of each position's drawn token (``-inf`` where
            nothing is to be drawn).
        threshold: The threshold rule: positions with ``conf >= threshold``.
        factor: If set, the factor rule instead: the largest ``n`` such that the
            ``i``-th highest ``conf`` is ``>= 1 - factor / (i + 1)`` for every ``i <= n``.

    Returns:
        ``[B]`` long counts (possibly 0: the caller always commits the top one).
    """
    if factor is None:
        return (conf >= threshold).sum(1)
    ranked = conf.sort(1, descending=True).values
    i = torch.arange(1, conf.shape[1] + 1, device=conf.device, dtype=ranked.dtype)
    # ranked falls and the bar rises with i, so the ranks that clear it are a prefix
    return (ranked >= 1 - factor / (i + 1)).sum(1)


def _finished(region: torch.Tensor, end: int, mask: int) -> torch.Tensor:
    """Rows whose region holds an end token with no mask before it.

    Args:
        region: ``[B, N]`` ids after the prompt.
        end: End token id.
        mask: Mask token id.

    Returns:
        ``[B]`` bool.
    """
    is_end = region == end
    first = torch.where(is_end.any(1), is_end.long().argmax(1), region.shape[1])
    before = torch.arange(region.shape[1], device=region.device)[None] < first[:, None]
    return is_end.any(1) & ~((region == mask) & before).any(1)
