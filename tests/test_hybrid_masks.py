"""Hybrid attention masks against a brute-force reference written from the
rules of design section 4, the worked example for both presets, and the
invariants as properties."""

from __future__ import annotations

from itertools import pairwise

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.data.collate import IGNORE, collate
from pdlightning.masks import (
    Role,
    Structure,
    answer_ids,
    batch_attention_mask,
    extension_mask,
    hybrid_attention_mask,
    mask_from_structure,
    roles,
    structure,
)
from pdlightning.tags import CONTROL_NAMES, TagSpec

SPEC = TagSpec().with_ids({n: i for i, n in enumerate(CONTROL_NAMES)})
PO, PC, SO, SC, SY, END, PAD, MASK = range(8)


def reference(ids: list[int], dense: bool = False) -> torch.Tensor:
    """Loops straight from the rules: span of each position, then rule by rule."""
    n = len(ids)
    span, round_of, current, inside, syncs = [-1] * n, [0] * n, -1, False, 0
    count = 0
    for i, t in enumerate(ids):
        if t == SO:
            inside, current, count = True, count, count + 1
        if inside:
            span[i] = current
        if t == SC:
            inside = False
        if t == SY:
            syncs += 1
        round_of[i] = syncs
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if span[j] >= 0 and span[i] == span[j]:
                m[i, j] = True  # rule 2: a span is bidirectional
            elif j <= i and (span[j] < 0 or any(ids[k] == SY for k in range(j + 1, i + 1))):
                m[i, j] = True  # rule 1 with rules 3-4: a span becomes visible after a later sync
            elif dense and span[i] >= 0 and span[j] >= 0 and round_of[i] == round_of[j]:
                m[i, j] = True  # rule 5: spans of one round see each other
    return m


@st.composite
def sequences(draw: st.DrawFn) -> list[int]:
    word = st.integers(8, 30)
    ids = draw(st.lists(word, min_size=1, max_size=3))
    for r in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 6))
        for _ in range(n):
            ids += [PO, draw(word), PC]
        for _ in range(n):
            head = [draw(word), PC] if draw(st.booleans()) else []
            ids += [SO, *head, *draw(st.lists(st.sampled_from([*range(8, 31), PAD]), min_size=1, max_size=4)), SC]
        ids.append(SY if draw(st.booleans()) else (END if r == 3 else SY))
    return ids


@settings(max_examples=150, deadline=None)
@given(ids=sequences(), dense=st.booleans())
def test_builder_equals_the_brute_force_reference(ids: list[int], dense: bool):
    assert torch.equal(hybrid_attention_mask(ids, SPEC, dense=dense), reference(ids, dense))


@settings(max_examples=100, deadline=None)
@given(ids=sequences(), dense=st.booleans())
def test_causal_spans_are_the_hybrid_mask_made_causal(ids: list[int], dense: bool):
    """The ``planned_ar`` mask: what the hybrid mask allows, less everything to the right."""
    x = torch.tensor([ids])
    causal = batch_attention_mask(x, SPEC, dense=dense, causal_spans=True)[0, 0]
    assert torch.equal(causal, reference(ids, dense) & torch.ones(len(ids), len(ids), dtype=torch.bool).tril())


@settings(max_examples=100, deadline=None)
@given(ids=sequences(), dense=st.booleans(), data=st.data())
def test_causal_spans_follow_logical_positions_when_columns_are_shuffled(ids: list[int], dense: bool, data):
    """A KV cache holds a span's columns in the order they were written, not in the
    sequence's: with ``positions`` the causal rule inside a span reads them. Shuffling the
    columns of each span (the rest in place) and passing their positions gives the mask
    of the unshuffled sequence, shuffled the same way."""
    x = torch.tensor([ids])
    span = structure(x, SPEC).span[0]
    perm = torch.arange(len(ids))
    for s in span.unique().tolist():
        if s >= 0:
            at = (span == s).nonzero().squeeze(1)
            perm[at] = at[torch.tensor(data.draw(st.permutations(range(len(at)))))]
    full = batch_attention_mask(x, SPEC, dense=dense, causal_spans=True)[0, 0]
    logical = structure(x, SPEC)  # gathered onto the columns, as the decoder does
    physical = Structure(*(getattr(logical, f)[:, perm] for f in ("span", "syncs", "scaffold", "valid")))
    shuffled = mask_from_structure(physical, dense, causal_spans=True, positions=perm[None])
    assert torch.equal(shuffled[0, 0], full[perm][:, perm])


