"""Dense planned diffusion: the spans of one round attend to each other.

Everything else is :class:`~pdlightning.decoding.planned.PlannedDiffusion`: the
plan is decoded autoregressively, the spans are denoised in parallel, and spans
of *earlier* rounds are seen from the ``<sync/>`` that closes them on. The
only change is the hybrid mask (rule 5 of :mod:`pdlightning.masks`): while a
round is denoised, every position of one of its spans also sees every other
span of the same round, so spans can coordinate at the cost of sparsity. Use
it with models trained with the dense mask.
"""

from __future__ import annotations

from typing import ClassVar

from pdlightning.decoding.base import register
from pdlightning.decoding.planned import PlannedDiffusion


@register("dense_planned")
class DensePlannedDiffusion(PlannedDiffusion):
    """Planned diffusion with dense attention among the spans of a round.

    Takes the same arguments as :class:`~pdlightning.decoding.planned.PlannedDiffusion`.
    """

    dense: ClassVar[bool] = True
