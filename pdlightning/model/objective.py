"""The planned-diffusion training objective (paper eq. 6) and its baselines.

For one example with plan tokens Z and content tokens X (everything inside
spans, pads included; span tags and topic heads are scaffold, never targets),
draw ``t ~ U(t_min, 1)``, mask each content token with probability ``t`` and
minimise the mean over target tokens of::

    1(y in Z) * CE_AR(y | causal prefix)  +  1(y in X and masked) * CE(y | hybrid input) / t

Which logits score which token:

* plan tokens (and every token of the ``autoregressive`` baseline) are scored
  by the logits at the previous position of their stream
  (:func:`~pdlightning.data.collate.stream_labels` puts the label there);
* a masked content token at position ``i`` is scored by the logits at ``i - 1``
  under the ``shifted`` convention (AR-initialised backbones: Dream, Qwen) and
  at ``i`` under ``aligned``. It contributes exactly when its *own* input is
  masked (not when the predicting position is masked, as the authors' code does).

Pure torch: no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pdlightning.data.collate import IGNORE, Batch
from pdlightning.masks import Role
from pdlightning.model.backbone import LogitsConvention


@dataclass
class Noised:
    """Diffusion noise of a batch: the masked input, which positions, and ``t``."""

    input_ids: torch.Tensor  # [B, T]
    masked: torch.Tensor  # [B, T] bool: content positions whose input is the mask token
    t: torch.Tensor  # [B]


@dataclass
class LossTerms:
    """Sums and counts of one batch, so metrics can aggregate exactly."""

    loss: torch.Tensor
    total_sum: torch.Tensor  # numerator of ``loss``, with gradient
    n_targets: torch.Tensor  # denominator of ``loss``
    ar_sum: torch.Tensor
    ar_count: torch.Tensor
    diffusion_sum: torch.Tensor  # weighted by 1/t
    masked_count: torch.Tensor
    ar_correct: torch.Tensor
    masked_correct: torch.Tensor


TSampling = Literal["uniform", "stratified"]


def draw_t(
    b: int,
    t_min: float = 1e-3,
    sampling: TSampling = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One masking rate per example, each marginally ``U(t_min, 1)``.

    ``uniform`` draws them independently; ``stratified`` (the low-discrepancy
    sampler of MDLM, Sahoo et al., 2024) puts one in each of ``b`` equal strata
    of ``[t_min, 1)`` from a single shared offset, so a batch always spans
    low and high noise: the same expected loss, with less variance.

    Returns:
        ``[b]`` float.
    """
    if sampling == "uniform":
        u = torch.rand(b, generator=generator, device=device)
    elif sampling == "stratified":
        offset = torch.rand(1, generator=generator, device=device)
        u = (offset + torch.arange(b, device=device) / b) % 1.0
    else:
        raise ValueError(f"unknown t sampling {sampling!r}; choose uniform or stratified")
    return t_min + (1 - t_min) * u


def add_noise(
    batch: Batch,
    mask_id: int,
    t_min: float = 1e-3,
    generator: torch.Generator | None = None,
    t_sampling: TSampling = "uniform",
) -> Noised:
    """Mask every content token independently with probability ``t`` (one ``t`` per example).

    Args:
        batch: The collated batch.
        mask_id: Token id of the mask.
        t_min: ``t`` is drawn from ``U(t_min, 1)`` (clipped away from 0).
        generator: Source of randomness.
        t_sampling: How the batch's rates are drawn (:func:`draw_t`).
    """
    ids = batch.input_ids
    b = ids.shape[0]
    t = draw_t(b, t_min, t_sampling, generator, ids.device)
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    t = torch.where(batch.causal_rows, torch.ones_like(t), t)  # rows trained autoregressively: no noise
    masked = (batch.roles == Role.CONTENT) & (draw < t[:, None]) & ~batch.causal_rows[:, None]
    return Noised(input_ids=torch.where(masked, torch.full_like(ids, mask_id), ids), masked=masked, t=t)


