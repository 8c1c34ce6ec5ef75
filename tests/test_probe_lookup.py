"""benchmarks/probe_lookup.py measures what RESULTS reports: check its alignment and its forced plan.

A scripted backbone that knows the reference answer must score 1.0 on the
look-ups, in the planned layout (key tokens masked, shifted or aligned head;
all at once, or with the key tokens to the left given) and in the AR layout;
one wrong scripted key token must cost exactly its share. With the left keys
given, the pass that scores a key token must see exactly the key tokens before
it. The reference-plan decoder must write the plan it is given, not the
model's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from mock_lm import make_mock_lm, mock_tokenizer, planned_script

from pdlightning.layout import encode_plain, encode_response, entry_ids
from pdlightning.tags import PlanEntry, Round, TaggedResponse, parse, render, strip

_spec = importlib.util.spec_from_file_location(
    "probe_lookup", Path(__file__).parents[1] / "benchmarks" / "probe_lookup.py"
)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

TOK, SPEC = mock_tokenizer(2)
REFERENCE = TaggedResponse(
    [Round([PlanEntry("cat", 2), PlanEntry("dog", 2)], ["the red cat", "a blue dog ran"])]
)
ROW = {
    "prompt": "the red cat and the blue dog",
    "tagged": render(REFERENCE, SPEC),
    "response": strip(REFERENCE, SPEC),
    "answer_keys": ["red", "blue"],
}


def planned_layout() -> list[int]:
    """The reference in the planned layout, each span padded to its planned length."""
    pads = [e.length * SPEC.length_unit - len(TOK.encode(s, add_special_tokens=False)) for e, s in zip(
        REFERENCE.entries(), REFERENCE.span_texts(), strict=True)]
    return encode_response(parse(ROW["tagged"], SPEC), TOK, SPEC, topic_heads=True, pads=pads)


def key_positions(script: list[int]) -> list[int]:
    keys = probe.key_token_ids(make_mock_lm([]), ROW["answer_keys"])
    return [i for i, t in enumerate(script) if t in keys]


@pytest.mark.parametrize("left_keys", [False, True])
@pytest.mark.parametrize(
    ("layout", "logits", "dense"),
    [("planned", "shifted", False), ("planned", "aligned", False), ("planned", "shifted", True),
     ("plain", "shifted", None)],
)
def test_a_model_that_knows_the_answer_looks_up_every_key_token_and_one_miss_costs_its_share(
    layout: str, logits: str, dense: bool | None, left_keys: bool
):
    script = planned_layout() if layout == "planned" else encode_plain(ROW["response"], TOK, SPEC)
    keys = key_positions(script)
    assert len(keys) >= 2, "the keys must appear in the answer for the probe to mean anything"
    assert probe.lookup_accuracy(make_mock_lm(script, logits=logits), ROW, dense, left_keys) == 1.0
    for miss in (keys[0], keys[-1]):
        wrong = list(script)
        wrong[miss] = TOK.encode("mat", add_special_tokens=False)[0]
        missed = probe.lookup_accuracy(make_mock_lm(wrong, logits=logits), ROW, dense, left_keys)
        assert missed == pytest.approx(1 - 1 / len(keys))


def test_with_left_keys_given_each_key_token_is_scored_seeing_exactly_the_key_tokens_before_it():
    lm = make_mock_lm(planned_layout())
    fed: list[torch.Tensor] = []
    forward = lm.forward
    lm.forward = lambda x, *a, **k: fed.append(x.clone()) or forward(x, *a, **k)
    probe.lookup_accuracy(lm, ROW, dense=False, left_keys=True)
    (x,) = fed
    prompt_len = x.shape[1] - len(planned_layout())
    keys = [prompt_len + i for i in key_positions(planned_layout())]
    assert x.shape[0] == len(keys), "one pass (row) per key token"
    mask_id = SPEC.id("mask")
    for k, row in enumerate(x):
        masked = (row == mask_id).nonzero()[:, 0].tolist()
        assert masked == keys[k:], f"row {k} must mask key tokens {k}.. and nothing else"


def test_the_reference_plan_replaces_the_models_own():
    own = planned_script([("mat", "the cat"), ("park", "a dog ran")])
    lm = make_mock_lm(own, plan_stream=True)
    dec = probe.ReferencePlan(max_new_tokens=60)
    dec.plan_ids = [i for e in REFERENCE.rounds[0].entries for i in entry_ids(TOK, SPEC, e)]
    dec.terminator = SPEC.id("end")
    forced = dec.generate(lm, [ROW["prompt"]])[0]
    assert forced.plan == REFERENCE.rounds[0].entries
    unforced = probe.PlannedDiffusion(max_new_tokens=60).generate(lm, [ROW["prompt"]])[0]
    assert [e.topic for e in unforced.plan] == ["mat", "park"]
