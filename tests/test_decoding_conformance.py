"""One conformance suite for every registered decoding strategy, then
strategy-specific tests of the autoregressive, diffusion and Fast-dLLM baselines.

The suite runs each name of :func:`list_strategies` (new strategies join
automatically) against the scripted mock of :mod:`mock_lm`: a one-round planned
response whose span content is partly context-dependent, so masks, caches and
batching are all observable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mock_lm import encode, make_mock_lm, mock_tokenizer, planned_script

from pdlightning.decoding import (
    Autoregressive,
    Counters,
    DecodingStrategy,
    Diffusion,
    FastDLLM,
    Generation,
    LanguageModel,
    PlannedDiffusion,
    RowOutput,
    get_strategy,
    list_strategies,
)
from pdlightning.decoding.base import PromptError
from pdlightning.decoding.diffusion import read_response
from pdlightning.decoding.fast_dllm import block_caps, confident_count
from pdlightning.decoding.sampling import unmask_scores
from pdlightning.model.backbone import TINY_QWEN2, build_backbone
from pdlightning.tokenizer import ROLE_TOKENS, format_prompt

TOK, SPEC = mock_tokenizer()
END, PAD, MASK, SO, SC, PC = (SPEC.id(n) for n in ("end", "pad", "mask", "span_open", "span_close", "plan_close"))
ROLE_IDS = set(TOK.convert_tokens_to_ids(list(ROLE_TOKENS)))
PROMPTS = ["the cat", "a dog ran in the park", "the"]
MAX_NEW = 40
STRATEGIES = list_strategies()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def context_script() -> list[int | None]:
    """The default planned response with every other span content token context-dependent."""
    script: list[int | None] = list(planned_script([("cat", "the cat"), ("dog", "a dog ran")]))
    inside, k = False, 0
    for i, t in enumerate(script):
        if t == SO:
            inside, k = True, 0
        elif t == SC:
            inside = False
        elif inside and t == PC:
            k = 0  # topic head closed: content follows
        elif inside and t != PAD:
            k += 1
            if k % 2 == 0:
                script[i] = None
    return script


SCRIPT = context_script()
LM = make_mock_lm(SCRIPT, confidence=(0.97, 0.92, 0.99, 0.8, 0.95))
UNSURE = make_mock_lm(SCRIPT, confidence=0.5)


def run(
    name: str | DecodingStrategy,
    lm: LanguageModel = LM,
    prompts: list[str] | list[list[int]] = PROMPTS,
    seed: int = 0,
    **kwargs: object,
) -> list[Generation]:
    strategy = name if isinstance(name, DecodingStrategy) else get_strategy(
        name, **{"max_new_tokens": MAX_NEW, "batch_size": 3, **kwargs}
    )
    return strategy.generate(lm, prompts, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- conformance


def test_builtin_strategies_are_registered():
    assert {"autoregressive", "diffusion", "fast_dllm"} <= set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_results_are_generations_and_prompt_is_preserved(name: str):
    gens = run(name)
    assert len(gens) == len(PROMPTS)
    for prompt, g in zip(PROMPTS, gens, strict=True):
        assert isinstance(g, Generation) and isinstance(g.counters, Counters)
        assert g.prompt == prompt
        assert isinstance(g.text, str) and g.text
        assert all(isinstance(t, int) for t in g.token_ids) and g.token_ids
        assert not ROLE_IDS & set(g.token_ids)  # the prompt (role tokens and all) is not in the output
        ids = format_prompt(TOK, prompt)
        assert g.token_ids[: len(ids)] != ids
        assert isinstance(g.to_dict(), dict)
    # prompts given as ids: the prompt field is their text
    (g,) = run(name, prompts=[format_prompt(TOK, PROMPTS[0])])
    assert g.prompt == TOK.decode(format_prompt(TOK, PROMPTS[0]))
    assert g.token_ids == gens[0].token_ids


@pytest.mark.parametrize("name", STRATEGIES)
def test_temperature_zero_is_deterministic(name: str):
    a = run(name, seed=0)
    b = run(name, seed=123)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.critical_path for g in a] == [g.critical_path for g in b]


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_output_when_sampling(name: str):
    kw = {"temperature": 1.0, "lm": UNSURE}
    first = [g.token_ids for g in run(name, seed=7, **kw)]
    assert [g.token_ids for g in run(name, seed=7, **kw)] == first
    others = {tuple(map(tuple, (g.token_ids for g in run(name, seed=s, **kw)))) for s in range(3)}
    assert len(others | {tuple(map(tuple, first))}) > 1  # the seed matters


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("max_new_tokens", [6, MAX_NEW])
def test_length_cap_is_respected(name: str, max_new_tokens: int):
    for temperature, lm in ((0.0, LM), (1.0, UNSURE)):
        for g in run(name, lm=lm, max_new_tokens=max_new_tokens, temperature=temperature):
            assert len(g.token_ids) <= max_new_tokens


@pytest.mark.parametrize("name", STRATEGIES)
def test_counters_are_consistent(name: str):
    strategy = get_strategy(name, max_new_tokens=MAX_NEW, batch_size=3)
    for lm, temperature in ((LM, 0.0), (UNSURE, 1.0)):
        strategy.temperature = temperature
        gens = run(strategy, lm=lm)
        for g in gens:
            c = g.counters
            assert c.content_tokens + c.control_tokens + c.pad_tokens == len(g.token_ids) - g.token_ids.count(MASK)
            assert c.forward_passes >= c.critical_path >= 1
            assert c.forward_passes == gens[0].counters.forward_passes  # one batch
            assert c.seconds >= 0
            if name == "autoregressive":
                assert c.critical_path == len(g.token_ids)
            if name == "diffusion":
                assert c.critical_path == strategy.n_steps == c.forward_passes


@pytest.mark.parametrize("name", STRATEGIES)
def test_batch_equals_one_by_one(name: str):
    assert len({len(format_prompt(TOK, p)) for p in PROMPTS}) == 3
    batch = run(name, batch_size=3)
    single = run(name, batch_size=1)
    for a, b in zip(batch, single, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.critical_path == b.critical_path


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("autoregressive", {}),
        ("autoregressive", {"use_cache": False}),
        ("diffusion", {}),
        ("diffusion", {"order": "confidence", "steps": 20}),
        ("fast_dllm", {}),
        ("fast_dllm", {"cache": "prefix", "block_size": 8}),
        ("fast_dllm", {"cache": "dual", "block_size": 8}),
        ("fast_dllm", {"factor": 1.0, "block_size": 8}),
    ],
)
@pytest.mark.parametrize("logits", ["shifted", "aligned"])
def test_baselines_reproduce_a_fixed_script(name: str, kwargs: dict, logits: str):
    script = planned_script([("cat", "the cat"), ("dog", "a dog ran")])
    lm = make_mock_lm(script, logits=logits, confidence=0.99)
    if name == "autoregressive" and logits == "aligned":  # a mock diffusion model: no next-token head
        kwargs = {**kwargs, "mask_query": True}
    answer = encode("the cat") + encode("a dog ran")  # the spans' contents: no plan, heads, tags or pads
    for g in run(name, lm=lm, **kwargs):
        assert g.token_ids == script
        assert g.text == TOK.decode(answer).strip() and g.counters.content_tokens == len(answer)
        assert g.counters.control_tokens == len(script) - len(answer) - g.counters.pad_tokens


# ----------------------------------------------------------------------------- autoregressive


def tiny_qwen() -> LanguageModel:
    cfg = {
        **TINY_QWEN2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    return LanguageModel(build_backbone(config=cfg, vocab_size=len(TOK), seed=0), TOK, SPEC)


QWEN = tiny_qwen()


@pytest.mark.parametrize("logits", ["shifted", "aligned"])
def test_ar_cached_equals_uncached_on_a_real_backbone(logits: str):
    QWEN.logits_convention = logits
    try:
        out = {
            (cache, bs): run("autoregressive", lm=QWEN, max_new_tokens=12, use_cache=cache, batch_size=bs,
                             mask_query=logits == "aligned")
            for cache in (True, False)
            for bs in (1, 3)
        }
    finally:
        QWEN.logits_convention = "shifted"
    ref = [g.token_ids for g in out[(True, 3)]]
    assert all(len(t) == 12 or t[-1] == END for t in ref)
    for gens in out.values():
        assert [g.token_ids for g in gens] == ref
    assert out[(True, 3)][0].counters.forward_passes <= 12
    # positions fed, by brute force: with the cache the prompt once, then one token a pass;
    # without it the whole sequence every pass
    if logits == "shifted":
        for p, cached, uncached in zip(PROMPTS, out[(True, 1)], out[(False, 1)], strict=True):
            n, passes = len(format_prompt(TOK, p)), cached.counters.forward_passes
            assert cached.counters.fed_positions == n + passes - 1
            assert uncached.counters.fed_positions == sum(n + i for i in range(passes))


def test_ar_top_k_and_top_p_restrict_sampling():
    greedy = [g.token_ids for g in run("autoregressive", lm=UNSURE)]
    free = {tuple(g.token_ids) for s in range(3) for g in run("autoregressive", lm=UNSURE, temperature=1.0, seed=s)}
    assert free - {tuple(t) for t in greedy}  # unrestricted sampling leaves the script
    for kw in ({"top_k": 1}, {"top_p": 0.45}):  # the target alone has p = 0.5
        for s in range(3):
            sampled = run("autoregressive", lm=UNSURE, temperature=1.0, seed=s, **kw)
            assert [g.token_ids for g in sampled] == greedy


def test_ar_stops_each_row_at_its_end_token():
    lm = make_mock_lm([*encode("the cat"), END], confidence=0.99)
    for g in run("autoregressive", lm=lm):
        assert g.token_ids == [*encode("the cat"), END] and g.critical_path == len(g.token_ids)
        assert g.text == "the cat"
    assert Autoregressive().use_cache


# ----------------------------------------------------------------------------- diffusion


def test_diffusion_steps_default_to_the_budget_and_trailing_end_and_pads_are_trimmed():
    assert Diffusion(max_new_tokens=17).n_steps == 17
    assert Diffusion(max_new_tokens=17, steps=40).n_steps == 17
    words = encode("the cat")
    lm = make_mock_lm([words[0], PAD, *words[1:], END], confidence=0.99, after="pad")
    for g in run("diffusion", lm=lm, max_new_tokens=16):
        assert g.token_ids == [words[0], PAD, *words[1:], END]
        assert g.text == "the cat" and g.counters.pad_tokens == 1
        assert g.critical_path == g.counters.forward_passes == 16
    for g in run("diffusion", lm=lm, max_new_tokens=16, steps=4):
        assert g.critical_path == g.counters.forward_passes == 4
    lm = make_mock_lm([*words, PAD, PAD], confidence=0.99, after="pad")  # no end token
    (g,) = run("diffusion", lm=lm, prompts=PROMPTS[:1], max_new_tokens=10)
    assert g.token_ids == words
    assert read_response([5, PAD, 6, END, 7, END, PAD], END, PAD) == ([5, PAD, 6, END], [5, 6])


@pytest.mark.parametrize("order", ["entropy", "confidence", "random", "left_to_right"])
def test_diffusion_orders_fill_every_position(order: str):
    for g in run("diffusion", order=order, steps=10):
        assert MASK not in g.token_ids and g.critical_path == 10


def test_left_to_right_order_commits_the_leftmost_masks():
    probs = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    tokens = probs.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    scores = unmask_scores(probs, tokens, "left_to_right", gen, torch.tensor([7, 3, 5, 4]))
    assert scores.argsort(descending=True).tolist() == [1, 3, 2, 0]  # positions 3, 4, 5, 7
    with pytest.raises(ValueError, match="needs the positions"):
        unmask_scores(probs, tokens, "left_to_right", gen)
    with pytest.raises(ValueError, match="choose one of entropy, confidence, random, left_to_right"):
        unmask_scores(probs, tokens, "best", gen)


def test_diffusion_left_to_right_fills_the_budget_from_its_left(monkeypatch):
    """Every pass sees each row's masks as one block at the right; the entropy order
    (the mock's confidence varies by position) breaks that shape."""

    def holes(order: str) -> int:
        seen = []
        forward = LM.backbone.forward

        def record(input_ids, *args, **kwargs):
            seen.append(input_ids.clone())
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(LM.backbone, "forward", record)
        run("diffusion", order=order, steps=20)
        monkeypatch.undo()
        assert len(seen) == 20
        return sum((row == MASK).tolist() != sorted((row == MASK).tolist()) for ids in seen for row in ids)

    assert holes("left_to_right") == 0
    assert holes("entropy") > 0


# ----------------------------------------------------------------------------- Fast-dLLM


def test_fast_dllm_uses_4x_fewer_passes_than_diffusion_when_confident():
    lm = make_mock_lm(SCRIPT, confidence=0.999)
    slow = run("diffusion", lm=lm, max_new_tokens=64)
    fast = run("fast_dllm", lm=lm, max_new_tokens=64)
    assert 4 * fast[0].counters.forward_passes <= slow[0].counters.forward_passes
    for f in fast:
        assert MASK not in f.token_ids and f.token_ids[-1] == END


def test_fast_dllm_threshold_semantics():
    lm = make_mock_lm(SCRIPT, confidence=(0.95, 0.5, 0.7, 0.99, 0.6))
    passes = {}
    for threshold in (0.0, 0.3, 0.9, 1.0):
        gens = run("fast_dllm", lm=lm, threshold=threshold, block_size=16, max_new_tokens=48)
        passes[threshold] = [g.critical_path for g in gens]
        assert all(MASK not in g.token_ids for g in gens)
    assert passes[0.0] == passes[0.3] < passes[0.9] < passes[1.0]
    cap = FastDLLM(block_size=16, max_new_tokens=48).n_steps
    assert max(passes[1.0]) <= cap == 24  # the per-block caps bound the passes
    assert [c for _, _, c in block_caps(48, 16, 24)] == [8, 8, 8]
    assert sum(c for _, _, c in block_caps(50, 16, 25)) == 25


@settings(max_examples=200, deadline=None)
@given(
    conf=st.lists(st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6), min_size=1, max_size=4),
    hidden=st.lists(st.booleans(), min_size=6, max_size=6),
    factor=st.floats(0.01, 4.0),
    threshold=st.floats(0.0, 1.0),
)
def test_confident_count_matches_a_loop_over_the_ranked_positions(conf, hidden, factor, threshold):
    rows = torch.tensor(conf, dtype=torch.float64).masked_fill(torch.tensor(hidden), float("-inf"))
    for row, got_t, got_f in zip(rows.tolist(), confident_count(rows, threshold).tolist(),
                                 confident_count(rows, threshold, factor).tolist(), strict=True):
        assert got_t == sum(c >= threshold for c in row)
        n = 0  # the factor rule, one rank at a time: stop at the first that falls short
        for i, c in enumerate(sorted(row, reverse=True), start=1):
            if c < 1 - factor / (i + 1):
                break
            n = i
        assert got_f == n