@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(st.tuples(sequences(), st.booleans()), min_size=1, max_size=4), dense=st.booleans())
def test_a_mixed_batch_lays_out_each_row_as_its_own_mode(seqs: list[tuple[list[int], bool]], dense: bool):
    """A planned batch with some rows laid out ``planned_ar`` (a stage's ``ar_fraction``):
    each row's mask, labels and roles are its own mode's, alone in a batch."""
    prompts, responses = [ids[:1] for ids, _ in seqs], [ids[1:] for ids, _ in seqs]
    causal = [c for _, c in seqs]
    mixed = collate(prompts, responses, SPEC, "planned", dense=dense, causal_rows=causal)
    assert mixed.causal_rows.tolist() == causal
    for b, (ids, c) in enumerate(seqs):
        alone = collate([ids[:1]], [ids[1:]], SPEC, "planned_ar" if c else "planned", dense=dense)
        n = len(ids)
        assert torch.equal(mixed.attention_mask[b, 0, :n, :n], alone.attention_mask[0, 0])
        assert torch.equal(mixed.ar_labels[b, :n], alone.ar_labels[0])
        assert torch.equal(mixed.roles[b, :n], alone.roles[0])


@settings(max_examples=100, deadline=None)
@given(ids=sequences(), dense=st.booleans())
def test_planned_ar_never_lets_a_position_see_the_token_it_predicts(ids: list[int], dense: bool):
    batch = collate([ids[:1]], [ids[1:]], SPEC, "planned_ar", dense=dense)
    planned = collate([ids[:1]], [ids[1:]], SPEC, "planned", dense=dense)
    labels, mask = batch.ar_labels[0], batch.attention_mask[0, 0]
    content = (batch.roles[0] == Role.CONTENT).nonzero().squeeze(-1)
    for q in content.tolist():
        assert labels[q - 1] == batch.input_ids[0, q] and not mask[q - 1, q]
    elsewhere = torch.ones_like(labels, dtype=torch.bool)
    elsewhere[content - 1] = False
    assert torch.equal(labels[elsewhere], planned.ar_labels[0][elsewhere])  # the plan stream's
    # a plan target at q is unseen by the position holding its label too: q is the next stream position
    stream = ((batch.roles[0] == Role.PROMPT) | (batch.roles[0] == Role.PLAN)).nonzero().squeeze(-1).tolist()
    for p, q in pairwise(stream):
        if labels[p] != IGNORE:
            assert labels[p] == batch.input_ids[0, q] and not mask[p, q]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(sequences(), min_size=1, max_size=4), dense=st.booleans())
