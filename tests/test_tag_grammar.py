"""The tag language: round trips and strip as properties, every rule's error,
the PASTA form, id-level parsing, and fuzzing (nothing but TagError escapes)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.tags import (
    RULES,
    PlanEntry,
    Round,
    TagError,
    TaggedResponse,
    TagSpec,
    from_pasta,
    parse,
    parse_ids,
    render,
    strip,
)

PRESETS = [TagSpec.preset("paper"), TagSpec.preset("official")]
WORDS = st.sampled_from(["alpha", "beta", "gamma", "red", "city", "step", "two", "total"])
TEXT = st.lists(st.sampled_from(["Ann", "is", "31", ".", ",", "\n", " ", "lives", "in", "Paris", "!"]),
                min_size=1, max_size=8).map("".join).filter(lambda s: s.strip())


@st.composite
def responses(draw: st.DrawFn, spec: TagSpec) -> TaggedResponse:
    rounds = []
    n_rounds = draw(st.integers(1, 4))
    for r in range(n_rounds):
        n = draw(st.integers(1, 6))
        entries = [PlanEntry(" ".join(draw(st.lists(WORDS, min_size=0, max_size=3))), draw(st.integers(1, 30)))
                   for _ in range(n)]
        spans = [draw(TEXT) + spec.pad * draw(st.integers(0, 2)) for _ in range(n)]
        rounds.append(Round(entries, spans, sync=r < n_rounds - 1 or draw(st.booleans())))
    heads = draw(st.booleans()) and all(e.topic for r in rounds for e in r.entries)
    return TaggedResponse(rounds, end=draw(st.booleans()), topic_heads=heads)


@pytest.mark.parametrize("spec", PRESETS, ids=["paper", "official"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_render_parse_round_trip_and_strip(spec: TagSpec, data: st.DataObject):
    r = data.draw(responses(spec))
    text = render(r, spec)
    assert parse(text, spec) == r
    assert render(parse(text, spec), spec) == text
    assert strip(text, spec) == "".join(s.replace(spec.pad, "") for s in r.span_texts())


@settings(max_examples=60, deadline=None)
@given(r=responses(TagSpec()))
def test_parse_ids_agrees_with_parse(r: TaggedResponse):
    spec = TagSpec()
    text = render(r, spec)
    vocab: dict[str, int] = {}
    ids_spec = spec.with_ids({n: i for i, n in enumerate(spec.strings())})
    by_string = {s: ids_spec.ids[n] for n, s in spec.strings().items()}
    import re

    pieces = re.split("(" + "|".join(re.escape(s) for s in sorted(by_string, key=len, reverse=True)) + ")", text)
    ids: list[int] = []
    for piece in pieces:
        if piece in by_string:
            ids.append(by_string[piece])
        else:
            for ch in piece:
                ids.append(vocab.setdefault(ch, 100 + len(vocab)))
    inverse = {v: k for k, v in vocab.items()}
    assert parse_ids(ids, ids_spec, lambda run: "".join(inverse[i] for i in run)) == parse(text, spec)


MALFORMED = [
    ("<topic>a 1</topic><async>x", "unbalanced_span"),
    ("<topic>a 1</topic>x</async>", "text_outside_span"),
    ("<topic>a 1</topic></async>", "unbalanced_span"),
    ("<topic>a 1</topic><async>x<async>y</async></async>", "nested_span"),
    ("hello<topic>a 1</topic><async>x</async>", "text_outside_span"),
    ("<topic>one two three four 1</topic><async>x</async>", "topic_too_long"),
    ("<topic>a</topic><async>x</async>", "bad_length"),
    ("<topic>a 0</topic><async>x</async>", "bad_length"),
    ("<topic>a 1</topic><topic>b 1</topic><async>x</async><eos/>", "entry_span_mismatch"),
    ("<topic>a 1</topic><async>  </async>", "empty_span"),
    ("", "empty_response"),
    ("<topic>a 1</topic><async>x</async><eos/>more", "text_after_end"),
    ("<topic>a 1</topic><async>x<sync/></async>", "unbalanced_span"),
    ("<topic>a 1</topic><async>x</async><topic>b 1</topic><async>y</async>", "unexpected_tag"),
]


@pytest.mark.parametrize(("text", "rule"), MALFORMED)
def test_malformed_input_names_the_rule_and_position(text: str, rule: str):
    with pytest.raises(TagError) as err:
        parse(text)
    assert err.value.rule == rule and rule in RULES
    assert rule in str(err.value) and "position" in str(err.value)


def test_pasta_form_becomes_plan_and_spans():
    text = '<async topic="definition" tokens="30">X is a letter.</async> <sync/> <async topic="use">Y.</async>'
    r = from_pasta(text, count_tokens=lambda s: 11)
    assert render(r) == ("<topic>definition 3</topic><async>X is a letter.</async><sync/>"
                         "<topic>use 2</topic><async>Y.</async><eos/>")
    assert strip(r) == "X is a letter.Y."
    with pytest.raises(TagError, match="bad_length"):
        from_pasta('<async topic="a" tokens="many">x</async>')


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<topic>", "</topic>", "<async>", "</async>", "<sync/>", "<eos/>", "<pad/>",
                                 "<mask/>", "a", " 3", "x y", "\n", '<async topic="t" tokens="9">']),
                max_size=14).map("".join))
def test_fuzz_parse_raises_only_tag_errors(text: str):
    for fn in (parse, from_pasta):
        with contextlib.suppress(TagError):
            fn(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=30))
def test_fuzz_parse_ids_raises_only_tag_errors(ids: list[int]):
    spec = TagSpec().with_ids({n: i for i, n in enumerate(TagSpec().strings())})
    with contextlib.suppress(TagError):
        parse_ids(ids, spec, lambda run: " ".join(map(str, run)))


def test_spec_validation():
    with pytest.raises(ValueError, match="distinct"):
        TagSpec(sync="<async>")
    with pytest.raises(ValueError, match="unknown tag preset"):
        TagSpec.preset("nope")
    with pytest.raises(KeyError, match="add_control_tokens"):
        TagSpec().id("sync")