def test_fast_dllm_factor_rule_commits_more_per_pass_as_the_factor_grows():
    lm = make_mock_lm(SCRIPT, confidence=(0.95, 0.5, 0.7, 0.99, 0.6))
    passes = {}
    for factor in (0.01, 1.0, 2.0, 100.0):
        gens = run("fast_dllm", lm=lm, factor=factor, threshold=0.0, block_size=16, max_new_tokens=48, steps=48)
        passes[factor] = [g.critical_path for g in gens]
        assert all(MASK not in g.token_ids for g in gens)
    assert sum(passes[0.01]) > sum(passes[1.0]) > sum(passes[2.0])  # threshold=0.0 is ignored: the factor decides
    assert max(passes[100.0]) <= 3  # every bar below 0: a whole block per pass


@pytest.mark.parametrize("confidence", [0.999, (0.95, 0.5, 0.99)])
@pytest.mark.parametrize("logits", ["shifted", "aligned"])
def test_fast_dllm_prefix_and_dual_cache_match_no_cache(confidence, logits: str):
    lm = make_mock_lm(SCRIPT, confidence=confidence, logits=logits)
    out = {
        cache: run("fast_dllm", lm=lm, cache=cache, block_size=8, max_new_tokens=48)
        for cache in ("none", "prefix", "dual")
    }
    for cache in ("prefix", "dual"):
        assert [g.token_ids for g in out[cache]] == [g.token_ids for g in out["none"]]
        assert [g.critical_path for g in out[cache]] == [g.critical_path for g in out["none"]]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_fast_dllm_runs_on_a_real_backbone(cache: str):
    for g in run("fast_dllm", lm=QWEN, cache=cache, block_size=4, max_new_tokens=12, threshold=0.5):
        assert MASK not in g.token_ids and 1 <= g.critical_path <= 6