def test_batches_with_right_padding_match_rows_and_never_attend_padding(rows: list[list[int]], dense: bool):
    t = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (t - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    m = batch_attention_mask(ids, SPEC, lengths, dense=dense)[:, 0]
    for b, r in enumerate(rows):
        n = len(r)
        assert torch.equal(m[b, :n, :n], reference(r, dense))
        assert not m[b, :n, n:].any()  # batch padding never attended
        assert torch.equal(m[b, n:, :], torch.eye(t, dtype=torch.bool)[n:])  # padding rows: only themselves
    assert m.diagonal(dim1=1, dim2=2).all()  # every row attends to itself


@settings(max_examples=60, deadline=None)
@given(ids=sequences(), cut=st.integers(0, 200), dense=st.booleans())
def test_extension_rows_equal_the_full_mask(ids: list[int], cut: int, dense: bool):
    p = cut % len(ids)
    x = torch.tensor([ids])
    assert torch.equal(extension_mask(x, SPEC, p, dense=dense), batch_attention_mask(x, SPEC, dense=dense)[:, :, p:])


@settings(max_examples=100, deadline=None)
@given(ids=sequences(), dense=st.booleans())
def test_the_mask_is_closed_under_composition(ids: list[int], dense: bool):
    """If i sees j and j sees k, then i sees k: stacking layers leaks nothing the mask hides.

    The backbone applies the mask in every layer, so a position's output depends
    on every token reachable through a chain of visible positions; for the
    one-layer mask to be the whole story, that reach must be the mask itself."""
    m = hybrid_attention_mask(ids, SPEC, dense=dense)
    reach = (m.int() @ m.int()) > 0
    assert not (reach & ~m).any()


def test_a_plan_after_the_end_tag_would_break_closure():
    """What the grammar's "nothing after the end tag" rule protects: in the dense
    variant, a round with no <sync/> before the next plan would let the first span
    reach that plan through the second span."""
    ids = [8, PO, 9, PC, SO, 10, SC, END, PO, 11, PC, SO, 12, SC, END]
    m = hybrid_attention_mask(ids, SPEC, dense=True)
    reach = (m.int() @ m.int()) > 0
    assert not m[5, 9] and m[5, 12] and m[12, 9] and reach[5, 9]


@settings(max_examples=100, deadline=None)
@given(ids=sequences())
def test_invariants(ids: list[int]):
    sparse, dense = reference(ids), hybrid_attention_mask(ids, SPEC, dense=True)
    m = hybrid_attention_mask(ids, SPEC)
    assert torch.equal(m, sparse)
    x = torch.tensor([ids])
    role = roles(x, SPEC, torch.tensor([1]))[0]
    outside = (role == Role.PROMPT) | (role == Role.PLAN)
    # prompt and plan rows are causal among prompt and plan columns
    sub = m[outside][:, outside]
    assert torch.equal(sub, torch.ones_like(sub).tril())
    # dense differs from sparse only inside spans
    diff = (dense ^ m).nonzero().tolist()
    in_span = (role == Role.CONTENT) | (role == Role.SCAFFOLD)
    assert all(in_span[i] and in_span[j] for i, j in diff)


def worked(spec: TagSpec, last: str) -> tuple[list[str], torch.Tensor]:
    toks = ["q", spec.plan_open, "t1", "1", spec.plan_close, spec.plan_open, "t2", "1", spec.plan_close,
            spec.span_open, "a1", "a2", spec.span_close, spec.span_open, "b1", spec.span_close, last]
    return toks, hybrid_attention_mask(toks, spec)


def test_worked_example_of_design_section_4_for_both_presets():
    for preset in ("paper", "official"):
        spec = TagSpec.preset(preset)
        toks, m = worked(spec, spec.end)
        prefix, span_a, span_b, eos = list(range(9)), list(range(9, 13)), list(range(13, 16)), 16
        for i in span_a:
            assert m[i].nonzero().squeeze(-1).tolist() == prefix + span_a  # q, plan, whole own span
        for i in span_b:
            assert m[i].nonzero().squeeze(-1).tolist() == prefix + span_b  # not the first span
        assert m[eos].nonzero().squeeze(-1).tolist() == [*prefix, eos]  # EOS sees neither span
        _, with_sync = worked(spec, spec.sync)
        assert with_sync[16].all()  # a sync in EOS's place sees both spans
        dense = hybrid_attention_mask(toks, spec, dense=True)
        for i in span_a + span_b:
            assert dense[i].nonzero().squeeze(-1).tolist() == prefix + span_a + span_b
        assert torch.equal(dense[eos], m[eos])


def test_roles_mark_prompt_plan_content_scaffold_and_padding():
    ids = torch.tensor([[9, 9, PO, 10, PC, SO, 10, PC, 11, PAD, SC, END, PAD]])
    r = roles(ids, SPEC, prompt_lengths=torch.tensor([2]), lengths=torch.tensor([12]))[0].tolist()
    P, L, C, S, X = Role.PROMPT, Role.PLAN, Role.CONTENT, Role.SCAFFOLD, Role.PAD
    assert r == [P, P, L, L, L, S, S, S, C, C, S, L, X]


def reference_answer(ids: list[int]) -> list[int]:
    """Span by span: the tokens between a span's open tag (or its topic head's close) and its close tag."""
    ids = ids[: ids.index(END)] if END in ids else ids
    if not {PO, PC, SO, SC, SY} & set(ids):
        return [t for t in ids if t not in (PAD, MASK)]
    out, i = [], 0
    while i < len(ids):
        if ids[i] != SO:
            i += 1
            continue
        close = ids.index(SC, i) if SC in ids[i:] else len(ids)
        body = ids[i + 1 : close]
        if PC in body:
            body = body[body.index(PC) + 1 :]  # the topic head
        out += [t for t in body if t not in (PAD, MASK)]
        i = close + 1
    return out


@settings(max_examples=150, deadline=None)
@given(ids=sequences(), cut=st.integers(1, 200), tail=st.lists(st.integers(0, 30), max_size=3))
def test_answer_ids_are_the_span_contents_of_a_tagged_response_and_all_of_a_plain_one(
    ids: list[int], cut: int, tail: list[int]
):
    for seq in (ids, ids[: cut % len(ids) + 1], [*ids, END, *tail]):  # whole, cut by the length cap, text after EOS
        assert answer_ids(seq, SPEC) == reference_answer(seq)
    plain = [t for t in ids if t >= 8 or t == PAD]  # untagged: all but pads
    assert answer_ids([*plain, MASK, END, 9], SPEC) == [t for t in plain if t != PAD]
