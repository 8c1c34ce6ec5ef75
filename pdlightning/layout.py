"""Token layout of a response, shared by training data and decoders (design section 3)::

    prompt | <topic>a 2</topic><topic>b 1</topic> | <async>[a</topic>]..a..<pad/></async><async>..b..</async> | <sync/> | ... | EOS

A plan entry is ``plan_open + encode("WORDS N") + plan_close``; with topic heads
a span opens with ``encode(WORDS) + plan_close``; stochastic pads stand just
before ``span_close``. Pure Python: no torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from pdlightning.tags import PlanEntry, TaggedResponse, TagSpec


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def entry_ids(tokenizer: PreTrainedTokenizerBase, spec: TagSpec, entry: PlanEntry) -> list[int]:
    """Ids of one plan entry, tags included."""
    body = f"{entry.topic} {entry.length}" if entry.topic else str(entry.length)
    return [spec.id("plan_open"), *_encode(tokenizer, body), spec.id("plan_close")]


def head_ids(tokenizer: PreTrainedTokenizerBase, spec: TagSpec, topic: str) -> list[int]:
    """Ids of a span's topic head (after ``span_open``): the topic words and ``plan_close``."""
    return [*_encode(tokenizer, topic), spec.id("plan_close")]


def span_ids(
    tokenizer: PreTrainedTokenizerBase,
    spec: TagSpec,
    content: str | Sequence[int],
    topic: str | None = None,
    n_pads: int = 0,
) -> list[int]:
    """Ids of one span: open tag, optional topic head, content, pads, close tag."""
    content_ids = _encode(tokenizer, content) if isinstance(content, str) else list(content)
    head = head_ids(tokenizer, spec, topic) if topic is not None else []
    return [spec.id("span_open"), *head, *content_ids, *[spec.id("pad")] * n_pads, spec.id("span_close")]


def encode_response(
    response: TaggedResponse,
    tokenizer: PreTrainedTokenizerBase,
    spec: TagSpec,
    topic_heads: bool = False,
    pads: Sequence[int] | None = None,
    keep_sync: bool = True,
) -> list[int]:
    """Token ids of a tagged response in the planned layout.

    Args:
        response: Parsed response.
        tokenizer: Tokenizer with control tokens.
        spec: Tag spec with ids.
        topic_heads: Open each span with its topic words.
        pads: Pad tokens to insert before each span's close tag, one per span.
        keep_sync: ``False`` drops ``<sync/>`` (the no-sync ablation: one plan).

    Returns:
        The response ids, ending with the end token when ``response.end``.
    """
    n_spans = sum(len(r.spans) for r in response.rounds)
    pads = list(pads) if pads is not None else [0] * n_spans
    if len(pads) != n_spans:
        raise ValueError(f"{len(pads)} pad counts for {n_spans} spans")
    rounds = response.rounds
    if not keep_sync:  # merge every round into one plan followed by all spans
        from pdlightning.tags import Round

        rounds = [Round([e for r in rounds for e in r.entries], [s for r in rounds for s in r.spans], False)]
    out: list[int] = []
    k = 0
    for rnd in rounds:
        for entry in rnd.entries:
            out += entry_ids(tokenizer, spec, entry)
        for entry, content in zip(rnd.entries, rnd.spans, strict=True):
            out += span_ids(tokenizer, spec, content, entry.topic if topic_heads else None, pads[k])
            k += 1
        if rnd.sync:
            out.append(spec.id("sync"))
    if response.end:
        out.append(spec.id("end"))
    return out


def encode_plain(
    text: str, tokenizer: PreTrainedTokenizerBase, spec: TagSpec, end: bool = True
) -> list[int]:
    """Ids of an untagged answer (baselines): the text, then the end token."""
    return [*_encode(tokenizer, text), *([spec.id("end")] if end else [])]
