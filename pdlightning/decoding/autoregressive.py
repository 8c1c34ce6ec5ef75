"""Autoregressive decoding: the baseline every other strategy is measured against.

One token per forward pass and per row, KV cached, greedy or sampled through
the base-class knobs (temperature, top-p, top-k), each row stopping at its own
end token. Rows of a batch are LEFT padded: padding columns are never attended
and every row gets explicit ``position_ids`` counted from its first real
token, so a row decodes exactly as it would alone.

Models trained here predict AR tokens next-token under both logits
conventions (the convention only decides which position scores a *masked*
token). For outside diffusion models without a next-token head (LLaDA-style),
``mask_query=True`` appends a mask token and reads its logits instead; with the
cache, the mask's column is cropped again after every pass, so caching stays exact.

The small batching helpers here (:func:`left_pad`, :func:`ban_tokens`) are
shared by the diffusion baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pdlightning.decoding.base import DecodingStrategy, RowOutput, register
from pdlightning.decoding.lm import LanguageModel
from pdlightning.decoding.sampling import sample_tokens


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts into one batch.

    Args:
        prompts: Token ids of each prompt.
        pad_id: Id written into padding columns (never attended).
        device: Where the tensors live.

    Returns:
        ``(ids, valid, positions)``, each ``[B, L]``: the ids, ``True`` on real
        tokens, and position ids counted from each row's first real token
        (0 on padding).
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            valid[i, width - len(p) :] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return ids.to(device), valid.to(device), positions.to(device)


def ban_tokens(logits: torch.Tensor, lm: LanguageModel, banned: Sequence[int]) -> torch.Tensor:
    """Logits with ``banned`` ids and padded embedding rows (past the tokenizer) set to -inf.

    Args:
        logits: ``[..., V]``.
        lm: Supplies the tokenizer size.
        banned: Token ids never to produce.

    Returns:
        A modified copy of ``logits``.
    """
    logits = logits.clone()
    if logits.shape[-1] > len(lm.tokenizer):
        logits[..., len(lm.tokenizer) :] = float("-inf")
    if banned:
        logits[..., list(banned)] = float("-inf")
    return logits


def causal_mask(key_valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """4D causal mask of the last ``n_queries`` columns over every column.

    Args:
        key_valid: ``[B, C]`` attendable columns (physical order = logical order).
        n_queries: The queries are the last ``n_queries`` columns.

    Returns:
        ``[B, 1, n_queries, C]`` bool; a query always sees itself, so a padding
        query has one attended column and never produces NaNs.
    """
    c = key_valid.shape[1]
    q = torch.arange(c - n_queries, c, device=key_valid.device)[:, None]
    cols = torch.arange(c, device=key_valid.device)[None, :]
    mask = (cols <= q)[None] & key_valid[:, None, :]
    mask |= (cols == q)[None]
    return mask[:, None]


@register("autoregressive")
class Autoregressive(DecodingStrategy):
    """Next-token decoding with a KV cache, each row stopping at its end token.

    Args:
        use_cache: Reuse keys and values of earlier positions (False recomputes
            the whole sequence every pass: same output, slower).
        mask_query: Score the next token by the logits of an appended mask
            token instead of those of the last token (outside diffusion models
            such as LLaDA; models trained here predict AR tokens next-token).
        max_new_tokens: Cap on generated tokens per response (end included).
        temperature: 0 = greedy.
        top_p: Nucleus mass (1 = off).
        top_k: Top-k cut (0 = off).
        batch_size: Prompts decoded together.
    """

    def __init__(
        self,
        use_cache: bool = True,
        mask_query: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__(max_new_tokens, temperature, top_p, top_k, batch_size)
        self.use_cache = use_cache
        self.mask_query = mask_query

    def decode_batch(
        self, lm: LanguageModel, prompts: list[list[int]], generator: torch.Generator
    ) -> list[RowOutput]:
        """Decode one batch of tokenised prompts; one :class:`RowOutput` per prompt."""
        spec = lm.spec
        end, pad, mask = spec.id("end"), spec.id("pad"), spec.id("mask")
        aligned = self.mask_query
        ids, valid, pos = left_pad(prompts, pad, lm.device)
        b = ids.shape[0]
        next_pos = valid.sum(1)  # position of the token to generate, per row
        out = torch.full((b, self.max_new_tokens), pad, dtype=torch.long, device=lm.device)
        n_gen = torch.zeros(b, dtype=torch.long, device=lm.device)
        done = torch.zeros(b, dtype=torch.bool, device=lm.device)
        cache: Any = lm.new_cache() if self.use_cache else None
        n_cached = 0  # history columns held by the cache
        for step in range(self.max_new_tokens):
            feed = slice(n_cached if cache is not None else 0, ids.shape[1])
            f_ids, f_valid, f_pos = ids[:, feed], valid[:, feed], pos[:, feed]
            if aligned:  # the token to generate is scored at its own (masked) position
                f_ids = torch.cat([f_ids, torch.full_like(f_ids[:, :1], mask)], 1)
                f_valid = torch.cat([f_valid, torch.ones_like(f_valid[:, :1])], 1)
                f_pos = torch.cat([f_pos, next_pos[:, None]], 1)
            key_valid = torch.cat([valid[:, : feed.start], f_valid], 1)
            res = lm.forward(
                f_ids,
                causal_mask(key_valid, f_ids.shape[1]),
                f_pos,
                past_key_values=cache,
                use_cache=cache is not None,
            )
            if cache is not None:
                cache = res.past_key_values
                n_cached = ids.shape[1]
                if aligned:
                    cache.crop(-1)
            logits = ban_tokens(res.logits[:, -1], lm, [mask])
            tok, _ = sample_tokens(logits, generator, self.temperature, self.top_p, self.top_k)
            active = ~done
            tok = torch.where(active, tok, pad)
            out[:, step] = tok
            n_gen += active.long()
            ids = torch.cat([ids, tok[:, None]], 1)
            valid = torch.cat([valid, active[:, None]], 1)
            pos = torch.cat([pos, next_pos[:, None]], 1)
            next_pos = next_pos + active.long()
            done = done | (tok == end)
            if bool(done.all()):
                break
        rows = []
        for i in range(b):
            token_ids = out[i, : int(n_gen[i])].tolist()
            answer = token_ids[:-1] if token_ids and token_ids[-1] == end else token_ids
            rows.append(RowOutput(token_ids=token_ids, answer_ids=answer, critical_path=len(token_ids)))
        return rows