def test_validation():
    for cls, bad in (
        (Autoregressive, {"temperature": float("nan")}),
        (Autoregressive, {"temperature": float("inf")}),
        (Autoregressive, {"top_k": -1}),
        (Autoregressive, {"batch_size": 0}),
        (PlannedDiffusion, {"length_scale": float("nan")}),
        (PlannedDiffusion, {"length_scale": float("inf")}),
        (Diffusion, {"steps": 0}),
        (Diffusion, {"order": "best"}),
        (FastDLLM, {"threshold": 1.5}),
        (FastDLLM, {"cache": "all"}),
        (FastDLLM, {"block_size": 0}),
        (FastDLLM, {"factor": 0.0}),
    ):
        with pytest.raises(ValueError):
            cls(**bad)


@pytest.mark.parametrize("name", STRATEGIES)
def test_blank_text_and_a_prompt_past_the_models_positions_are_refused_before_any_pass(name: str):
    lm = QWEN  # built for 256 positions
    with pytest.raises(ValueError, match="prompt 1 is blank"):
        run(name, lm=lm, prompts=["the cat", " \n"])
    long = " ".join(["the cat"] * 76)
    n = len(format_prompt(TOK, long))
    assert n + MAX_NEW > 256 > n
    with pytest.raises(ValueError, match=f"prompt 1 has {n} tokens and max_new_tokens is {MAX_NEW}.*256 positions"
                       f".*lower max_new_tokens to {256 - n}"):
        run(name, lm=lm, prompts=["the cat", long])
    lm.reset_counter()
    run(name, lm=lm, prompts=["the cat", long], max_new_tokens=256 - n)  # at the limit: decoded
    assert lm.forward_passes > 0


