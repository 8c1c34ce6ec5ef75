"""Tests of the bundled synthetic instruction set (``pdlightning.data.synthetic``)."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.data import synthetic as syn

TOPIC = re.compile(r"\w+( \w+){0,2}")
FIELDS = {"id", "split", "family", "prompt", "response", "parts", "answer_keys"}


@pytest.fixture(scope="module")
def default_dataset() -> dict[str, list[dict]]:
    return syn.generate_dataset()


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return syn.generate_split("train", 2000, seed=1)


def _words(example: dict) -> set[str]:
    texts = [example["prompt"], example["response"], *(p["topic"] for p in example["parts"])]
    return {w for t in texts for w in re.findall(r"\w+", t) if not w.isdigit()}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def test_count_tokens_examples() -> None:
    assert syn.count_tokens("") == 0
    assert syn.count_tokens("Ann is 31 years old.") == 7
    assert syn.count_tokens("Day one: go to Oslo, 2024!") == 12


@given(st.text())
def test_count_tokens_matches_word_punct_regex_with_split_digits(text: str) -> None:
    expected = sum(len(re.findall(r"\d|\D+", m)) for m in re.findall(r"\w+|[^\w\s]", text))
    assert syn.count_tokens(text) == expected


def test_fact_accuracy() -> None:
    keys = ["Ann Lee", "31", "Paris"]
    response = "The full name is Ann Lee.\nAnn is 31 years old.\nAnn lives in Paris."
    assert syn.fact_accuracy(response, keys) == 1.0
    assert syn.fact_accuracy(response.replace("Paris", "Rome"), keys) == pytest.approx(2 / 3)
    assert syn.fact_accuracy("nothing", keys) == 0.0
    assert syn.fact_accuracy("Ann\n  Lee  is 31", ["Ann Lee", "is  31"]) == 1.0
    assert syn.fact_accuracy("anything", []) == 1.0


def test_fact_accuracy_on_generated_examples(sample: list[dict]) -> None:
    for example in sample[:300]:
        keys = example["answer_keys"]
        assert syn.fact_accuracy(example["response"], keys) == 1.0
        altered = example["response"].replace(keys[-1], "@")
        assert syn.fact_accuracy(altered, keys) < 1.0


# ---------------------------------------------------------------------------
# Determinism and splits
# ---------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32))
def test_same_seed_same_output(seed: int) -> None:
    assert syn.generate_split("train", 30, seed) == syn.generate_split("train", 30, seed)
    assert syn.generate_split("train", 30, seed) != syn.generate_split("train", 30, seed + 1)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        syn.write_jsonl(syn.generate_split("test", 50, seed=7), tmp_path / f"{name}.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_prefix_stability() -> None:
    assert syn.generate_split("validation", 20, 3) == syn.generate_split("validation", 40, 3)[:20]


def test_unknown_split_and_negative_size() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        syn.generate_split("dev", 5)
    with pytest.raises(ValueError, match="n must be"):
        syn.generate_split("train", -1)
    assert syn.generate_split("train", 0) == []


def test_default_splits_are_disjoint(default_dataset: dict[str, list[dict]]) -> None:
    assert {k: len(v) for k, v in default_dataset.items()} == syn.DEFAULT_SIZES
    prompts = {split: [e["prompt"] for e in ex] for split, ex in default_dataset.items()}
    for split, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"duplicate prompts in {split}"
        assert all(syn.prompt_split(p) == split for p in ps)
    train = set(prompts["train"])
    assert not train & set(prompts["validation"])
    assert not train & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 1000))
def test_splits_disjoint_across_seeds(seed_a: int, seed_b: int) -> None:
    train = {e["prompt"] for e in syn.generate_split("train", 200, seed_a)}
    for split in ("validation", "test"):
        assert not train & {e["prompt"] for e in syn.generate_split(split, 30, seed_b)}


def test_eval_vocabulary_is_covered_by_train(default_dataset: dict[str, list[dict]]) -> None:
    train_words = set().union(*map(_words, default_dataset["train"]))
    for split in ("validation", "test"):
        unseen = set().union(*map(_words, default_dataset[split])) - train_words
        assert not unseen, f"{split} words missing from train: {sorted(unseen)}"


# ---------------------------------------------------------------------------
# Shape of the examples
# ---------------------------------------------------------------------------


def test_example_structure(sample: list[dict]) -> None:
    for i, example in enumerate(sample):
        assert set(example) == FIELDS
        assert example["id"] == f"train-{i:06d}" and example["split"] == "train"
        json.dumps(example)
        parts = example["parts"]
        assert example["response"] == "\n".join(p["text"] for p in parts)
        for part in parts:
            assert set(part) == {"topic", "text", "depends"}
            assert TOPIC.fullmatch(part["topic"]), part["topic"]
            # a plan copies its topics: an independent part's from the prompt's words for its fact,
            # a closing part's from the instruction that asks for it
            source = example["prompt"] if not part["depends"] else example["prompt"].lower()
            assert re.search(rf"(?<!\w){re.escape(part['topic'])}(?!\w)", source), (part["topic"], source)
            assert "\n" not in part["text"] and part["text"] == part["text"].strip()
            assert any(k in part["text"] for k in example["answer_keys"]), part
        assert all(k and k in example["response"] for k in example["answer_keys"])


def test_length_bounds(sample: list[dict]) -> None:
    for example in sample:
        parts = example["parts"]
        assert syn.MIN_PARTS <= len(parts) <= syn.MAX_PARTS == 8
        assert syn.MIN_PARTS == 2
        for part in parts:
            assert 5 <= syn.count_tokens(part["text"]) <= 60, part["text"]
        assert 30 <= syn.count_tokens(example["response"]) <= 250


def test_depends_fraction_and_position(sample: list[dict]) -> None:
    with_depends = 0
    for example in sample:
        flags = [p["depends"] for p in example["parts"]]
        assert not any(flags[:-1]), "only the last part may depend on earlier parts"
        with_depends += flags[-1]
    assert 0.15 <= with_depends / len(sample) <= 0.25


def test_families(sample: list[dict]) -> None:
    counts = Counter(e["family"] for e in sample)
    assert set(counts) == set(syn.FAMILIES)
    assert len(counts) >= 6
    assert min(counts.values()) >= len(sample) / len(counts) / 2
    with_depends = {e["family"] for e in sample if e["parts"][-1]["depends"]}
    assert with_depends == set(syn.FAMILIES)


def _numbers(pattern: str, text: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, text)]


def test_closing_parts_are_computable_from_the_prompt(sample: list[dict]) -> None:
    checked = Counter()
    for example in sample:
        last, prompt = example["parts"][-1], example["prompt"]
        if not last["depends"]:
            continue
        family, text = example["family"], last["text"]
        if family == "howto":
            total = sum(_numbers(r"\((\d+) minutes\)", prompt))
            assert f"{total} minutes" in text
        elif family == "shopping":
            total = sum(_numbers(r": (\d+) dollars at", prompt))
            assert f"{total} dollars" in text
        elif family == "product":
            total = sum(_numbers(r"(?:Price|Shipping): (\d+) dollars", prompt))
            assert f"{total} dollars" in text
        elif family == "recipe":
            n_ingredients = len(re.findall(r"^- ", prompt, re.MULTILINE))
            assert f"{n_ingredients} ingredients" in text
        elif family == "animals":
            rows = re.findall(r"^(\w+): .* weight (\d+) kg$", prompt, re.MULTILINE)
            heaviest = max(rows, key=lambda r: int(r[1]))[0]
            assert f"{heaviest} is the heaviest" in text or f"{heaviest} is heavier" in text
        else:
            continue
        checked[family] += 1
    assert len(checked) == 5


def test_no_torch_or_lightning_import() -> None:
    tree = ast.parse(Path(syn.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
    }
    assert not imported & {"torch", "lightning", "pytorch_lightning", "transformers"}


# ---------------------------------------------------------------------------
# Files and command line
# ---------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path, sample: list[dict]) -> None:
    path = tmp_path / "deep" / "train.jsonl"
    syn.write_jsonl(sample[:100], path)
    assert syn.read_jsonl(path) == sample[:100]
    assert path.read_text().count("\n") == 100


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--train", "60", "--validation", "10", "--test", "10", "--seed", "4"]
    assert syn.main(args) == 0
    expected = syn.generate_dataset({"train": 60, "validation": 10, "test": 10}, seed=4)
    for split, examples in expected.items():
        assert syn.read_jsonl(tmp_path / f"{split}.jsonl") == examples
    out = capsys.readouterr().out
    assert "train: 60 examples" in out and "tokens/answer mean" in out and "depends" in out
