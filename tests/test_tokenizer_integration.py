"""Control tags become single special tokens with recorded ids; tokenizers built
here survive save and load; nothing downloads."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from pdlightning.decoding.lm import load_tokenizer
from pdlightning.tags import CONTROL_NAMES, TagSpec
from pdlightning.tokenizer import add_control_tokens, build_tokenizer, load_spec, save_spec

TEXTS = ["Her name is Ann Lee. She is 31.\nShe lives in Paris."] * 5


def test_every_control_string_is_one_token_for_both_presets(tmp_path: Path):
    for preset in ("paper", "official"):
        spec = TagSpec.preset(preset)
        tok, spec = build_tokenizer(TEXTS, spec, vocab_size=300)
        assert set(spec.ids) == set(CONTROL_NAMES) and len(set(spec.ids.values())) == len(CONTROL_NAMES)
        for name in CONTROL_NAMES:
            text = tok.eos_token if name == "end" else getattr(spec, name)
            assert tok.encode(text, add_special_tokens=False) == [spec.id(name)]


def test_an_existing_eos_is_the_end_token_and_a_missing_one_is_added():
    base, _ = build_tokenizer(TEXTS, TagSpec(end="</s>"), vocab_size=300)
    spec = add_control_tokens(base, TagSpec())  # the tokenizer already has "</s>" as EOS
    assert spec.id("end") == base.eos_token_id and base.eos_token == "</s>"
    bare = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    bare.eos_token = None
    spec2 = add_control_tokens(bare, TagSpec())
    assert bare.eos_token == "<eos/>" and spec2.id("end") == bare.convert_tokens_to_ids("<eos/>")


def test_save_and_load_keep_vocabulary_ids_and_spec(tmp_path: Path):
    tok, spec = build_tokenizer(TEXTS, TagSpec(), vocab_size=300)
    tok.save_pretrained(tmp_path)
    save_spec(spec, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')  # as in an exported model directory
    again = load_tokenizer(tmp_path)
    assert len(again) == len(tok)
    text = "<topic>name 1</topic><async>Her name is Ann.</async><eos/>"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert load_spec(tmp_path) == spec and load_spec(tmp_path).ids == spec.ids
    assert again.chat_template == tok.chat_template