@pytest.mark.parametrize("name", STRATEGIES)
def test_an_empty_prompt_is_refused_by_name_before_any_pass(name: str):
    # an empty prompt leaves a shifted model no position to predict the first token from
    with pytest.raises(ValueError, match=f"{name} decoding needs a non-empty prompt \\(prompt 1 is empty\\)"):
        run(name, lm=(lm := make_mock_lm(SCRIPT)), prompts=[format_prompt(TOK, PROMPTS[0]), []], batch_size=1)
    assert lm.forward_passes == 0  # refused before the first prompt is decoded, not halfway through


def test_diffusion_with_aligned_logits_decodes_an_empty_prompt():
    (g,) = run("diffusion", lm=make_mock_lm(SCRIPT, logits="aligned"), prompts=[[]])
    assert g.token_ids and g.critical_path >= 1


# ----------------------------------------------------------------------------- user strategies


class MyStrategy(DecodingStrategy):
    """A user's strategy: greedy, uncached, one prompt at a time, never emits ``banned``."""

    def __init__(self, banned: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.banned = banned

    def decode_batch(
        self, lm: LanguageModel, prompts: list[list[int]], generator: torch.Generator
    ) -> list[RowOutput]:
        rows = []
        for prompt in prompts:
            seq, out = list(prompt), []
            while len(out) < self.max_new_tokens and (not out or out[-1] != lm.spec.id("end")):
                n = len(seq)
                mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
                logits = lm.forward(torch.tensor([seq]), mask, torch.arange(n)[None]).logits[0, -1].clone()
                if self.banned is not None:
                    logits[self.banned] = float("-inf")
                out.append(int(logits.argmax()))
                seq.append(out[-1])
            rows.append(RowOutput(out, [t for t in out if t != lm.spec.id("end")], len(out)))
        return rows


def test_user_subclass_usable_by_class_path_without_registration(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    first = planned_script([("cat", "the cat")])[0]
    strategy = get_strategy("tests.test_decoding_conformance.MyStrategy", banned=first, max_new_tokens=MAX_NEW)
    assert type(strategy).__name__ == "MyStrategy" and "MyStrategy" not in list_strategies()
    gens = strategy.generate(LM, PROMPTS)
    reference = run("autoregressive", use_cache=False)
    for g, ref in zip(gens, reference, strict=True):
        assert first not in g.token_ids and g.token_ids != ref.token_ids
        assert g.critical_path == len(g.token_ids) <= MAX_NEW
    plain = MyStrategy(max_new_tokens=MAX_NEW).generate(LM, PROMPTS)
    assert [g.token_ids for g in plain] == [g.token_ids for g in reference]
    with pytest.raises(TypeError):
        get_strategy("pdlightning.decoding.LanguageModel")
    with pytest.raises(ValueError, match="cannot import 'mypackage.strategies'.*PYTHONPATH"):
        get_strategy("mypackage.strategies.MyStrategy")
    with pytest.raises(ValueError, match="module 'pdlightning.decoding' has no 'Nope'"):
        get_strategy("pdlightning.decoding.Nope")


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_system_prompt_is_formatted_as_training_formats_a_rows_system(name: str):
    from pdlightning.data.preprocess import LayoutOptions, preprocess_row

    strategy = get_strategy(name, max_new_tokens=MAX_NEW, batch_size=3)
    system = "You answer in short sentences."
    with_system = strategy.generate(LM, PROMPTS, torch.Generator().manual_seed(0), system=system)
    as_ids = [format_prompt(LM.tokenizer, p, system) for p in PROMPTS]
    assert as_ids != [format_prompt(LM.tokenizer, p) for p in PROMPTS]
    by_ids = strategy.generate(LM, as_ids, torch.Generator().manual_seed(0))
    assert [g.token_ids for g in with_system] == [g.token_ids for g in by_ids]
    # the ids a training row with this system prompt starts with
    row = {"prompt": PROMPTS[0], "response": "Yes.", "system": system}
    assert preprocess_row(row, LM.tokenizer, LM.spec, LayoutOptions())["prompt_ids"] == as_ids[0]
    # one system prompt per prompt (None: none), as rows of a prompt file carry their own
    systems = [system if i % 2 else None for i in range(len(PROMPTS))]
    per_row = strategy.generate(LM, PROMPTS, torch.Generator().manual_seed(0), system=systems)
    mixed = [format_prompt(LM.tokenizer, p, s) for p, s in zip(PROMPTS, systems, strict=True)]
    assert [g.token_ids for g in per_row] == [g.token_ids for g in strategy.generate(LM, mixed, torch.Generator().manual_seed(0))]
    with pytest.raises(PromptError, match="2 system prompts for"):
        strategy.generate(LM, PROMPTS, system=[system, None])
