"""Paired comparisons against the baseline and their bootstrap intervals (no Lightning, fast)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.eval.metrics import FactAccuracyDelta, SpeedUp, paired_bootstrap


def _brute_force(stat, tensors: list[torch.Tensor], resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap by hand: draw prompts with replacement, score both rows on the same draw."""
    g = torch.Generator().manual_seed(seed)
    n = len(tensors[0])
    values = []
    for _ in range(resamples):
        i = torch.randint(n, (n,), generator=g)
        values.append(stat(*(t[i] for t in tensors)))
    low, high = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prompt keys, and keys found by a baseline and by a decoder that mostly agrees with it."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(4, 10, (n,), generator=g).double()
    base = torch.binomial(keys, torch.full((n,), 0.4, dtype=torch.float64), generator=g)
    extra = (torch.rand(n, generator=g) < 0.3).double()  # one more key on three prompts in ten
    return keys, base, (base + extra).minimum(keys)


def test_fact_delta_interval_is_the_paired_percentile_bootstrap():
    """Against a brute-force bootstrap; an unpaired one (each row its own draw) is far wider here,
    because the two rows agree on most prompts: the interval must come from paired draws."""
    keys, base, mine = _rows(80, 0)
    ours = paired_bootstrap(FactAccuracyDelta(), mine, base, keys, resamples=4000, seed=1)
    paired = _brute_force(lambda m, b, k: float((m - b).sum() / k.sum()), [mine, base, keys], 4000, 2)
    point = float((mine - base).sum() / keys.sum())
    assert ours[0] < point < ours[1]
    assert ours == pytest.approx(paired, abs=0.006)
    g = torch.Generator().manual_seed(3)
    unpaired = []
    for _ in range(2000):
        i, j = torch.randint(80, (80,), generator=g), torch.randint(80, (80,), generator=g)
        unpaired.append(float(mine[i].sum() / keys[i].sum() - base[j].sum() / keys[j].sum()))
    spread = torch.quantile(torch.tensor(unpaired), torch.tensor([0.025, 0.975]))
    assert float(spread[1] - spread[0]) > 2 * (ours[1] - ours[0])


def test_speedup_interval_is_the_ratio_of_summed_seconds_resampled():
    g = torch.Generator().manual_seed(0)
    base = 0.1 + torch.rand(50, generator=g, dtype=torch.float64)
    mine = base / (1.5 + 0.3 * torch.randn(50, generator=g, dtype=torch.float64)).clamp(min=0.5)
    ours = paired_bootstrap(SpeedUp(), mine, base, resamples=4000, seed=1)
    brute = _brute_force(lambda m, b: float(b.sum() / m.sum()), [mine, base], 4000, 2)
    assert ours == pytest.approx(brute, abs=0.01)
    assert ours[0] < float(base.sum() / mine.sum()) < ours[1]


def test_identical_rows_give_the_point_itself():
    keys, base, _ = _rows(30, 4)
    assert paired_bootstrap(FactAccuracyDelta(), base, base, keys) == (0.0, 0.0)
    assert paired_bootstrap(SpeedUp(), keys, keys) == (1.0, 1.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 9), st.integers(0, 9)), min_size=2, max_size=40),
       st.integers(0, 2**31 - 1))
def test_fact_delta_interval_is_ordered_bounded_seeded_and_leaves_the_global_rng(rows, seed):
    keys = torch.tensor([k for k, _, _ in rows], dtype=torch.float64)
    mine = torch.tensor([min(a, k) for k, a, _ in rows], dtype=torch.float64)
    base = torch.tensor([min(b, k) for k, _, b in rows], dtype=torch.float64)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    low, high = paired_bootstrap(FactAccuracyDelta(), mine, base, keys, resamples=50, seed=seed)
    assert torch.equal(torch.rand(1), expected_next)
    assert -1.0 <= low <= high <= 1.0
    lo_row, hi_row = float(((mine - base) / keys).min()), float(((mine - base) / keys).max())
    assert lo_row - 1e-9 <= low and high <= hi_row + 1e-9  # a ratio of sums lies between the per-prompt ratios
    assert paired_bootstrap(FactAccuracyDelta(), mine, base, keys, resamples=50, seed=seed) == (low, high)


def test_bad_settings_are_refused():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="level must lie in"):
        paired_bootstrap(SpeedUp(), x, x, level=1.0)
    with pytest.raises(ValueError, match="resamples must be >= 2"):
        paired_bootstrap(SpeedUp(), x, x, resamples=1)