def scoring_positions(masked: torch.Tensor, convention: LogitsConvention) -> torch.Tensor:
    """Where the logits that score the masked tokens are: ``[B, T]`` bool.

    ``shifted``: a masked token at ``i`` is scored by the logits at ``i - 1``;
    ``aligned``: at ``i``. Either way the scoring positions are in the same
    (row-major) order as the masked ones.
    """
    if convention == "aligned":
        return masked
    if convention != "shifted":
        raise ValueError(f"unknown logits convention {convention!r}")
    if masked[:, 0].any():
        raise ValueError("a masked token at position 0 has no previous position to be scored from")
    return torch.cat([masked[:, 1:], torch.zeros_like(masked[:, :1])], dim=1)


def objective_loss(
    logits: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    batch: Batch,
    noised: Noised | None,
    convention: LogitsConvention = "shifted",
    ar_loss_over_t: bool = False,
) -> LossTerms:
    """Loss of a batch under its mode's objective.

    Args:
        logits: ``[B, T, V]`` of the (noised) input, or a function from a
            ``[B, T]`` bool mask to the logits ``[N, V]`` at those positions
            (row-major), so that the output head runs only where a token is scored.
        batch: The batch (``ar_labels`` hold the AR targets at their scoring positions).
        noised: Diffusion noise (None for the ``autoregressive`` baseline).
        convention: Which position scores a masked token.
        ar_loss_over_t: Also divide the AR term by ``t`` (the authors' code);
            the paper weights only the diffusion term.

    Returns:
        :class:`LossTerms`; ``loss`` = (AR CE sum + sum of masked CE / t) /
        (AR targets + content tokens), the mean over target tokens.
    """
    ar_mask = batch.ar_labels != IGNORE
    masked = noised.masked if noised is not None else torch.zeros_like(ar_mask)
    scoring = scoring_positions(masked, convention)
    needed = ar_mask | scoring
    at = logits[needed] if isinstance(logits, torch.Tensor) else logits(needed)
    slot = torch.full(needed.shape, -1, dtype=torch.long, device=needed.device)
    slot[needed] = torch.arange(at.shape[0], device=needed.device)
    zero = at.new_zeros(()).float()
    if ar_mask.any():
        ar_logits = at[slot[ar_mask]].float()
        ar_targets = batch.ar_labels[ar_mask]
        ar_ce = F.cross_entropy(ar_logits, ar_targets, reduction="none")
        if ar_loss_over_t and noised is not None:
            ar_ce = ar_ce / noised.t[:, None].expand_as(batch.ar_labels)[ar_mask]
        ar_sum = ar_ce.sum()
        ar_correct = (ar_logits.argmax(-1) == ar_targets).sum()
    else:
        ar_sum, ar_correct = zero, zero.long()
    content = (batch.roles == Role.CONTENT) & ~batch.causal_rows[:, None]  # diffusion targets (causal rows': AR)
    if noised is not None and masked.any():
        m_logits = at[slot[scoring]].float()
        m_targets = batch.input_ids[masked]
        ce = F.cross_entropy(m_logits, m_targets, reduction="none")
        weight = (1.0 / noised.t)[:, None].expand_as(masked)[masked]
        diffusion_sum = (ce * weight).sum()
        masked_correct = (m_logits.argmax(-1) == m_targets).sum()
        masked_count = masked.sum()
    else:
        diffusion_sum, masked_correct, masked_count = zero, zero.long(), zero.long()
    n_targets = ar_mask.sum() + (content.sum() if noised is not None else 0)
    total = ar_sum + diffusion_sum
    return LossTerms(
        loss=total / n_targets.clamp_min(1),
        total_sum=total,
        n_targets=n_targets,
        ar_sum=ar_sum.detach(),
        ar_count=ar_mask.sum(),
        diffusion_sum=diffusion_sum.detach(),
        masked_count=masked_count,
        ar_correct=ar_correct,
        masked_correct=masked_correct,
    )
