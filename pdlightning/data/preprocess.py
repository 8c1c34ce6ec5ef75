"""Tokenise and validate one row: prompt ids, planned-layout response ids and
plain response ids, or the reason the row is discarded. No Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from pdlightning.layout import encode_plain, encode_response
from pdlightning.tags import Round, TagError, TaggedResponse, TagSpec, from_pasta, parse, strip
from pdlightning.tokenizer import format_prompt


@dataclass(frozen=True)
class LayoutOptions:
    """How a tagged response becomes tokens.

    Attributes:
        topic_heads: Open each span with its topic words (scaffold, not target).
        keep_sync: Keep ``<sync/>`` (False: the no-sync ablation, one plan).
        keep_topics: Keep topic words in plan entries (False: the no-topic ablation).
        relength: Recompute each planned length from the span's token count.
        max_pads: Most pads a span can receive (reserved when checking length).
        max_length: Longest prompt + response, pads included.
        overflow: ``drop`` over-long rows, or ``cut`` them after the last whole
            round that fits (no end token then).
    """

    topic_heads: bool = True
    keep_sync: bool = True
    keep_topics: bool = True
    relength: bool = True
    max_pads: int = 10
    max_length: int = 1024
    overflow: str = "drop"


def _tagged_of(row: dict[str, Any], spec: TagSpec) -> TaggedResponse:
    text = row.get("tagged")
    if text is not None:
        if not isinstance(text, str):
            raise TypeError("tagged is not a string")
        return from_pasta(text, spec) if "<async " in text else parse(text, spec)
    from pdlightning.data.annotate import HeuristicAnnotator

    return HeuristicAnnotator(spec=spec).annotate(row["prompt"], row["response"])


def preprocess_row(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, spec: TagSpec, options: LayoutOptions
) -> dict[str, Any]:
    """Tokenise one row.

    Returns:
        ``prompt_ids``, ``planned_ids`` (no pads yet), ``plain_ids``, ``n_spans``,
        ``response`` (answer text) and ``error`` (None, or why the row is dropped:
        a :data:`~pdlightning.tags.RULES` name, ``bad_row`` or ``too_long``).
    """
    empty = {"prompt_ids": [], "planned_ids": [], "plain_ids": [], "n_spans": 0}
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return {**empty, "response": "", "error": "bad_row"}
    try:
        tagged = _tagged_of(row, spec)
    except TagError as e:
        return {**empty, "response": "", "error": e.rule}
    except (TypeError, KeyError, AttributeError, ValueError):
        return {**empty, "response": "", "error": "bad_row"}
    response = row.get("response") if isinstance(row.get("response"), str) else strip(tagged, spec)
    rounds = [replace(r, entries=list(r.entries)) for r in tagged.rounds]
    for r in rounds:
        for k, (entry, content) in enumerate(zip(r.entries, r.spans, strict=True)):
            length = entry.length
            if options.relength:
                length = spec.units(len(tokenizer.encode(content, add_special_tokens=False)))
            r.entries[k] = replace(entry, length=length, topic=entry.topic if options.keep_topics else "")
    p_ids = format_prompt(tokenizer, prompt, row.get("system"))
    heads = options.topic_heads and options.keep_topics

    def encode(rs: list[Round], end: bool) -> list[int]:
        return encode_response(TaggedResponse(rs, end=end), tokenizer, spec, heads, keep_sync=options.keep_sync)

    planned = encode(rounds, tagged.end)
    n_spans = sum(len(r.spans) for r in rounds)
    budget = options.max_length - len(p_ids)
    while len(planned) + options.max_pads * n_spans > budget:
        if options.overflow != "cut" or len(rounds) <= 1:
            return {**empty, "response": response, "error": "too_long"}
        rounds = rounds[:-1]
        rounds[-1] = replace(rounds[-1], sync=False)
        planned = encode(rounds, False)
        n_spans = sum(len(r.spans) for r in rounds)
        response = strip(TaggedResponse(rounds, end=False), spec)
    plain = encode_plain(response, tokenizer, spec)
    return {
        "prompt_ids": p_ids,
        "planned_ids": planned,
        "plain_ids": plain[: max(budget, 1)],
        "n_spans": n_spans,
        "response": response,
        "error": None,
    }
