"""The training objective against hand-computed values (design section 5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.data.collate import IGNORE, collate
from pdlightning.masks import Role
from pdlightning.model.objective import Noised, add_noise, draw_t, objective_loss, scoring_positions
from pdlightning.tags import CONTROL_NAMES, TagSpec

SPEC = TagSpec().with_ids({n: i for i, n in enumerate(CONTROL_NAMES)})
PO, PC, SO, SC, SY, END, PAD, MASK = range(8)
V = 20


def planned_example() -> tuple[list[int], list[int]]:
    prompt = [10, 11]
    #           plan entry         span: open head  close content pad close   end
    response = [PO, 12, 13, PC, SO, 12, PC, 14, 15, PAD, SC, END]
    return prompt, response


def logits_favouring(targets: torch.Tensor, strength: float = 0.0) -> torch.Tensor:
    """Uniform logits, plus ``strength`` on ``targets`` ([B, T]) where target >= 0."""
    b, t = targets.shape
    logits = torch.zeros(b, t, V)
    rows, cols = torch.nonzero(targets >= 0, as_tuple=True)
    logits[rows, cols, targets[rows, cols]] = strength
    return logits


def test_roles_and_stream_labels_follow_the_layout():
    prompt, response = planned_example()
    batch = collate([prompt], [response], SPEC, "planned")
    roles = batch.roles[0].tolist()
    assert roles == [0, 0, 1, 1, 1, 1, 3, 3, 3, 2, 2, 2, 3, 1]
    labels = batch.ar_labels[0].tolist()
    # prompt's last token predicts <topic>; the plan's last </topic> predicts END after the span
    assert labels == [IGNORE, PO, 12, 13, PC, END, *[IGNORE] * 7, IGNORE]


def test_a_content_token_counts_exactly_when_its_own_input_is_masked():
    prompt, response = planned_example()
    batch = collate([prompt], [response], SPEC, "planned")
    content = (batch.roles == Role.CONTENT).nonzero()[:, 1].tolist()
    assert content == [9, 10, 11]  # 14, 15 and the pad (pads are trained)
    masked = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    masked[0, 10] = True  # only token 15 at position 10
    t = torch.tensor([0.5])
    noised = Noised(torch.where(masked, MASK, batch.input_ids), masked, t)
    logits = torch.zeros(1, batch.input_ids.shape[1], V)
    # shifted: position 10 is scored by logits at 9. Make them certain of the wrong token:
    logits[0, 9, 3] = 50.0
    # and make logits at 10 (which would score position 11, unmasked) terrible too: must not count
    logits[0, 10, 4] = 50.0
    terms = objective_loss(logits, batch, noised, "shifted")
    assert terms.masked_count == 1
    assert terms.diffusion_sum.item() == pytest.approx(50.0 / 0.5, rel=1e-4)


def test_hand_computed_total_with_uniform_logits():
    prompt, response = planned_example()
    batch = collate([prompt], [response], SPEC, "planned")
    masked = batch.roles == Role.CONTENT
    t = torch.tensor([0.25])
    noised = Noised(torch.where(masked, MASK, batch.input_ids), masked, t)
    logits = torch.zeros(1, batch.input_ids.shape[1], V)
    terms = objective_loss(logits, batch, noised, "shifted")
    n_ar, n_content = 5, 3
    ce = math.log(V)
    expected = (n_ar * ce + n_content * ce / 0.25) / (n_ar + n_content)
    assert terms.ar_count == n_ar
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)
    # the authors' variant also divides the AR term by t
    terms_t = objective_loss(logits, batch, noised, "shifted", ar_loss_over_t=True)
    assert terms_t.loss.item() == pytest.approx((n_ar * ce / 0.25 + n_content * ce / 0.25) / 8, rel=1e-5)


def test_aligned_convention_scores_a_token_at_its_own_position():
    masked = torch.tensor([[False, False, True, True], [False, True, False, False]])
    assert torch.equal(scoring_positions(masked, "aligned"), masked)
    shifted = scoring_positions(masked, "shifted")
    assert shifted.tolist() == [[False, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="position 0"):
        scoring_positions(torch.tensor([[True, False]]), "shifted")


def test_logits_given_only_where_needed_give_the_same_terms():
    prompt, response = planned_example()
    batch = collate([prompt] * 4, [response] * 4, SPEC, "planned")
    noised = add_noise(batch, MASK, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(*batch.input_ids.shape, V, generator=torch.Generator().manual_seed(2))
    asked: list[torch.Tensor] = []

    def at(needed: torch.Tensor) -> torch.Tensor:
        asked.append(needed)
        return logits[needed]

    for convention in ("shifted", "aligned"):
        full = objective_loss(logits, batch, noised, convention)
        part = objective_loss(at, batch, noised, convention)
        assert part.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
        assert (part.ar_correct, part.masked_correct) == (full.ar_correct, full.masked_correct)
    # only scoring positions are asked for: never the prompt's, never the ones after the last target
    assert not asked[0][:, : len(prompt) - 1].any() and asked[0].sum() < asked[0].numel() / 2


def test_noise_never_touches_plan_prompt_or_scaffold():
    prompt, response = planned_example()
    batch = collate([prompt] * 64, [response] * 64, SPEC, "planned")
    noised = add_noise(batch, MASK, generator=torch.Generator().manual_seed(0))
    assert not noised.masked[batch.roles != Role.CONTENT].any()
    assert torch.equal(noised.input_ids[~noised.masked], batch.input_ids[~noised.masked])
    assert (noised.input_ids[noised.masked] == MASK).all()
    # masking rate follows t: heavily masked rows have large t
    rate = noised.masked.sum(1).float() / 3
    assert torch.corrcoef(torch.stack([rate, noised.t]))[0, 1] > 0.5


def test_autoregressive_baseline_is_next_token_on_the_answer():
    batch = collate([[10, 11]], [[12, 13, END]], SPEC, "autoregressive")
    assert batch.ar_labels[0].tolist() == [IGNORE, 12, 13, END, IGNORE]
    logits = logits_favouring(batch.ar_labels, 0.0)
    terms = objective_loss(logits, batch, None)
    assert terms.ar_count == 3 and terms.masked_count == 0
    assert terms.loss.item() == pytest.approx(math.log(V), rel=1e-5)
    assert batch.attention_mask[0, 0].equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_planned_ar_labels_the_stream_and_every_content_token_from_the_position_before():
    prompt, response = planned_example()
    batch = collate([prompt], [response], SPEC, "planned_ar")
    assert torch.equal(batch.roles, collate([prompt], [response], SPEC, "planned").roles)
    # the planned stream's labels; then 14, 15 and the pad, each at the position before it
    # (the head's </topic>, 14, 15); span tags and the head are never targets
    assert batch.ar_labels[0].tolist() == [IGNORE, PO, 12, 13, PC, END, IGNORE, IGNORE, 14, 15, PAD, IGNORE, IGNORE, IGNORE]
    terms = objective_loss(logits_favouring(batch.ar_labels, 0.0), batch, None)
    assert terms.ar_count == 8 and terms.masked_count == 0
    assert terms.loss.item() == pytest.approx(math.log(V), rel=1e-5)
    terms = objective_loss(logits_favouring(batch.ar_labels, 50.0), batch, None)
    assert terms.ar_correct == 8


def test_rows_mixed_in_autoregressively_are_never_noised_and_score_as_planned_ar_alone():
    """A planned batch whose first row is laid out ``planned_ar``: that row gets no noise
    (t = 1) and its loss is what the row scores alone as ``planned_ar``; the other row
    scores as a planned row with the same noise, and no token counts twice."""
    prompt, response = planned_example()
    mixed = collate([prompt] * 2, [response] * 2, SPEC, "planned", causal_rows=[True, False])
    for seed in range(20):
        noised = add_noise(mixed, MASK, generator=torch.Generator().manual_seed(seed))
        assert not noised.masked[0].any() and noised.t[0] == 1.0
        if noised.masked[1].any():
            break
    logits = torch.randn(2, mixed.input_ids.shape[1], V, generator=torch.Generator().manual_seed(1))
    both = objective_loss(logits, mixed, noised)
    ar = objective_loss(logits[:1], collate([prompt], [response], SPEC, "planned_ar"), None)
    planned = collate([prompt], [response], SPEC, "planned")
    one = Noised(noised.input_ids[1:], noised.masked[1:], noised.t[1:])
    pd = objective_loss(logits[1:], planned, one)
    assert both.total_sum.item() == pytest.approx(ar.total_sum.item() + pd.total_sum.item(), rel=1e-5)
    assert both.n_targets == ar.n_targets + pd.n_targets == 8 + 5 + 3  # AR row: 8; planned: 5 plan + 3 content
    assert both.masked_count == pd.masked_count > 0


def test_diffusion_baseline_masks_every_answer_token_and_fills_with_end():
    batch = collate([[10], [10]], [[12, 13, END], [12, END]], SPEC, "diffusion")
    assert batch.input_ids[1].tolist() == [10, 12, END, END]
    assert (batch.roles[:, 1:] == Role.CONTENT).all()
    assert batch.attention_mask.all()  # bidirectional, no padding here


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 64), t_min=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_stratified_rates_put_one_example_in_each_stratum(b: int, t_min: float, seed: int):
    t = draw_t(b, t_min, "stratified", torch.Generator().manual_seed(seed))
    stratum = ((t - t_min) / (1 - t_min) * b).floor().long().clamp(max=b - 1)
    assert sorted(stratum.tolist()) == list(range(b))
    assert ((t >= t_min) & (t < 1)).all()


@pytest.mark.parametrize("sampling", ["uniform", "stratified"])
def test_every_example_rate_is_uniform_either_way(sampling: str):
    """Stratifying changes the batch's spread, not any example's distribution (same expected loss)."""
    g = torch.Generator().manual_seed(0)
    t = torch.stack([draw_t(8, 0.1, sampling, g) for _ in range(4000)])  # [draws, 8]
    for row in t.T:  # each example's rate: U(0.1, 1), so deciles hold ~10% each
        deciles = torch.histc(row, bins=10, min=0.1, max=1.0) / len(row)
        assert (deciles - 0.1).abs().max() < 0.03
    spread = t.max(1).values - t.min(1).values
    assert (spread.min() > 0.6) == (sampling == "stratified")  # a stratified batch always spans the range
