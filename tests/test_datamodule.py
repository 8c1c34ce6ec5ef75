"""The data pipeline: stochastic padding, collation, validation of rows,
stages and sharding, on a local JSONL source in the authors' prompt/completion form.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.data.collate import add_stochastic_pads, collate, example_rng
from pdlightning.data.datamodule import LengthGroupedSampler, PlannedDataModule, Stage
from pdlightning.masks import Role, batch_attention_mask
from pdlightning.tags import CONTROL_NAMES, TagSpec
from pdlightning.tokenizer import build_tokenizer, save_spec

SPEC = TagSpec().with_ids({n: i for i, n in enumerate(CONTROL_NAMES)})
PO, PC, SO, SC, SY, END, PAD, MASK = range(8)

GOOD = [
    {"prompt": f"Tell me about item {i}.", "completion":
        f"<topic>name 1</topic><topic>colour 1</topic><async>Item {i} is a lamp.\n</async>"
        f"<async>It is red.</async><sync/><topic>summary 1</topic><async>A red lamp.</async><eos/>"}
    for i in range(24)
]
PASTA = [{"prompt": "Define x.", "completion": '<async topic="definition" tokens="12">X is a letter.</async>'}]
BAD = [
    {"prompt": "Unbalanced.", "completion": "<topic>a 1</topic><async>never closed"},
    {"prompt": "Empty span.", "completion": "<topic>a 1</topic><async></async><eos/>"},
    {"prompt": 42, "completion": "<topic>a 1</topic><async>x</async><eos/>"},
    {"prompt": "Too long.", "completion": "<topic>a 9</topic><async>" + "word " * 400 + "</async><eos/>"},
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    path = root / "train.jsonl"
    with path.open("w") as f:
        for row in GOOD + PASTA + BAD:
            f.write(json.dumps(row) + "\n")
    texts = [r["completion"] for r in GOOD + PASTA] + [str(r["prompt"]) for r in GOOD]
    tok, spec = build_tokenizer(texts, TagSpec(), vocab_size=340, min_frequency=1)
    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    save_spec(spec, tok_dir)
    return path, tok_dir


def make_dm(source: tuple[Path, Path], tmp_path: Path, **kw) -> PlannedDataModule:
    path, tok_dir = source
    args = {"source": str(path), "tokenizer_path": str(tok_dir), "cache_dir": str(tmp_path), "batch_size": 4,
            "max_length": 200, "validation_fraction": 0.2, **kw}
    dm = PlannedDataModule(**args)
    dm.setup()
    return dm


@settings(max_examples=100, deadline=None)
@given(n_spans=st.integers(1, 6), max_pads=st.integers(0, 10), seed=st.integers(0, 10**6),
       epoch=st.integers(0, 50))
def test_stochastic_padding_bounds_place_and_content(n_spans: int, max_pads: int, seed: int, epoch: int):
    ids = [9, PO, 10, PC] * n_spans + [x for k in range(n_spans) for x in (SO, 11 + k, 12, SC)] + [END]
    out = add_stochastic_pads(ids, SPEC, example_rng(seed, epoch, 3), max_pads)
    assert [t for t in out if t != PAD] == ids  # content unchanged, in order
    runs = []
    for pos, tok in enumerate(out):
        if tok == PAD:
            assert out[pos + 1] in (PAD, SC)  # pads only right before a closing tag
        if tok == SC:
            k = pos
            while k > 0 and out[k - 1] == PAD:
                k -= 1
            runs.append(pos - k)
    assert len(runs) == n_spans and all(0 <= r <= max_pads for r in runs)
    again = add_stochastic_pads(ids, SPEC, example_rng(seed, epoch, 3), max_pads)
    assert again == out  # reproducible for one seed, epoch and example


def test_padding_differs_across_epochs():
    ids = [x for k in range(6) for x in (SO, 11, 12, SC)]
    draws = {tuple(add_stochastic_pads(ids, SPEC, example_rng(0, e, 0), 10)) for e in range(10)}
    assert len(draws) > 5


def test_collated_masks_equal_the_per_example_masks():
    rng = random.Random(0)
    prompts, responses = [], []
    for _ in range(5):
        prompts.append([rng.randint(8, 30) for _ in range(rng.randint(1, 6))])
        n = rng.randint(1, 3)
        resp = [PO, 20, PC] * n + [x for _ in range(n) for x in (SO, 21, 22, PAD, SC)] + [END]
        responses.append(resp)
    for dense in (False, True):
        batch = collate(prompts, responses, SPEC, "planned", dense=dense)
        assert batch.attention_mask.dtype == torch.bool
        assert batch.attention_mask.shape == (5, 1, batch.input_ids.shape[1], batch.input_ids.shape[1])
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            n = len(p) + len(r)
            alone = batch_attention_mask(torch.tensor([p + r]), SPEC, dense=dense)[0, 0]
            assert torch.equal(batch.attention_mask[b, 0, :n, :n], alone)
            assert not batch.attention_mask[b, 0, :n, n:].any()  # batch padding never attended
            assert (batch.roles[b, n:] == Role.PAD).all()


def test_bad_rows_are_counted_and_dropped_with_their_reason(source, tmp_path: Path):
    dm = make_dm(source, tmp_path, validation_fraction=0.01)
    reasons = dm.discarded["train"] + dm.discarded["validation"]
    assert reasons == {"unbalanced_span": 1, "empty_span": 1, "bad_row": 1, "too_long": 1}
    kept = len(dm.splits["train"]) + len(dm.splits["validation"])
    assert kept == len(GOOD) + len(PASTA)


def test_overflow_cut_keeps_whole_rounds(source, tmp_path: Path):
    dm = make_dm(source, tmp_path, max_length=48, max_pads=0, overflow="cut", validation_fraction=0.01)
    spec = dm.spec
    rows = list(dm.splits["train"]["planned_ids"]) + list(dm.splits["validation"]["planned_ids"])
    cut = [ids for ids in rows if ids[-1] != spec.id("end")]
    assert cut, "max_length 48 should cut the two-round rows after their first round"
    for ids in cut:
        assert ids.count(spec.id("span_open")) == ids.count(spec.id("span_close")) == 2
        assert spec.id("sync") not in ids  # the round after the sync is gone, and the sync with it


def test_stages_switch_objective_and_sampler_shards_global_batches(source, tmp_path: Path):
    dm = make_dm(source, tmp_path, stages=[Stage("autoregressive", 1), Stage("planned", None)])
    assert dm.stage_at(0).mode == "autoregressive" and dm.stage_at(5).mode == "planned"
    ar = next(iter(dm._loader("train", "autoregressive", 0, True)))
    pd = next(iter(dm._loader("train", "planned", 0, True)))
    assert ar.mode == "autoregressive" and not (ar.input_ids == dm.spec.id("span_open")).any()
    assert pd.mode == "planned" and (pd.roles == Role.CONTENT).any()
    warm = next(iter(dm._loader("train", "planned_ar", 0, True)))  # the planned rows, pads and order
    assert warm.mode == "planned_ar" and torch.equal(warm.input_ids, pd.input_ids)
    lengths = list(range(40))
    one = list(LengthGroupedSampler(lengths, 8, 0, 0))
    r0 = list(LengthGroupedSampler(lengths, 4, 0, 0, rank=0, world_size=2))
    r1 = list(LengthGroupedSampler(lengths, 4, 0, 0, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one


@given(n=st.integers(1, 60), batch_size=st.integers(1, 8), world=st.integers(2, 4), shuffle=st.booleans())
@settings(max_examples=200, deadline=None)
def test_ranks_take_equal_batch_counts_and_evaluation_scores_every_row_once(n, batch_size, world, shuffle):
    ranks = [list(LengthGroupedSampler([i % 7 for i in range(n)], batch_size, 0, 0, shuffle, r, world))
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # a rank with fewer batches would hang the others' collectives
    assert all(0 < len(b) <= batch_size for r in ranks for b in r)
    seen = [i for r in ranks for b in r for i in b]
    if shuffle:  # training: full global batches only, no row twice
        assert len(seen) == len(set(seen)) == (n // (batch_size * world)) * batch_size * world
    else:  # evaluation: every row, once; a repeat only where a short batch has fewer rows than ranks
        assert set(seen) == set(range(n))
        assert len(seen) - n == sum(max(0, world - len(b)) for b in LengthGroupedSampler(
            [i % 7 for i in range(n)], batch_size * world, 0, 0, False)._global_batches())


def test_tokenising_in_several_processes_gives_the_same_rows(source, tmp_path: Path):
    one = make_dm(source, tmp_path / "one")
    two = make_dm(source, tmp_path / "two", num_proc=2)
    for name, split in one.splits.items():
        assert split.to_list() == two.splits[name].to_list(), name
    assert one.discarded == two.discarded
    with pytest.raises(ValueError, match="data.num_proc must be >= 1, got 0"):
        make_dm(source, tmp_path, num_proc=0)


def test_every_knob_is_validated(source, tmp_path: Path):
    with pytest.raises(ValueError, match="stage mode"):
        PlannedDataModule(source=str(source[0]), tokenizer_path=str(source[1]), stages=[Stage("magic", 1)])
    with pytest.raises(ValueError, match="overflow"):
        PlannedDataModule(source=str(source[0]), tokenizer_path=str(source[1]), overflow="wrap")
    with pytest.raises(ValueError, match="tokenizer"):
        PlannedDataModule(source=str(source[0]))


def test_slimorca_conversations_and_parquet_sources_load(source, tmp_path: Path):
    import datasets

    rows = [{"conversations": [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": f"Tell me about item {i}."},
        {"from": "gpt", "value": GOOD[i]["completion"]},
    ]} for i in range(10)]
    path = tmp_path / "slim.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    dm = PlannedDataModule(source=str(path), tokenizer_path=str(source[1]), cache_dir=str(tmp_path / "c"),
                           validation_fraction=0.2, batch_size=2)
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["validation"]) == 10
    first = dm.splits["train"][0]
    prompt = dm.tokenizer.decode(first["prompt_ids"])
    assert "You are helpful." in prompt and "Tell me about item" in prompt  # system turn kept
    assert first["response"].startswith("Item ")


def test_annotated_conversations_rows_train_on_their_tags(source, tmp_path: Path):
    """A SlimOrca row tagged by ``pdlightning annotate`` keeps its ``tagged`` field (not re-tagged)."""
    from pdlightning.data.sources import load_rows
    from pdlightning.tags import strip

    rows = [{"conversations": [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": f"Tell me about item {i}."},
        {"from": "gpt", "value": strip(GOOD[i]["completion"])},
    ], "tagged": GOOD[i]["completion"]} for i in range(10)]
    path = tmp_path / "slim.tagged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(str(path), tmp_path / "c", validation_fraction=0.2)
    got = [r for split in ("train", "validation") for r in loaded[split]]
    assert len(got) == 10
    for r in got:
        i = int(r["prompt"].split()[-1].rstrip("."))
        assert r["tagged"] == GOOD[i]["completion"] and r["response"] == strip(GOOD[i]["completion"])
        assert r["system"] == "You are helpful."
    dm = PlannedDataModule(source=str(path), tokenizer_path=str(source[1]), cache_dir=str(tmp_path / "d"),
                           validation_fraction=0.2, batch_size=2)
    dm.setup()
    planned = list(dm.splits["train"]["planned_ids"]) + list(dm.splits["validation"]["planned_ids"])
    assert len(planned) == 10  # the annotator's sync stays: the heuristic would find none here
    assert all(ids.count(dm.spec.id("sync")) == 1 for ids in planned)


def test_a_file_mixing_answer_fields_reads_each_row_by_the_field_it_sets(tmp_path: Path):
    """``datasets`` gives every row every column; a null ``completion`` must not hide a ``response``."""
    from pdlightning.data.sources import load_rows

    rows = [{"prompt": f"Q{i}", **({"completion": f"A{i}"} if i % 2 else {"response": f"A{i}"})} for i in range(10)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(str(path), tmp_path / "c", validation_fraction=0.2)
    got = {r["prompt"]: r["response"] for split in ("train", "validation") for r in loaded[split]}
    assert got == {f"Q{i}": f"A{i}" for i in range(10)}
    # a folder is its data files, not the side file of rejected rows annotate leaves beside them
    (tmp_path / "mixed.jsonl.rejected.jsonl").write_text(json.dumps({"line": 3, "reason": "bad_row"}) + "\n")
    loaded = load_rows(str(tmp_path), tmp_path / "c2", validation_fraction=0.2)
    assert sum(len(loaded[split]) for split in ("train", "validation")) == 10


def test_a_stage_ar_fraction_lays_that_share_of_rows_out_planned_ar_redrawn_each_epoch(source, tmp_path: Path):
    dm = make_dm(source, tmp_path, stages=[Stage("planned", None, ar_fraction=0.3)])
    picks = {epoch: [dm.dataset("train", "planned", epoch, 0.3)[i].causal for i in range(len(dm.splits["train"]))]
             for epoch in (0, 1)}
    n = len(picks[0])
    assert 0.15 < sum(picks[0]) / n < 0.45 and picks[0] != picks[1]  # about 30%, redrawn per epoch
    assert picks[0] == [dm.dataset("train", "planned", 0, 0.3)[i].causal for i in range(n)]  # reproducible
    assert not any(dm.dataset("train", "planned", 0)[i].causal for i in range(n))
    batches = list(dm.train_dataloader())  # the stage's loader mixes them in, batch by batch
    mixed_in = sum(int(b.causal_rows.sum()) for b in batches)  # every pick but a dropped short batch's
    assert sum(picks[0]) - (n - sum(len(b) for b in batches)) <= mixed_in <= sum(picks[0])
    assert all(b.mode == "planned" for b in batches) and any(b.causal_rows.any() for b in batches)
    assert not all(b.causal_rows.all() for b in batches)
    for bad, match in ((Stage("planned", None, ar_fraction=1.5), r"\[0, 1\]"),
                       (Stage("autoregressive", 1, ar_fraction=0.5), "mode is 'autoregressive'")):
        with pytest.raises(ValueError, match=match):
            make_dm(source, tmp_path, stages=[bad])


@pytest.mark.parametrize("mode", ["planned", "autoregressive"])
def test_examples_are_read_row_by_row_with_the_lengths_of_their_columns(mode: str):
    """After a filter (an indices mapping over the Arrow table), items and lengths still match the rows."""
    import datasets

    from pdlightning.data.datamodule import ExampleDataset

    rng = random.Random(0)
    rows = [{"prompt_ids": [9] * rng.randint(1, 9), "planned_ids": [10] * rng.randint(1, 9),
             "plain_ids": [11] * rng.randint(1, 9), "keep": i % 3 != 0} for i in range(30)]
    ds = datasets.Dataset.from_list(rows).filter(lambda r: r["keep"])
    kept = [r for r in rows if r["keep"]]
    column = "planned_ids" if mode == "planned" else "plain_ids"
    examples = ExampleDataset(ds, SPEC, mode, max_pads=0, seed=0)
    assert len(examples) == len(kept)
    assert examples.lengths() == [len(r["prompt_ids"]) + len(r[column]) for r in kept]
    assert [examples[i] for i in range(len(kept))] == [(r["prompt_ids"], r[column], False) for r in kept]
