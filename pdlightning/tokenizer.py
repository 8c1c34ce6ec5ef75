"""Tokenizer integration: control tags as single special tokens, and a small
tokenizer trained locally with ``tokenizers`` (nothing downloads).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pdlightning.jsonio import read_json
from pdlightning.tags import CONTROL_NAMES, TagSpec

#: Chat template of the tokenizers built here: role tokens, no system prompt needed.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPEC_FILE = "tag_spec.json"


def add_control_tokens(tokenizer: PreTrainedTokenizerBase, spec: TagSpec) -> TagSpec:
    """Add every control string of ``spec`` as one special token; record the ids.

    The end tag is the tokenizer's EOS when it has one (its ``<eos/>`` text form
    is only used in text); otherwise ``spec.end`` becomes the EOS. ``spec.pad``
    becomes the pad token if the tokenizer has none, ``spec.mask`` the mask token.

    Args:
        tokenizer: Any HF (fast) tokenizer; modified in place.
        spec: Tag strings.

    Returns:
        ``spec`` with ``ids`` filled in. Resize the model's embeddings to
        ``len(tokenizer)`` afterwards.
    """
    wanted = [spec.strings()[n] for n in CONTROL_NAMES if n != "end"]
    if tokenizer.eos_token is None:
        tokenizer.eos_token = spec.end
        wanted.append(spec.end)
    have = set(tokenizer.get_vocab())
    new = [s for s in wanted if s not in have or s not in tokenizer.all_special_tokens]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = spec.pad
    tokenizer.mask_token = spec.mask
    ids: dict[str, int] = {}
    for name in CONTROL_NAMES:
        text = tokenizer.eos_token if name == "end" else getattr(spec, name)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"control string {text!r} does not encode to one token: {encoded}")
        ids[name] = encoded[0]
    return spec.with_ids(ids)


TOKENIZER_VERSION = 2
"""Bumped whenever :func:`build_tokenizer` would build a different tokenizer (cached ones are keyed by it)."""


def build_tokenizer(
    texts: Iterable[str], spec: TagSpec, vocab_size: int = 4096, min_frequency: int = 2
) -> tuple[PreTrainedTokenizerFast, TagSpec]:
    """Train a byte-level BPE tokenizer on local text (digits split one by one, a space kept with the first).

    Every word is encoded with the space before it, also at the start of a
    text and of a line: ``"Lucy"`` in ``"Name: Lucy"``, in ``"Lucy is 31."``
    and at the head of a span is the same token, so a small model copies names
    from the prompt without learning two spellings of each. The normaliser
    puts a space before the text (and before the text after each special
    token) and after every newline that does not end it; the decoder removes
    exactly those, so ``decode(encode(text)) == text`` for any text.

    Args:
        texts: Training text (prompts and responses).
        spec: Tag strings; they become special tokens.
        vocab_size: Target vocabulary size.
        min_frequency: Minimum count of a merge.

    Returns:
        The HF fast tokenizer (with a chat template) and ``spec`` with token ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\n(?!\z)"), "\n "), normalizers.Prepend(" ")]
    )
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    specials = [spec.end, spec.pad, spec.mask, *ROLE_TOKENS]
    specials += [getattr(spec, n) for n in CONTROL_NAMES if getattr(spec, n) not in specials]
    # The text after a special token is normalised on its own, so it got a space too.
    core.decoder = decoders.Sequence([
        decoders.ByteLevel(),
        decoders.Fuse(),
        decoders.Replace("\n ", "\n"),
        *(decoders.Replace(f"{t} ", t) for t in specials),
        decoders.Strip(" ", 1, 0),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    if (reached := core.get_vocab_size()) < vocab_size:
        warnings.warn(
            f"vocab_size={vocab_size} asked, but the training text supports only "
            f"{reached} tokens (every pair seen at least min_frequency={min_frequency} "
            "times is merged): a larger vocab_size changes nothing",
            stacklevel=2,
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=spec.end,
        pad_token=spec.pad,
        mask_token=spec.mask,
        additional_special_tokens=[*ROLE_TOKENS],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, add_control_tokens(tokenizer, spec)


def save_spec(spec: TagSpec, directory: str | Path) -> Path:
    """Write the spec (strings, units, ids) beside a tokenizer as ``tag_spec.json``."""
    path = Path(directory) / SPEC_FILE
    fields = {n: getattr(spec, n) for n in (*CONTROL_NAMES, "length_unit", "max_topic_words")}
    path.write_text(json.dumps({**fields, "ids": dict(spec.ids)}, indent=2, sort_keys=True))
    return path


def load_spec(directory: str | Path) -> TagSpec:
    """Read ``tag_spec.json`` written by :func:`save_spec`.

    Raises:
        FileNotFoundError: There is no ``tag_spec.json`` in ``directory``.
        ValueError: The file is not valid JSON, is not an object, has a key
            :class:`~pdlightning.tags.TagSpec` does not know, or holds a bad value
            (the message names the file and the problem).
    """
    path = Path(directory) / SPEC_FILE
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of tag spec fields, got {type(data).__name__}")
    known = {f.name for f in fields(TagSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"a tag spec has {', '.join(sorted(known))}")
    ids = data.pop("ids", None) or {}
    try:
        if not isinstance(ids, dict) or not all(isinstance(v, int) for v in ids.values()):
            raise ValueError(f"'ids' must map control names to integer token ids, got {ids!r}")
        spec = TagSpec(**data)
        return spec.with_ids(ids) if ids else spec
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad tag spec: {e}") from None


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a user prompt (and an optional system prompt), through the chat
    template when there is one: the one place training and decoding format prompts."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode((system + "\n" if system else "") + prompt + "\n", add_special_tokens=False))


#: Files that hold a tokenizer's vocabulary (any one, or a pair, is enough to load it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer as saved, without a model-specific class adding tokens of its own.

    A tokenizer built here is a plain ``tokenizers`` backend; ``AutoTokenizer``
    would pick the class of the model type in ``config.json`` (e.g. Qwen2's),
    which adds its own special tokens and shifts the vocabulary.

    Raises:
        FileNotFoundError: ``directory`` holds none of :data:`TOKENIZER_FILES` (the
            message names them); without this check transformers builds an empty
            tokenizer from ``config.json`` alone that encodes every text to nothing.
        ValueError: ``tokenizer_config.json`` is not valid JSON, or the loaded tokenizer
            encodes text to no tokens (both name the directory or file).
    """
    path = Path(directory)
    if path.is_dir() and not trust_remote_code and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{str(path)!r} has no tokenizer files: none of {', '.join(TOKENIZER_FILES)} is there. "
            "Copy the tokenizer saved with the model back (`pdlightning export` writes it beside the weights)"
        )
    config_path = path / "tokenizer_config.json"
    cls_name = None
    if config_path.is_file():
        try:
            cls_name = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
        except (ValueError, AttributeError) as e:  # JSONDecodeError/UnicodeDecodeError; not an object
            raise ValueError(f"{config_path}: not a valid tokenizer config ({e})") from None
    if cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{str(path / 'tokenizer.json')!r} is missing: {config_path.name} names a "
                                    f"plain `tokenizers` backend ({cls_name}), which is loaded from that file")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if not tokenizer.encode("a b", add_special_tokens=False):
        raise ValueError(f"the tokenizer in {str(path)!r} encodes text to no tokens: its vocabulary is "
                         f"missing or empty (expected one of {', '.join(TOKENIZER_FILES)})")
    return tokenizer
