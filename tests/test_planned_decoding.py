"""Planned diffusion decoding: scripted plans, repairs, caching, batching, dense masks.

Two backbones: :class:`Scripted` alone (plan tokens from a script, span content
a function of exactly the tokens the mask lets each position see) and
:class:`Scripted` around a tiny random Qwen2 (plan still scripted, span content
from the real model and its real KV cache).
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config

from pdlightning.decoding import LanguageModel, get_strategy
from pdlightning.decoding.dense_planned import DensePlannedDiffusion
from pdlightning.decoding.planned import _FORBIDDEN_IN_SPANS, PlannedDiffusion, parse_plan
from pdlightning.decoding.planned_ar import PlannedAR
from pdlightning.layout import entry_ids
from pdlightning.masks import Role, batch_attention_mask, extension_mask, roles, structure
from pdlightning.model.backbone import TINY_QWEN2, build_backbone
from pdlightning.tags import PlanEntry, TagSpec, parse_ids
from pdlightning.tokenizer import build_tokenizer, format_prompt

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "name age city summary 1 2 3"] * 10
TOK, SPEC = build_tokenizer(TEXTS, TagSpec(length_unit=2), vocab_size=300)
PO, PC, SO, SC, SY, END, PAD, MASK = (
    SPEC.id(n)
    for n in ("plan_open", "plan_close", "span_open", "span_close", "sync", "end", "pad", "mask")
)
ASSISTANT = TOK.convert_tokens_to_ids("<|assistant|>")
WORDS = [
    t
    for t in TOK.encode("cat dog mat park sat ran", add_special_tokens=False)
    if TOK.decode([t]).strip()
]
PROMPTS = ["the cat", "a dog ran in the park", "the cat sat on"]


def entry(topic: str, n: int) -> list[int]:
    return entry_ids(TOK, SPEC, PlanEntry(topic, n))


TWO_ROUNDS = [entry("name", 2) + entry("age", 1) + [SY], entry("summary", 3) + [END]]


def plan_passes(rounds: list[list[int]], drafts: bool = True, lengths: bool = True) -> int:
    """Brute-force reference: planning passes that write ``rounds`` (terminators included).

    A pass feeds the last token and the grammar's guesses of the next: at a round's
    start or after ``</topic>``, ``<topic>``; after a length (an open entry whose
    text ends in a digit), ``</topic> <topic>``; with ``lengths``, after topic words
    (an open entry whose text does not), the digit and space tokens that end the
    round's last closed entry, then ``</topic> <topic>``. It writes one token, plus one more for
    each leading guess the script agrees with.
    """
    passes = 0
    for tokens in rounds:
        i = 0
        while i < len(tokens):
            done, guess = tokens[:i], []
            opened = max((j for j, t in enumerate(done) if t == PO), default=-1)
            closes = [j for j, t in enumerate(done[:opened]) if t == PC]
            if not done or done[-1] == PC:
                guess = [PO]
            elif opened < 0 or PC in done[opened:] or opened == len(done) - 1:
                guess = []
            elif TOK.decode(done[opened + 1 :]).strip()[-1:].isdigit():
                guess = [PC, PO]
            elif lengths and closes:
                guess = [*length_tokens(done[: closes[-1]]), PC, PO] if length_tokens(done[: closes[-1]]) else []
            k = 0
            while drafts and k < len(guess) and i + k < len(tokens) and tokens[i + k] == guess[k]:
                k += 1
            i, passes = i + 1 + k, passes + 1
    return passes


def length_tokens(plan: list[int]) -> list[int]:
    """The tokens that end ``plan``'s last entry body and each decode to digits or blank
    (none unless one is a digit): how that entry's length is written."""
    k = len(plan)
    while k and plan[k - 1] != PO and (TOK.decode([plan[k - 1]]).strip() or "0").isdigit():
        k -= 1
    tail = plan[k:]
    return tail if any(TOK.decode([t]).strip() for t in tail) else []


