"""Control tags become single special tokens with recorded ids; tokenizers built
here survive save and load; nothing downloads."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from pdlightning.tags import CONTROL_NAMES, TagSpec
from pdlightning.tokenizer import (
    add_control_tokens,
    build_tokenizer,
    load_spec,
    load_tokenizer,
    save_spec,
)

TEXTS = ["Her name is Ann Lee. She is 31.\nShe lives in Paris."] * 5


def test_every_control_string_is_one_token_for_both_presets(tmp_path: Path):
    for preset in ("paper", "official"):
        spec = TagSpec.preset(preset)
        tok, spec = build_tokenizer(TEXTS, spec, vocab_size=280)
        assert set(spec.ids) == set(CONTROL_NAMES) and len(set(spec.ids.values())) == len(CONTROL_NAMES)
        for name in CONTROL_NAMES:
            text = tok.eos_token if name == "end" else getattr(spec, name)
            assert tok.encode(text, add_special_tokens=False) == [spec.id(name)]


def test_an_existing_eos_is_the_end_token_and_a_missing_one_is_added():
    base, _ = build_tokenizer(TEXTS, TagSpec(end="</s>"), vocab_size=280)
    spec = add_control_tokens(base, TagSpec())  # the tokenizer already has "</s>" as EOS
    assert spec.id("end") == base.eos_token_id and base.eos_token == "</s>"
    bare = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    bare.eos_token = None
    spec2 = add_control_tokens(bare, TagSpec())
    assert bare.eos_token == "<eos/>" and spec2.id("end") == bare.convert_tokens_to_ids("<eos/>")


def test_save_and_load_keep_vocabulary_ids_and_spec(tmp_path: Path):
    tok, spec = build_tokenizer(TEXTS, TagSpec(), vocab_size=280)
    tok.save_pretrained(tmp_path)
    save_spec(spec, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')  # as in an exported model directory
    again = load_tokenizer(tmp_path)
    assert len(again) == len(tok)
    text = "<topic>name 1</topic><async>Her name is Ann.</async><eos/>"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert load_spec(tmp_path) == spec and load_spec(tmp_path).ids == spec.ids
    assert again.chat_template == tok.chat_template


# ----------------------------------------------------------------------------- the bundled tokenizer

with warnings.catch_warnings():  # every pair merged: 320 is more than the text fills, on purpose
    warnings.simplefilter("ignore", UserWarning)
    _TOK, _SPEC = build_tokenizer(TEXTS * 4, TagSpec(), vocab_size=320, min_frequency=1)
_TEXT = st.lists(st.sampled_from([*"Ann Lee31.\n :-é", "<async>", "</topic>", "<sync/>"]), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_decode_inverts_encode_for_any_text(text: str):
    ids = _TOK.encode(text, add_special_tokens=False)
    assert _TOK.decode(ids) == text


def test_a_word_is_one_token_sequence_at_line_start_after_a_space_and_alone():
    """What lets a small model copy a name: the same ids in the prompt, a line and a span."""
    def ids(text: str) -> list[int]:
        return _TOK.encode(text, add_special_tokens=False)

    name = ids("Ann")
    assert ids("Name: Ann")[-len(name):] == name
    assert ids("She is 31.\nAnn")[-len(name):] == name
    assert ids("x<async>Ann")[-len(name):] == name
    assert _TOK.decode(ids("Ann Lee.\n") + ids("She lives in Paris.")) == "Ann Lee.\nShe lives in Paris."


def test_numbers_are_split_into_digits_with_the_space_on_the_first():
    tokens = _TOK.convert_ids_to_tokens(_TOK.encode("is 31", add_special_tokens=False))
    assert tokens[-2:] == ["\u01203", "1"]  # 'Ġ3', '1'


def test_a_vocab_size_the_text_cannot_fill_is_reported_with_the_size_reached():
    with pytest.warns(UserWarning, match=r"vocab_size=5000 asked, but the training text supports only (\d+) tokens") as got:
        tok, _ = build_tokenizer(TEXTS, TagSpec(), vocab_size=5000)
    reached = int(re.search(r"only (\d+) tokens", str(got[0].message)).group(1))
    assert reached == len(tok) < 5000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_tokenizer(TEXTS, TagSpec(), vocab_size=reached)


# ----------------------------------------------------------------------------- damaged model directories


def _saved(directory: Path) -> Path:
    tok, spec = build_tokenizer(TEXTS, TagSpec(), vocab_size=280)
    tok.save_pretrained(directory)
    save_spec(spec, directory)
    (directory / "config.json").write_text('{"model_type": "qwen2"}')
    return directory


def test_a_directory_without_tokenizer_files_is_refused_naming_them(tmp_path: Path):
    from pdlightning.decoding.lm import LanguageModel

    d = _saved(tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files: none of tokenizer\.json"):
        load_tokenizer(d)
    (d / "vocab.json").write_text("{}")  # a stray vocabulary file: tokenizer_config.json still wants tokenizer.json
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json' is missing: tokenizer_config\.json names"):
        load_tokenizer(d)
    for f in d.iterdir():
        if f.name not in ("config.json", "tag_spec.json"):
            f.unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files: none of tokenizer\.json"):
        load_tokenizer(d)
    with pytest.raises(OSError, match=r"'.*m' has no tokenizer files"):  # before the weights are looked for
        LanguageModel.from_pretrained(d)


def test_a_corrupt_tokenizer_config_is_named(tmp_path: Path):
    d = _saved(tmp_path / "m")
    (d / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not a valid tokenizer config"):
        load_tokenizer(d)


@pytest.mark.parametrize(("content", "expected"), [
    ('{"plan_open": "<topic>",', r"tag_spec\.json: not valid JSON"),
    ('["<topic>"]', r"tag_spec\.json: expected a JSON object"),
    ('{"plan_open": "<topic>", "colour": "blue"}', r"tag_spec\.json: unknown key\(s\) 'colour'"),
    ('{"length_unit": 0}', r"tag_spec\.json: bad tag spec: length_unit must be >= 1"),
    ('{"length_unit": "ten"}', r"tag_spec\.json: bad tag spec"),
    ('{"ids": {"end": 1}}', r"tag_spec\.json: bad tag spec: token ids missing"),
])
def test_a_bad_tag_spec_is_a_value_error_naming_the_file(tmp_path: Path, content: str, expected: str):
    (tmp_path / "tag_spec.json").write_text(content)
    with pytest.raises(ValueError, match=expected):
        load_spec(tmp_path)
