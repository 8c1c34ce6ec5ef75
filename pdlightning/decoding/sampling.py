"""Sampling math shared by every decoder: filtering, drawing tokens with an
explicit generator, and the scores that order unmasking. Pure torch.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

UnmaskOrder = Literal["entropy", "confidence", "random", "left_to_right"]
#: The orders :func:`unmask_scores` knows.
UNMASK_ORDERS: tuple[str, ...] = get_args(UnmaskOrder)


def filter_logits(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. ``logits``: ``[..., V]``."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cumulative = probs.cumsum(-1)
        drop = cumulative - probs > top_p  # keep the smallest prefix reaching top_p (the top-1 always)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position.

    Args:
        logits: ``[..., V]``.
        generator: Source of randomness (unused when ``temperature == 0``).
        temperature: 0 = argmax.
        top_p: Nucleus mass.
        top_k: Top-k cut (0 = off).

    Returns:
        ``(tokens, probs)``: the tokens ``[...]`` and the full distribution
        ``[..., V]`` they were drawn from (softmax of the filtered, tempered logits;
        at temperature 0 the untempered softmax).
    """
    logits = logits.float()
    if temperature == 0:
        probs = logits.softmax(-1)
        return probs.argmax(-1), probs
    probs = filter_logits(logits / temperature, top_p, top_k).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat.cpu(), 1, generator=generator).view(probs.shape[:-1]).to(probs.device)
    return tokens, probs


def unmask_scores(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    order: UnmaskOrder,
    generator: torch.Generator,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Priority of committing each position (higher = sooner).

    ``entropy`` (Dream's default): negative entropy of the distribution;
    ``confidence``: probability of the drawn token; ``random``: uniform noise;
    ``left_to_right``: the leftmost first (needs ``positions``).
    ``probs``: ``[..., V]``; ``tokens`` and ``positions``: ``[...]``. Returns ``[...]``.
    """
    check_order(order)
    if order == "entropy":
        return (probs * probs.clamp_min(1e-12).log()).sum(-1)
    if order == "confidence":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if order == "random":
        return torch.rand(tokens.shape, generator=generator).to(probs.device)
    if positions is None:
        raise ValueError("the left_to_right order needs the positions of the masked tokens")
    return -positions.to(probs.device, torch.float32)


def check_order(order: str) -> None:
    """Raise a ValueError naming the choices unless ``order`` is one of :data:`UNMASK_ORDERS`."""
    if order not in UNMASK_ORDERS:
        raise ValueError(f"unknown unmasking order {order!r}; choose one of {', '.join(UNMASK_ORDERS)}")


def top_probability(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Probability of the chosen token at each position (for thresholds)."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