class Scripted(torch.nn.Module):
    """Backbone with the HF call signature whose plan tokens follow a script.

    A position outside every span predicts ``script[r][j]``: ``r`` = syncs it
    sees, ``j`` = positions it sees after the last sync (or the prompt's
    ``<|assistant|>``); past the script, ``filler`` (None: no override). Span
    positions predict from ``inner`` or, without it, a word hashed from exactly
    the (id, position) pairs they see, with a confidence varying by position.

    Args:
        scripts: One script per prompt length (key) or one for all.
        inner: Real backbone supplying logits and KV cache.
        filler: Token predicted past the end of the script.
    """

    def __init__(
        self, scripts: dict[int, list[list[int]]] | list[list[int]], inner=None, filler=None
    ):
        super().__init__()
        self.scripts = scripts
        self.inner = inner
        self.filler = filler
        self.config = (
            inner.config
            if inner is not None
            else Qwen2Config(
                num_hidden_layers=1,
                hidden_size=8,
                num_attention_heads=1,
                num_key_value_heads=1,
                vocab_size=len(TOK),
            )
        )
        self.weight = torch.nn.Parameter(torch.zeros(1))
        # the inner backbone's name for the KV cache (transformers 5.24: ``cache``; before: ``past_key_values``)
        params = inspect.signature(inner.forward).parameters if inner is not None else {}
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.mirror: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids of every column, mask)
        self.positions: list[torch.Tensor] = []  # position of every column, per call

    def forward(
        self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False
    ):
        cache = past_key_values
        if cache is None:
            kid, kpos = input_ids, position_ids
        elif self.inner is None:
            feats = torch.stack([input_ids, position_ids], -1).float()[:, None]
            keys, _ = cache.update(feats, feats, 0)
            kid, kpos = keys[:, 0, :, 0].long(), keys[:, 0, :, 1].long()
        else:
            c = cache.get_seq_length()
            old_id, old_pos = self.mirror.get(id(cache), (input_ids[:, :0], position_ids[:, :0]))
            kid, kpos = (
                torch.cat([old_id[:, :c], input_ids], 1),
                torch.cat([old_pos[:, :c], position_ids], 1),
            )
            self.mirror[id(cache)] = (kid, kpos)
        self.calls.append((kid.clone(), attention_mask.clone()))
        self.positions.append(kpos.clone())
        if self.inner is not None:
            logits = (
                self.inner(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    **{self.cache_arg: cache},
                    use_cache=use_cache,
                ).logits.float()
                * 10
            )  # sharpen the near-uniform random model: no near-ties

        else:
            logits = self._content(input_ids, attention_mask[:, 0], position_ids, kid, kpos)
        self._script(logits, attention_mask[:, 0], position_ids, kid, kpos)
        return SimpleNamespace(logits=logits, past_key_values=cache)

    def _content(self, ids, vis, qpos, kid, kpos):
        b, k = ids.shape
        h = (vis * (kid * (kpos + 1))[:, None, :]).sum(-1) + 7 * qpos
        word = torch.tensor(WORDS)[h % len(WORDS)]
        logits = torch.zeros(b, k, len(TOK))
        logits.scatter_(-1, word[..., None], (2.0 + 4.0 * (qpos % 3)).float()[..., None])
        return logits

    def _script(self, logits, vis, qpos, kid, kpos):
        kid_, kpos_, q = kid[:, None, :], kpos[:, None, :], qpos[..., None]
        inside = (vis & (kid_ == SO) & (kpos_ <= q)).sum(-1) > (
            vis & (kid_ == SC) & (kpos_ < q)
        ).sum(-1)
        anchor = torch.where(vis & ((kid_ == SY) | (kid_ == ASSISTANT)), kpos_, -1).amax(-1)
        plen = torch.where(vis & (kid_ == ASSISTANT), kpos_, -1).amax(-1) + 1
        rnd = (vis & (kid_ == SY)).sum(-1)
        j = (vis & (kpos_ > anchor[..., None])).sum(-1)
        for b, i in (~inside & (anchor >= 0)).nonzero().tolist():
            script = (
                self.scripts if isinstance(self.scripts, list) else self.scripts[int(plen[b, i])]
            )
            r, jj = int(rnd[b, i]), int(j[b, i])
            target = script[r][jj] if r < len(script) and jj < len(script[r]) else self.filler
            if target is not None:
                logits[b, i] = -10.0
                logits[b, i, target] = 10.0


def tiny_qwen():
    cfg = {
        **TINY_QWEN2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    return build_backbone(config=cfg, vocab_size=len(TOK), seed=0).eval()


INNER = tiny_qwen()


def run(
    scripts,
    prompts=("the cat",),
    inner=None,
    filler=None,
    logits="shifted",
    cls=PlannedDiffusion,
    seed=0,
    **kwargs,
):
    model = Scripted(scripts, inner=inner, filler=filler)
    lm = LanguageModel(model, TOK, SPEC, logits=logits)
    gens = cls(**{"max_new_tokens": 200, **kwargs}).generate(
        lm, list(prompts), generator=torch.Generator().manual_seed(seed)
    )
    return gens, model


def span_lengths(ids: list[int]) -> list[int]:
    """Tokens after the topic head of each span (pads included)."""
    out, inside, n = [], False, 0
    for t in ids:
        if t == SO:
            inside, n = True, 0
        elif t == PC and inside:
            n = 0  # head closed
        elif t == SC:
            out.append(n)
            inside = False
        elif inside:
            n += 1
    return out


def check_well_formed(g, max_new_tokens: int = 200) -> None:
    assert MASK not in g.token_ids
    assert len(g.token_ids) <= max_new_tokens
    assert g.token_ids[-1] in (END, SY) or any("length cap" in r for r in g.repairs)
    # the spans carry the answer, in order (each span decodes without its leading space)
    assert "".join(g.text.split()) == "".join("".join(g.spans).split())


# ----------------------------------------------------------------------------- scripted plans


@pytest.mark.parametrize("topic_heads", [True, False])
def test_scripted_two_round_plan_fills_every_span(topic_heads: bool):
    (g,), _ = run(TWO_ROUNDS, topic_heads=topic_heads)
    check_well_formed(g)
    assert g.repairs == []
    assert [(e.topic, e.length) for e in g.plan] == [("name", 2), ("age", 1), ("summary", 3)]
    assert span_lengths(g.token_ids) == [4, 2, 6]
    parsed = parse_ids(g.token_ids, SPEC, TOK.decode, require_end=True)
    assert parsed.topic_heads == topic_heads
    assert [len(r.spans) for r in parsed.rounds] == [2, 1] and parsed.rounds[0].sync
    assert [s.strip() for s in parsed.span_texts()] == [s.strip() for s in g.spans]
    # plan, spans, terminator: the plan stream skips the spans
    r1 = len(TWO_ROUNDS[0]) - 1
    assert g.token_ids[:r1] == TWO_ROUNDS[0][:-1] and g.token_ids[r1] == SO
    # critical path: the planning passes + ceil(r * longest span) per round
    assert g.critical_path == plan_passes(TWO_ROUNDS) + 4 + 6
    assert plan_passes(TWO_ROUNDS) == len(TWO_ROUNDS[0]) + len(TWO_ROUNDS[1]) - 6  # the drafts write 6 tags
    assert g.counters.forward_passes == g.critical_path  # one row: every pass is on its path


def test_step_ratio_reduces_steps_and_threshold_holds_back_unsure_positions():
    plan_tokens = plan_passes(TWO_ROUNDS)
    (base,), _ = run(TWO_ROUNDS)
    (half,), _ = run(TWO_ROUNDS, step_ratio=0.5)
    (held,), _ = run(TWO_ROUNDS, step_ratio=0.5, threshold=1.0)  # nothing is that sure: top-1 per span only
    (lax,), _ = run(TWO_ROUNDS, step_ratio=0.5, threshold=1e-9)  # everything is: the quota alone
    for g in (half, held, lax):
        check_well_formed(g)
        assert span_lengths(g.token_ids) == [4, 2, 6]
    assert half.critical_path == plan_tokens + 2 + 3
    assert lax.critical_path == half.critical_path
    assert half.critical_path < held.critical_path <= base.critical_path


def scripted_content_passes(g, prompt_len: int, step_ratio: float, parallel_threshold: float) -> int:
    """Brute-force reference: denoising passes of each round for :class:`Scripted` content.

    A scripted span position is sure with probability ``p(L)``, ``L = 2 + 4 * (q % 3)``
    at its scoring position ``q`` (one position back: ``shifted``), whatever it sees.
    Each pass, every span commits its ``ceil(masks left / steps left)`` most sure
    positions and every position at least ``parallel_threshold`` sure.
    """
    def p(q: int) -> float:  # the word's logit against zeros, the tokens banned in spans excluded
        e = math.exp(2.0 + 4.0 * (q % 3))
        return e / (e + len(TOK) - 1 - len(_FORBIDDEN_IN_SPANS))

    rounds: list[list[list[float]]] = [[]]
    inside = head = False
    for j, t in enumerate(g.token_ids):
        if t == SO:
            inside, head = True, True
            rounds[-1].append([])
        elif t == PC and inside:
            head = False
        elif t == SC:
            inside = False
        elif t == SY:
            rounds.append([])
        elif inside and not head:
            rounds[-1][-1].append(p(prompt_len + j - 1))
    passes = 0
    for spans in rounds:
        if not spans:
            continue
        steps, taken = max(1, math.ceil(step_ratio * max(len(s) for s in spans))), 0
        left_in = [sorted(s, reverse=True) for s in spans]
        while any(left_in):
            left = max(steps - taken, 1)
            for k, rem in enumerate(left_in):
                quota = -(-len(rem) // left)
                sure = sum(c >= parallel_threshold for c in rem)
                left_in[k] = rem[max(quota, sure):]
            taken += 1
            passes += 1
    return passes


def test_parallel_threshold_commits_sure_positions_early():
    plan_tokens = plan_passes(TWO_ROUNDS)
    (base,), _ = run(TWO_ROUNDS)
    (none_sure,), _ = run(TWO_ROUNDS, parallel_threshold=1.0)  # the scripted content is at most 0.99 sure
    (some_sure,), _ = run(TWO_ROUNDS, parallel_threshold=0.5)
    (all_sure,), _ = run(TWO_ROUNDS, parallel_threshold=1e-9)
    for g in (none_sure, some_sure, all_sure):
        check_well_formed(g)
        assert span_lengths(g.token_ids) == [4, 2, 6]
    assert none_sure.token_ids == base.token_ids and none_sure.critical_path == base.critical_path
    assert all_sure.critical_path == plan_tokens + 2  # one pass per round
    assert all_sure.critical_path < some_sure.critical_path < base.critical_path


@given(
    parallel_threshold=st.floats(1e-6, 1.0),
    step_ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    prompt=st.sampled_from(PROMPTS),
)
@settings(max_examples=25, deadline=None)
def test_parallel_threshold_passes_match_a_brute_force_count(parallel_threshold, step_ratio, prompt):
    plan_tokens = plan_passes(TWO_ROUNDS)
    (g,), _ = run(TWO_ROUNDS, prompts=(prompt,), step_ratio=step_ratio, parallel_threshold=parallel_threshold)
    prompt_len = len(format_prompt(TOK, prompt))
    assert g.critical_path - plan_tokens == scripted_content_passes(g, prompt_len, step_ratio, parallel_threshold)


def test_length_scale_scales_spans():
    (g,), _ = run(TWO_ROUNDS, length_scale=1.5)
    assert span_lengths(g.token_ids) == [6, 3, 9]
    (g,), _ = run(TWO_ROUNDS, length_scale=0.1)  # rounds to 0 tokens: raised to 1
    assert span_lengths(g.token_ids) == [1, 1, 1]
    assert sum("raised to 1" in r for r in g.repairs) == 2  # 0.4 and 0.2 tokens; 0.6 rounds to 1


def test_sync_false_plans_once():
    (g,), _ = run(TWO_ROUNDS, sync=False)
    check_well_formed(g)
    assert SY not in g.token_ids and g.token_ids[-1] == END
    assert [e.topic for e in g.plan] == ["name", "age"]
    assert g.critical_path == plan_passes(TWO_ROUNDS[:1]) + 4


def test_unmasking_orders_fill_every_span():
    for order in ("entropy", "confidence", "random", "left_to_right"):
        (g,), _ = run(TWO_ROUNDS, order=order)
        check_well_formed(g)
        assert span_lengths(g.token_ids) == [4, 2, 6]


def span_contents(ids: list[int]) -> list[list[int]]:
    """The content of every span in ``ids`` (after its topic head), pads and masks included."""
    out, inside = [], False
    for t in ids:
        if t == SO:
            inside, head = True, True
            out.append([])
        elif t == SC:
            inside = False
        elif inside and head:
            head = t != PC
        elif inside:
            out[-1].append(t)
    return out


@pytest.mark.parametrize("step_ratio", [1.0, 0.5])
def test_left_to_right_order_fills_each_span_from_its_left(step_ratio: float):
    """Every pass sees each span as committed tokens followed by masks only.

    The content mock is most confident at every third position, so the
    entropy order breaks this shape; left_to_right must keep it."""

    def partial_spans(order: str) -> tuple[int, int]:
        (g,), model = run(TWO_ROUNDS, order=order, step_ratio=step_ratio)
        check_well_formed(g)
        partial = holes = 0
        for ids, _ in model.calls:
            for span in span_contents(ids[0].tolist()):
                masked = [t == MASK for t in span]
                if any(masked) and not all(masked):
                    partial += 1
                    holes += masked != sorted(masked)  # a mask left of a committed token
        return partial, holes

    partial, holes = partial_spans("left_to_right")
    assert partial > 0 and holes == 0
    partial, holes = partial_spans("entropy")
    assert partial > 0 and holes > 0


# ----------------------------------------------------------------------------- repairs

W = WORDS[0]
MALFORMED = {
    "unparseable": (
        [[PO, *TOK.encode("name", add_special_tokens=False), PC, *entry("age", 1), END]],
        {},
        "unparseable",
        [2],
    ),
    "zero_length": ([entry("a", 0) + [END]], {}, "raised to 1", [1]),
    "huge_length": ([entry("a", 99) + [END]], {"max_span_tokens": 8}, "clamped to 8", [8]),
    "no_entries": ([[END]], {}, "no spans", []),
    "runaway": ([entry("a", 1)], {"max_plan_tokens": 12}, "runaway", [2]),
    "span_token": ([entry("a", 1) + [SO]], {}, "span_open token while planning", [2]),
    "mask_token": ([entry("a", 1) + [MASK]], {}, "mask token while planning", [2]),
    "unclosed_entry": ([[PO, W, *entry("a", 1), END]], {}, "unclosed plan entry", [2]),
    "stray_text": ([[W, *entry("a", 1), END]], {}, "text outside plan entries", [2]),
    "empty_sync_round": ([entry("a", 1) + [SY], [SY]], {}, "no spans", [2]),
    "max_rounds": ([entry("a", 1) + [SY]] * 4, {"max_rounds": 2}, "max_rounds", [2, 2]),
    "max_spans": ([entry("a", 1) * 3 + [END]], {"max_spans": 2}, "kept 2", [2, 2]),
    "length_cap": (TWO_ROUNDS, {"max_new_tokens": 20}, "length cap", None),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_plans_are_repaired(name: str):
    script, kwargs, note, lengths = MALFORMED[name]
    max_new = kwargs.get("max_new_tokens", 200)
    (g,), _ = run(script, filler=W, **kwargs)
    check_well_formed(g, max_new)
    assert any(note in r for r in g.repairs), g.repairs
    if lengths is not None:
        assert span_lengths(g.token_ids) == lengths
        assert len(g.spans) == len(lengths)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(
        st.lists(
            st.sampled_from(
                [
                    PO,
                    PC,
                    SO,
                    SC,
                    SY,
                    END,
                    PAD,
                    MASK,
                    *WORDS[:3],
                    *TOK.encode("1 7 0", add_special_tokens=False),
                ]
            ),
            max_size=12,
        ),
        min_size=1,
        max_size=3,
    ),
    filler=st.sampled_from([None, W, PO, SY]),
    dense=st.booleans(),
)
def test_garbage_plans_never_crash_or_loop(script, filler, dense):
    cls = DensePlannedDiffusion if dense else PlannedDiffusion
    (g,), _ = run(
        script, filler=filler, cls=cls, max_new_tokens=60, max_plan_tokens=16, max_rounds=3
    )
    check_well_formed(g, 60)
    assert g.critical_path <= 3 * 16 + 60


def test_parse_plan_reads_entries():
    lm = LanguageModel(Scripted(TWO_ROUNDS), TOK, SPEC)
    entries, notes = parse_plan(entry("two words", 12) + entry("", 3) + [PO, W, PC], lm)
    assert [(e.topic, e.length) for e in entries] == [("two words", 12), ("", 3)]
    assert len(notes) == 1 and "unparseable" in notes[0]


# ----------------------------------------------------------------------------- caching, batching, masks


@pytest.mark.parametrize(
    "cls,logits",
    [
        (PlannedDiffusion, "shifted"),
        (DensePlannedDiffusion, "shifted"),
        (PlannedDiffusion, "aligned"),
    ],
)
def test_cached_equals_uncached_on_a_real_backbone(cls, logits):
    kw = {"inner": INNER, "cls": cls, "logits": logits, "prompts": PROMPTS[:2], "batch_size": 2}
    cached, _ = run(TWO_ROUNDS, use_cache=True, draft_plan_tags=False, **kw)  # drafts need the cache
    uncached, _ = run(TWO_ROUNDS, use_cache=False, **kw)
    for a, b in zip(cached, uncached, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids and a.critical_path == b.critical_path
        assert span_lengths(a.token_ids) == [4, 2, 6]


@pytest.mark.parametrize(("use_cache", "parallel_threshold"), [(True, None), (False, None), (True, 0.05)])
def test_batch_equals_one_by_one(use_cache: bool, parallel_threshold: float | None):
    lengths = [len(format_prompt(TOK, p)) for p in PROMPTS]
    assert len(set(lengths)) == 3
    scripts = {
        lengths[0]: TWO_ROUNDS,
        lengths[1]: [entry("a", 1) + entry("b", 4) + entry("c", 2) + [END]],
        lengths[2]: [entry("x", 3) + [SY], entry("y", 1) + [SY], entry("z", 2) + [END]],
    }
    kw = {"prompts": PROMPTS, "inner": INNER, "use_cache": use_cache, "step_ratio": 0.5,
          "parallel_threshold": parallel_threshold}
    batch, _ = run(scripts, batch_size=3, **kw)
    single, _ = run(scripts, batch_size=1, **kw)
    for a, b in zip(batch, single, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids
        assert a.critical_path == b.critical_path
    assert [len(g.spans) for g in batch] == [3, 3, 3]
    assert batch[0].counters.forward_passes < sum(g.counters.forward_passes for g in single)
    if parallel_threshold is not None:  # the random model is that sure of some positions: fewer steps
        assert sum(g.critical_path for g in single) < sum(
            g.critical_path for g in run(scripts, batch_size=1, **{**kw, "parallel_threshold": None})[0])


def test_plan_drafts_write_the_same_plan_in_fewer_passes():
    """Rows of a batch draft different tags; each keeps its own, on a real backbone and cache."""
    scripts = three_scripts()
    kw = {"prompts": PROMPTS, "inner": INNER, "step_ratio": 0.5, "batch_size": 3}
    on, _ = run(scripts, **kw)
    off, _ = run(scripts, draft_plan_tags=False, **kw)
    for a, b, prompt in zip(on, off, PROMPTS, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids and a.repairs == b.repairs == []
        script = scripts[len(format_prompt(TOK, prompt))]
        assert b.critical_path - a.critical_path == plan_passes(script, drafts=False) - plan_passes(script) > 0
    assert on[0].counters.forward_passes < off[0].counters.forward_passes


def test_length_drafts_write_the_same_plan_in_fewer_passes():
    """An entry whose length repeats the round's previous entry's costs one pass, not two;
    a length that does not repeat is a rejected draft. Same tokens on a real backbone, batch 3."""
    lengths = [len(format_prompt(TOK, p)) for p in PROMPTS]
    scripts = {
        lengths[0]: [entry("cat", 2) + entry("dog", 2) + entry("mat", 2) + [END]],
        lengths[1]: [entry("a", 1) + entry("b", 4) + entry("c", 4) + [SY], entry("d", 3) + entry("e", 3) + [END]],
        lengths[2]: TWO_ROUNDS,  # name 2, age 1: the draft after "age" is rejected
    }
    kw = {"prompts": PROMPTS, "inner": INNER, "step_ratio": 0.5, "batch_size": 3}
    on, _ = run(scripts, **kw)
    off, _ = run(scripts, draft_plan_lengths=False, **kw)
    saved = []
    for a, b, prompt in zip(on, off, PROMPTS, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids and a.repairs == b.repairs == []
        script = scripts[len(format_prompt(TOK, prompt))]
        assert b.critical_path - a.critical_path == plan_passes(script, lengths=False) - plan_passes(script)
        saved.append(b.critical_path - a.critical_path)
    # by hand: "dog" and "mat" save a pass each; "c 4" two (its length is a space token and "4")
    # and "e 3" one; "name 2, age 1" none
    assert saved == [2, 3, 0]


PLAN_CHUNKS = [
    [PO], [PC], [SY], [END], [SO], WORDS[:1], entry("cat", 1), entry("dog", 7), entry("a", 10) + [PO],
    *([t] for t in TOK.encode("1 7 0", add_special_tokens=False)),
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(st.lists(st.sampled_from(PLAN_CHUNKS), max_size=6).map(lambda c: sum(c, [])),
                    min_size=1, max_size=3),
    filler=st.sampled_from([None, PC, PO, SY]),
    dense=st.booleans(),
)
def test_plan_drafts_change_nothing_but_the_passes(script, filler, dense):
    """Any plan, entries well formed or not, caps hit or not: a draft the model does
    not draw leaves no trace (a hole it could see would shift the scripted plan)."""
    kw = {"filler": filler, "cls": DensePlannedDiffusion if dense else PlannedDiffusion,
          "max_new_tokens": 60, "max_plan_tokens": 16, "max_rounds": 3}
    (on,), _ = run(script, **kw)
    (off,), _ = run(script, draft_plan_tags=False, **kw)
    assert on.token_ids == off.token_ids and on.repairs == off.repairs
    assert on.critical_path <= off.critical_path


@pytest.mark.parametrize("cls", [PlannedDiffusion, DensePlannedDiffusion])
def test_masks_passed_to_the_backbone_are_the_hybrid_mask(cls):
    (g,), model = run(TWO_ROUNDS, cls=cls)
    final = format_prompt(TOK, "the cat") + g.token_ids
    holes = 0
    for (kid, mask), kpos in zip(model.calls, model.positions, strict=True):
        real = real_columns(kid[0], kpos[0], mask.shape[2], final)
        prefix = int(real[: kid.shape[1] - mask.shape[2]].sum())
        ref = extension_mask(kid[:, real], SPEC, prefix, dense=cls.dense)
        assert torch.equal(mask[..., real], ref) and not mask[..., ~real].any()
        holes += int((~real).sum())
    assert holes > 0  # drafted tags the script did not follow


def real_columns(kid: torch.Tensor, kpos: torch.Tensor, n_new: int, final: list[int]) -> torch.Tensor:
    """Which cache columns of one row hold a position of its sequence (the others are holes).

    A cached column is real when it holds the token that the row's ``final`` sequence
    (prompt and response) has at its position and no later column holds that
    position; a hole does not: a column fed as position 0 by a row with less to
    feed, or a drafted plan token the model did not draw (which may be the right
    token at a position the draft before it got wrong: the position is fed again).
    The columns fed by the pass are real unless fed as position 0."""
    cached = len(kpos) - n_new
    real = torch.tensor(
        [bool(kid[c] == final[kpos[c]]) and not (kpos[c + 1 :] == kpos[c]).any() for c in range(cached)]
        + (kpos[cached:] > 0).tolist()
    )
    real[0] = True
    return real


def three_scripts() -> dict[int, list[list[int]]]:
    """A script per prompt of PROMPTS (all of different lengths): 2, 1 and 3 rounds."""
    lengths = [len(format_prompt(TOK, p)) for p in PROMPTS]
    assert len(set(lengths)) == 3
    return {
        lengths[0]: TWO_ROUNDS,
        lengths[1]: [entry("a", 1) + entry("b", 4) + entry("c", 2) + [END]],
        lengths[2]: [entry("x", 3) + [SY], entry("y", 1) + [SY], entry("z", 2) + [END]],
    }


@pytest.mark.parametrize("tagged", [False, True])
@pytest.mark.parametrize("cls", [PlannedDiffusion, DensePlannedDiffusion])
def test_batched_masks_are_each_rows_hybrid_mask(cls, tagged: bool):
    """Rows of different lengths leave holes in the shared cache; every pass's mask is
    still each row's own hybrid mask, checked by brute force from the columns' positions.

    A row's holes (:func:`real_columns`) are attended by nothing; a hole fed in a
    pass sees only itself. The row's other columns, in position order, are what
    it has in the cache and feeds; their hybrid mask
    (:func:`extension_mask` of that sequence) is what each real query must get.
    (``span_cache`` keeps columns that the decoder reads as holes: not this test's.)
    ``tagged``: one prompt holds a span, which its first plan must not see (no ``<sync/>`` yet)."""
    prompts, scripts = PROMPTS, three_scripts()
    if tagged:
        prompts = [PROMPTS[0], "a {span_open} dog {span_close} ran".format(**SPEC.strings()), PROMPTS[2]]
        scripts[len(format_prompt(TOK, prompts[1]))] = scripts[len(format_prompt(TOK, PROMPTS[1]))]
    gens, model = run(scripts, prompts=prompts, batch_size=3, cls=cls, step_ratio=0.5)
    finals = [format_prompt(TOK, p) + g.token_ids for p, g in zip(prompts, gens, strict=True)]
    holes = 0
    for (kid, mask), kpos in zip(model.calls, model.positions, strict=True):
        n_cols, n_new = kid.shape[1], mask.shape[2]
        for b in range(kid.shape[0]):
            real = real_columns(kid[b], kpos[b], n_new, finals[b])
            order = torch.argsort(kpos[b][real])
            ids = kid[b][real][order]
            assert torch.equal(kpos[b][real][order], kpos[b][real].sort().values.unique())  # no position twice
            rank = torch.full((n_cols,), -1)
            rank[real.nonzero().squeeze(1)[order]] = torch.arange(len(ids))
            ref = extension_mask(ids[None], SPEC, 0, dense=cls.dense)[0, 0]
            for q in range(n_new):
                col = n_cols - n_new + q
                if real[col]:
                    want = real & ref[rank[col]][rank.clamp(min=0)]
                else:
                    want = torch.arange(n_cols) == col
                    holes += 1
                assert torch.equal(mask[b, 0, q], want), (b, q)
    assert holes > 0  # the batch did leave holes


class FeedsEverySpan(PlannedDiffusion):
    """The sparse decoder without its shortcut: every span is fed to the end of its round."""

    skip_finished_spans = False


@pytest.mark.parametrize("step_ratio,use_cache", [(1.0, True), (0.5, True), (1.0, False)])
def test_skipping_finished_spans_changes_nothing_but_the_work(step_ratio: float, use_cache: bool):
    """A span that is complete is fed no more: same tokens and steps, fewer fed positions.

    Span words hash exactly what each position sees, so feeding too little shows."""
    scripts = [entry("a", 1) + entry("b", 4) + entry("c", 2) + [SY], entry("d", 3) + entry("e", 1) + [END]]
    kw = {"prompts": PROMPTS, "batch_size": 3, "step_ratio": step_ratio, "use_cache": use_cache}
    fast, fast_model = run(scripts, **kw)
    full, full_model = run(scripts, cls=FeedsEverySpan, **kw)
    for a, b in zip(fast, full, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids and a.critical_path == b.critical_path
    assert len(fast_model.calls) == len(full_model.calls)
    fed = [[mask.shape[2] for _, mask in m.calls] for m in (fast_model, full_model)]
    assert all(a <= b for a, b in zip(*fed, strict=True)) and sum(fed[0]) < sum(fed[1])


# ----------------------------------------------------------------------------- span cache (approximate)

SPAN_CACHE_SCRIPTS = [entry("a", 1) + entry("b", 4) + entry("c", 2) + [SY], entry("d", 3) + entry("e", 1) + [END]]


@pytest.mark.parametrize("cls", [PlannedDiffusion, DensePlannedDiffusion])
@pytest.mark.parametrize("step_ratio,logits", [(1.0, "shifted"), (0.5, "shifted"), (0.5, "aligned")])
def test_span_cache_is_exact_when_keys_depend_on_their_own_token_only(cls, step_ratio: float, logits: str):
    """Held keys and values are stale only through the other positions they saw. The scripted
    backbone's keys are the (id, position) of their own token, so holding them must change
    nothing but the positions fed; span words hash exactly the columns each position sees, so a
    held column missing, seen twice, or left in the cache after its round shows."""
    kw = {"prompts": PROMPTS, "batch_size": 3, "step_ratio": step_ratio, "cls": cls, "logits": logits}
    held, held_model = run(SPAN_CACHE_SCRIPTS, span_cache=True, **kw)
    exact, exact_model = run(SPAN_CACHE_SCRIPTS, **kw)
    for a, b in zip(held, exact, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids and a.critical_path == b.critical_path
    assert len(held_model.calls) == len(exact_model.calls)
    fed = [sum(mask.shape[0] * mask.shape[2] for _, mask in m.calls) for m in (held_model, exact_model)]
    assert [held[0].counters.fed_positions, exact[0].counters.fed_positions] == fed  # one batch
    assert fed[0] < fed[1]


def test_span_cache_on_a_real_backbone_keeps_rows_apart_and_the_step_count():
    """With real (stale) keys the tokens may differ from the exact decoder's, but each row still
    decodes as it would alone, in as many steps, with every planned span filled. (In float64: the
    random backbone's near-uniform logits let float32 noise between batch shapes flip a token.)"""
    inner = tiny_qwen().double()
    kw = {"inner": inner, "prompts": PROMPTS, "step_ratio": 0.5, "span_cache": True}
    batch, _ = run(SPAN_CACHE_SCRIPTS, batch_size=3, **kw)
    single, _ = run(SPAN_CACHE_SCRIPTS, batch_size=1, **kw)
    exact, _ = run(SPAN_CACHE_SCRIPTS, inner=inner, prompts=PROMPTS, step_ratio=0.5, batch_size=3)
    for a, b, c in zip(batch, single, exact, strict=True):
        check_well_formed(a)
        assert a.token_ids == b.token_ids
        assert a.critical_path == c.critical_path
        assert span_lengths(a.token_ids) == span_lengths(c.token_ids)


def test_dense_mask_differs_only_between_spans_of_a_round():
    _, sparse = run(TWO_ROUNDS, cls=FeedsEverySpan)
    _, dense = run(TWO_ROUNDS, cls=DensePlannedDiffusion)
    assert len(sparse.calls) == len(dense.calls)
    differing = 0
    for (kid, a), (_, b) in zip(sparse.calls, dense.calls, strict=True):
        assert a.shape == b.shape
        s = structure(kid, SPEC)
        rows = slice(kid.shape[1] - a.shape[2], None)
        span_i, span_j = s.span[:, rows, None], s.span[:, None, :]
        same_round = s.syncs[:, rows, None] == s.syncs[:, None, :]
        between = (span_i >= 0) & (span_j >= 0) & (span_i != span_j) & same_round
        diff = (a != b)[:, 0]
        assert not (diff & ~between).any()
        assert not (a & ~b).any()  # dense only adds attention
        differing += int(diff.sum())
    assert differing > 0


def test_same_seed_same_output_at_temperature():
    kw = {"inner": INNER, "prompts": PROMPTS, "batch_size": 3, "temperature": 1.0, "top_p": 0.9}
    a, _ = run([entry("a", 3) + [END]], seed=3, order="random", **kw)
    b, _ = run([entry("a", 3) + [END]], seed=3, order="random", **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_registered_and_validated():
    assert isinstance(get_strategy("planned"), PlannedDiffusion)
    assert isinstance(get_strategy("dense_planned", step_ratio=0.5), DensePlannedDiffusion)
    bad_knobs = ({"step_ratio": 0}, {"step_ratio": 1.5}, {"length_scale": 0}, {"threshold": 2.0}, {"order": "best"},
                 {"parallel_threshold": 0}, {"parallel_threshold": 1.5},
                 {"max_rounds": 0}, {"span_cache": True, "use_cache": False})
    for bad in bad_knobs:
        with pytest.raises(ValueError):
            PlannedDiffusion(**bad)


def test_on_spans_streams_each_round_as_it_completes():
    seen: list[tuple[int, list[str], list[str]]] = []
    strategy = PlannedDiffusion(max_new_tokens=200)
    strategy.on_spans = lambda row, entries, spans: seen.append((row, [e.topic for e in entries], list(spans)))
    lm = LanguageModel(Scripted(TWO_ROUNDS), TOK, SPEC)
    (g,) = strategy.generate(lm, ["the cat"], generator=torch.Generator().manual_seed(0))
    assert [s[1] for s in seen] == [["name", "age"], ["summary"]]  # one call per round, in order
    assert [span for _, _, spans in seen for span in spans] == g.spans


# ----------------------------------------------------------------------------- planned_ar: spans by next-token prediction


@pytest.mark.parametrize(("real", "batch_size", "use_cache", "logits"), [
    (False, 3, True, "shifted"), (False, 1, False, "shifted"), (False, 3, True, "aligned"), (True, 3, True, "shifted")])
def test_planned_ar_writes_each_span_token_as_the_greedy_next_token_under_the_causal_span_mask(
    real: bool, batch_size: int, use_cache: bool, logits: str
):
    """Brute force: for every span token, one uncached forward of the final sequence with that
    token masked, under the ``planned_ar`` mask (``batch_attention_mask(causal_spans=True)``),
    must predict it greedily at its scoring position. Round 2's spans see round 1's through the
    ``<sync/>``, so the spans recomputed in the next round must be causal too. The scripted
    content hashes exactly what a position sees; the real backbone brings a real KV cache."""
    inner = INNER if real else None
    gens, _ = run(TWO_ROUNDS, inner=inner, cls=PlannedAR, prompts=PROMPTS, batch_size=batch_size,
                  use_cache=use_cache, logits=logits, pad_ends_span=False)
    shift = 1 if logits == "shifted" else 0
    reference = Scripted(TWO_ROUNDS, inner=inner)
    checked = 0
    for prompt, g in zip(PROMPTS, gens, strict=True):
        check_well_formed(g)
        assert span_lengths(g.token_ids) == [4, 2, 6]
        plen = len(format_prompt(TOK, prompt))
        ids = torch.tensor([format_prompt(TOK, prompt) + g.token_ids])
        content = roles(ids, SPEC, prompt_lengths=torch.tensor([plen]))[0] == Role.CONTENT
        for q in content.nonzero().squeeze(1).tolist():
            x = ids.clone()
            x[0, q] = MASK
            with torch.no_grad():
                out = reference(x, batch_attention_mask(x, SPEC, causal_spans=True), torch.arange(x.shape[1])[None])
            lg = out.logits[0, q - shift, : len(TOK)].clone()
            lg[[SPEC.id(n) for n in _FORBIDDEN_IN_SPANS]] = float("-inf")
            assert int(lg.argmax()) == int(ids[0, q])
            checked += 1
    assert checked == 3 * 12


def test_planned_ar_feeds_one_token_per_unfinished_span_and_steps_as_pd_left_to_right():
    """After a round's first denoising pass (its span tags and topic heads), each pass feeds
    exactly one position per span still being written; the passes are PD's at r = 1."""
    (g,), model = run(TWO_ROUNDS, cls=PlannedAR, pad_ends_span=False)
    (pd,), _ = run(TWO_ROUNDS, order="left_to_right")
    assert g.critical_path == pd.critical_path and span_lengths(g.token_ids) == [4, 2, 6]
    final = torch.tensor([format_prompt(TOK, "the cat") + g.token_ids])
    span = structure(final, SPEC).span[0]
    fed = []  # per denoising pass: the positions fed (every one inside a span)
    for (_, mask), kpos in zip(model.calls, model.positions, strict=True):
        new = kpos[0, kpos.shape[1] - mask.shape[2] :]
        if bool((span[new] >= 0).all()):
            fed.append(new.tolist())
    # Round 1, spans of 4 and 2 tokens: a pass feeding the span tags and topic heads scores the
    # first token of each; then a pass per token left, feeding the token before it. Round 2: one of 6.
    assert [len(f) for f in fed] == [len(fed[0]), 2, 1, 1, len(fed[4]), 1, 1, 1, 1, 1]
    assert len(fed[0]) > 2 and len(fed[4]) > 1
    assert all(len(set(span[f].tolist())) == len(f) for f in fed[1:4] + fed[5:])  # one per span


class GeneralPlannedAR(PlannedAR):
    """PlannedAR through PlannedDiffusion's general pass: the reference for its narrow span pass."""

    def _denoise_round(self, lm, st, plans, generator):
        PlannedDiffusion._denoise_round(self, lm, st, plans, generator)


class PadsEveryThird(Scripted):
    """Span content that writes a pad at every third position (and words elsewhere)."""

    def _content(self, ids, vis, qpos, kid, kpos):
        logits = super()._content(ids, vis, qpos, kid, kpos)
        logits[..., PAD] = torch.where(qpos % 3 == 1, 20.0, 0.0)
        return logits


def test_pad_ends_span_pads_the_rest_of_a_span_after_its_first_pad():
    spans_on, spans_off, steps = [], [], []
    for pad_ends_span in (True, False):
        lm = LanguageModel(PadsEveryThird(TWO_ROUNDS), TOK, SPEC)
        out = PlannedAR(max_new_tokens=200, batch_size=3, pad_ends_span=pad_ends_span).generate(
            lm, PROMPTS, generator=torch.Generator().manual_seed(0))
        (spans_on if pad_ends_span else spans_off).append([span_contents(g.token_ids) for g in out])
        steps.append(sum(g.critical_path for g in out))
        for g in out:
            check_well_formed(g)
    words_after_pad = 0
    for on_row, off_row in zip(spans_on[0], spans_off[0], strict=True):
        for on, off in zip(on_row, off_row, strict=True):
            assert len(on) == len(off)
            cut = off.index(PAD) + 1 if PAD in off else len(off)
            assert on[:cut] == off[:cut] and set(on[cut:]) <= {PAD}
            words_after_pad += any(t != PAD for t in off[cut:])
    assert words_after_pad > 0  # the test bites: without the knob, words follow a pad
    assert steps[0] < steps[1]


@pytest.mark.parametrize(("model", "temperature"), [("real", 0.0), ("scripted", 1.0), ("pads", 0.0)])
def test_planned_ar_narrow_span_passes_write_what_the_general_pass_writes(model, temperature):
    """The narrow span pass (a token per unfinished span, its mask kept from the round's first
    pass) against the general pass with the same commit rule, batch 3 over two rounds: the same
    tokens, critical paths, passes and fed positions. ``pads``: spans that end at a pad."""
    outs = []
    for cls in (PlannedAR, GeneralPlannedAR):
        inner = PadsEveryThird(TWO_ROUNDS) if model == "pads" else Scripted(
            TWO_ROUNDS, inner=INNER if model == "real" else None)
        lm = LanguageModel(inner, TOK, SPEC)
        gens = cls(max_new_tokens=200, batch_size=3, temperature=temperature).generate(
            lm, PROMPTS, generator=torch.Generator().manual_seed(0))
        for g in gens:
            check_well_formed(g)
        outs.append(([g.token_ids for g in gens], [g.critical_path for g in gens],
                     lm.forward_passes, lm.fed_positions))
    assert outs[0] == outs[1]
    if model == "pads":
        assert any(PAD in ids for ids in outs[0][0])


def test_planned_ar_is_registered_and_takes_no_diffusion_knobs():
    assert isinstance(get_strategy("planned_ar", length_scale=0.9), PlannedAR)
    with pytest.raises(TypeError):
        PlannedAR(step_ratio=0.5)
    with pytest.raises(ValueError):
        PlannedAR(length_scale=0)


@pytest.mark.parametrize("cls", [PlannedDiffusion, PlannedAR])
def test_the_default_cap_holds_a_long_planned_response(cls):
    """Plans, tags, heads and pads come on top of the answer: eight spans of 24 tokens
    with their plan take about 300 tokens, and the default cap must not cut them."""
    script = [sum((entry(w, 12) for w in ["name", "age", "city", "summary"] * 2), []) + [END]]
    lm = LanguageModel(Scripted(script), TOK, SPEC)
    (g,) = cls().generate(lm, ["the cat"], generator=torch.Generator().manual_seed(0))
    assert len(g.token_ids) > 256 and g.repairs == []
    assert span_lengths(g.token_ids) == [24] * 8
