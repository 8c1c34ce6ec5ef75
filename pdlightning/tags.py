"""The control-tag language of planned diffusion, in one place.

A tagged response is a sequence of *rounds*. Each round is a plan (one or more
entries ``<topic>WORDS N</topic>``, written autoregressively) followed by one
span ``<async>...</async>`` per entry, in plan order (filled in parallel by
diffusion). A ``<sync/>`` closes a round whose successors may depend on it; the
end tag (the tokenizer's EOS, ``<eos/>`` in text form) closes the response::

    <topic>name 2</topic><topic>age 1</topic><async>Her name is Ann Lee.</async>
    <async>She is 31.</async><sync/><topic>summary 1</topic><async>...</async><eos/>

(shown on three lines; the canonical form has no whitespace between tags).

Optionally a span opens with its topic words closed by the plan-close tag
(``<async>name</topic>Her name is ...</async>``): the *topic head*, scaffold the
model is given rather than asked to predict.

Every control string lives in :class:`TagSpec`; two presets ship: ``paper``
(the names of the paper) and ``official`` (the authors' released checkpoints).
Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

CONTROL_NAMES = ("plan_open", "plan_close", "span_open", "span_close", "sync", "end", "pad", "mask")


@dataclass(frozen=True)
class TagSpec:
    """Every control string of the tag language, and its token id once known.

    Attributes:
        plan_open: Opens a plan entry.
        plan_close: Closes a plan entry (and a span's topic head).
        span_open: Opens a span.
        span_close: Closes a span.
        sync: Barrier between rounds.
        end: Text form of the end of the response (the tokenizer's EOS).
        pad: Pad token inside spans (lets a span end early).
        mask: The diffusion mask token.
        length_unit: Tokens per unit of a planned length ``N``.
        max_topic_words: Upper bound on the words of a topic.
        ids: Token id of each control name, filled by
            :func:`pdlightning.tokenizer.add_control_tokens`.
    """

    plan_open: str = "<topic>"
    plan_close: str = "</topic>"
    span_open: str = "<async>"
    span_close: str = "</async>"
    sync: str = "<sync/>"
    end: str = "<eos/>"
    pad: str = "<pad/>"
    mask: str = "<mask/>"
    length_unit: int = 10
    max_topic_words: int = 3
    ids: Mapping[str, int] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        strings = self.strings()
        if len(set(strings.values())) != len(strings):
            raise ValueError(f"control strings must be distinct, got {strings}")
        if any(not s for s in strings.values()):
            raise ValueError("control strings must be non-empty")
        if self.length_unit < 1:
            raise ValueError(f"length_unit must be >= 1, got {self.length_unit}")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> TagSpec:
        """A shipped preset: ``paper`` or ``official``, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown tag preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]

    def strings(self) -> dict[str, str]:
        """Control name -> string, for every control name."""
        return {name: getattr(self, name) for name in CONTROL_NAMES}

    def id(self, name: str) -> int:
        """Token id of a control name; raises if the spec has no ids yet."""
        try:
            return self.ids[name]
        except KeyError:
            raise KeyError(
                f"tag spec has no token id for {name!r}; build it with "
                "pdlightning.tokenizer.add_control_tokens(tokenizer, spec)"
            ) from None

    def with_ids(self, ids: Mapping[str, int]) -> TagSpec:
        """A copy of this spec that records the token id of every control name."""
        missing = set(CONTROL_NAMES) - set(ids)
        if missing:
            raise ValueError(f"token ids missing for {sorted(missing)}")
        return replace(self, ids=dict(ids))

    def units(self, n_tokens: int) -> int:
        """Planned length, in units, that covers ``n_tokens`` tokens (at least 1)."""
        return max(1, math.ceil(n_tokens / self.length_unit))


PRESETS: dict[str, TagSpec] = {
    "paper": TagSpec(),
    "official": TagSpec(
        plan_open="<promise>-<topic>",
        plan_close="</topic>",
        span_open="<async>",
        span_close="</async>",
        sync="<sync/>",
        end="<|im_end|>",
        pad="[PAD]",
        mask="<|mask|>",
    ),
}


class TagError(ValueError):
    """A tagged response breaks a rule of the tag language.

    Attributes:
        rule: Short name of the rule broken (see :data:`RULES`).
        position: Character offset (text) or token index (ids) where it broke.
    """

    def __init__(self, rule: str, position: int, detail: str) -> None:
        self.rule = rule
        self.position = position
        super().__init__(f"{rule} at position {position}: {detail}")


#: Rule names a :class:`TagError` can carry.
RULES = (
    "unbalanced_span",  # a span opened and not closed, or closed and not opened
    "nested_span",  # a span opened inside a span
    "text_outside_span",  # non-whitespace text outside every span and plan entry
    "unexpected_tag",  # a tag where the grammar does not allow it
    "topic_too_long",  # more than max_topic_words words
    "bad_length",  # missing, non-numeric or non-positive planned length
    "entry_span_mismatch",  # a round's plan entries and spans differ in number
    "empty_span",  # a span with no content
    "empty_response",  # no round at all
    "text_after_end",  # anything after the end tag
)


@dataclass
class PlanEntry:
    """One planned span: its topic (0..max_topic_words words) and length in units."""

    topic: str
    length: int


@dataclass
class Round:
    """A plan and the spans that fill it, optionally closed by ``<sync/>``."""

    entries: list[PlanEntry]
    spans: list[str]
    sync: bool = False


@dataclass
class TaggedResponse:
    """A parsed response. ``topic_heads``: spans open with their topic words."""

    rounds: list[Round]
    end: bool = True
    topic_heads: bool = False

    def span_texts(self) -> list[str]:
        """Contents of every span, in order."""
        return [s for r in self.rounds for s in r.spans]

    def entries(self) -> list[PlanEntry]:
        """Every plan entry, in order."""
        return [e for r in self.rounds for e in r.entries]


# --------------------------------------------------------------------------- lexing


@dataclass(frozen=True)
class _Lexeme:
    kind: str  # a control name, or "text"
    value: str
    position: int


def _lex_text(text: str, spec: TagSpec) -> Iterator[_Lexeme]:
    strings = spec.strings()
    by_string = {s: n for n, s in strings.items()}
    pattern = re.compile("|".join(re.escape(s) for s in sorted(by_string, key=len, reverse=True)))
    last = 0
    for m in pattern.finditer(text):
        if m.start() > last:
            yield _Lexeme("text", text[last : m.start()], last)
        yield _Lexeme(by_string[m.group()], m.group(), m.start())
        last = m.end()
    if last < len(text):
        yield _Lexeme("text", text[last:], last)


def _lex_ids(ids: Sequence[int], spec: TagSpec, decode: Callable[[list[int]], str]) -> Iterator[_Lexeme]:
    by_id = {i: n for n, i in spec.ids.items()}
    if not by_id:
        spec.id("span_open")  # raises the helpful KeyError
    run: list[int] = []
    start = 0
    for pos, tok in enumerate(ids):
        name = by_id.get(int(tok))
        if name is None:
            if not run:
                start = pos
            run.append(int(tok))
            continue
        if run:
            yield _Lexeme("text", decode(run), start)
            run = []
        yield _Lexeme(name, getattr(spec, name), pos)
    if run:
        yield _Lexeme("text", decode(run), start)


# --------------------------------------------------------------------------- grammar

_LENGTH = re.compile(r"^(?P<topic>.*?)\s*(?P<length>\S+)$", re.DOTALL)


def _parse_entry(body: str, position: int, spec: TagSpec) -> PlanEntry:
    m = _LENGTH.match(body.strip())
    if m is None:
        raise TagError("bad_length", position, f"plan entry {body!r} has no length")
    length_text = m.group("length")
    if not length_text.isdigit():
        raise TagError("bad_length", position, f"plan entry {body!r}: length {length_text!r} is not a whole number")
    length = int(length_text)
    if length < 1:
        raise TagError("bad_length", position, f"plan entry {body!r}: length must be >= 1")
    topic = m.group("topic").strip()
    if len(topic.split()) > spec.max_topic_words:
        raise TagError(
            "topic_too_long", position, f"topic {topic!r} has more than {spec.max_topic_words} words"
        )
    return PlanEntry(topic=topic, length=length)


def _parse_lexemes(lexemes: Iterator[_Lexeme], spec: TagSpec, require_end: bool) -> TaggedResponse:
    lex = list(lexemes)
    rounds: list[Round] = []
    entries: list[PlanEntry] = []
    spans: list[str] = []
    heads: list[bool] = []
    ended = False
    i = 0

    def close_round(sync: bool, position: int) -> None:
        nonlocal entries, spans
        if not entries and not spans:
            raise TagError("unexpected_tag", position, "a round needs at least one plan entry")
        if len(entries) != len(spans):
            raise TagError(
                "entry_span_mismatch", position,
                f"round has {len(entries)} plan entries but {len(spans)} spans",
            )
        rounds.append(Round(entries=entries, spans=spans, sync=sync))
        entries, spans = [], []

    while i < len(lex):
        lx = lex[i]
        if ended:
            if lx.kind == "text" and not lx.value.strip():
                i += 1
                continue
            raise TagError("text_after_end", lx.position, f"{lx.value[:20]!r} after the end tag")
        if lx.kind == "text":
            if lx.value.strip():
                raise TagError("text_outside_span", lx.position, f"{lx.value[:30]!r} is outside every span")
            i += 1
        elif lx.kind == "plan_open":
            if spans:
                raise TagError("unexpected_tag", lx.position, "plan entry after spans without <sync/> or end")
            body = ""
            j = i + 1
            if j < len(lex) and lex[j].kind == "text":
                body = lex[j].value
                j += 1
            if j >= len(lex) or lex[j].kind != "plan_close":
                raise TagError("unexpected_tag", lx.position, "plan entry is not closed")
            entries.append(_parse_entry(body, lx.position, spec))
            i = j + 1
        elif lx.kind == "span_open":
            j = i + 1
            head = False
            if j + 1 < len(lex) and lex[j].kind == "text" and lex[j + 1].kind == "plan_close":
                head, j = True, j + 2  # topic head: "<async>topic</topic>"
            elif j < len(lex) and lex[j].kind == "plan_close":
                head, j = True, j + 1  # empty topic head
            parts: list[str] = []
            while j < len(lex) and lex[j].kind in ("text", "pad"):
                parts.append(lex[j].value)
                j += 1
            if j >= len(lex):
                raise TagError("unbalanced_span", lx.position, "span is never closed")
            if lex[j].kind == "span_open":
                raise TagError("nested_span", lex[j].position, "span opened inside a span")
            if lex[j].kind in ("sync", "end", "plan_open"):
                raise TagError("unbalanced_span", lex[j].position, f"span not closed before {lex[j].value!r}")
            if lex[j].kind != "span_close":
                raise TagError("unexpected_tag", lex[j].position, f"{lex[j].value!r} inside a span")
            content = "".join(parts)
            if not content.replace(spec.pad, "").strip():
                raise TagError("empty_span", lx.position, "span has no content")
            spans.append(content)
            heads.append(head)
            i = j + 1
        elif lx.kind == "span_close":
            raise TagError("unbalanced_span", lx.position, "span closed but never opened")
        elif lx.kind == "sync":
            close_round(True, lx.position)
            i += 1
        elif lx.kind == "end":
            if entries or spans:
                close_round(False, lx.position)
            ended = True
            i += 1
        else:
            raise TagError("unexpected_tag", lx.position, f"{lx.value!r} outside a span")
    if entries or spans:
        position = lex[-1].position if lex else 0
        close_round(False, position)
    if not rounds:
        raise TagError("empty_response", 0, "no plan entry and no span")
    if require_end and not ended:
        raise TagError("unexpected_tag", lex[-1].position, "response does not end with the end tag")
    if any(heads) and not all(heads):
        raise TagError("unexpected_tag", 0, "some spans open with a topic head and some do not")
    return TaggedResponse(rounds=rounds, end=ended, topic_heads=bool(heads) and all(heads))


def parse(text: str, spec: TagSpec | None = None, require_end: bool = False) -> TaggedResponse:
    """Parse a tagged response in text form.

    Whitespace between tags is allowed and ignored; any other text outside a
    span or plan entry is an error.

    Args:
        text: The tagged response (without the prompt).
        spec: Tag strings; the ``paper`` preset by default.
        require_end: Also require the end tag.

    Raises:
        TagError: naming the rule broken and the character position.

    Example:
        >>> r = parse("<topic>a 1</topic><async>x</async><eos/>")
        >>> r.rounds[0].entries[0], r.span_texts()
        (PlanEntry(topic='a', length=1), ['x'])
    """
    spec = spec or PRESETS["paper"]
    if not isinstance(text, str):
        raise TypeError(f"parse expects text, got {type(text).__name__}")
    return _parse_lexemes(_lex_text(text, spec), spec, require_end)


def parse_ids(
    ids: Sequence[int], spec: TagSpec, decode: Callable[[list[int]], str], require_end: bool = False
) -> TaggedResponse:
    """Parse a tagged response given as token ids (positions are token indices).

    Args:
        ids: Token ids of the response (without the prompt).
        spec: A spec with ``ids`` recorded.
        decode: Turns a run of non-control ids into text (e.g. ``tokenizer.decode``).
        require_end: Also require the end token.

    Raises:
        TagError: naming the rule broken and the token index.
    """
    return _parse_lexemes(_lex_ids(ids, spec, decode), spec, require_end)


def render(response: TaggedResponse, spec: TagSpec | None = None) -> str:
    """Text form of a parsed response; ``render(parse(x)) == x`` for canonical ``x``."""
    spec = spec or PRESETS["paper"]
    out: list[str] = []
    for rnd in response.rounds:
        for e in rnd.entries:
            body = f"{e.topic} {e.length}" if e.topic else str(e.length)
            out.append(f"{spec.plan_open}{body}{spec.plan_close}")
        for e, s in zip(rnd.entries, rnd.spans, strict=True):
            head = f"{e.topic}{spec.plan_close}" if response.topic_heads else ""
            out.append(f"{spec.span_open}{head}{s}{spec.span_close}")
        if rnd.sync:
            out.append(spec.sync)
    if response.end:
        out.append(spec.end)
    return "".join(out)


def strip(text_or_response: str | TaggedResponse, spec: TagSpec | None = None) -> str:
    """The final answer: span contents in order, without tags and pads."""
    spec = spec or PRESETS["paper"]
    response = parse(text_or_response, spec) if isinstance(text_or_response, str) else text_or_response
    return "".join(s.replace(spec.pad, "") for s in response.span_texts())


def validate(text: str, spec: TagSpec | None = None, require_end: bool = False) -> None:
    """Raise :class:`TagError` if ``text`` is not a well-formed tagged response."""
    parse(text, spec, require_end=require_end)


# --------------------------------------------------------------------------- PASTA form

_PASTA_OPEN = re.compile(r"<async\s+(?P<attrs>[^>]*)>")
_PASTA_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def from_pasta(
    text: str,
    spec: TagSpec | None = None,
    count_tokens: Callable[[str], int] | None = None,
    end: bool = True,
) -> TaggedResponse:
    """Convert the annotator's attribute form to the canonical plan + spans layout.

    ``<async topic="definition" tokens="30">...</async>`` becomes a plan entry
    ``definition 3`` (tokens rounded up to units) and a span. ``<sync/>`` (the
    spec's) separates rounds. A missing ``tokens`` attribute is estimated with
    ``count_tokens`` (whitespace words by default).

    Raises:
        TagError: for malformed input (same rules as :func:`parse`).
    """
    spec = spec or PRESETS["paper"]
    count = count_tokens or (lambda s: len(s.split()))
    rounds: list[Round] = []
    entries: list[PlanEntry] = []
    spans: list[str] = []
    pos = 0
    token = re.compile(rf"{_PASTA_OPEN.pattern}|{re.escape(spec.sync)}|</async>|<async>")
    while pos < len(text):
        m = token.search(text, pos)
        gap = text[pos : m.start() if m else len(text)]
        if gap.strip():
            raise TagError("text_outside_span", pos, f"{gap.strip()[:30]!r} is outside every span")
        if m is None:
            break
        if m.group() == spec.sync:
            if not entries:
                raise TagError("unexpected_tag", m.start(), "<sync/> with no span before it")
            rounds.append(Round(entries, spans, sync=True))
            entries, spans = [], []
            pos = m.end()
            continue
        if m.group() == "</async>":
            raise TagError("unbalanced_span", m.start(), "span closed but never opened")
        attrs = dict(_PASTA_ATTR.findall(m.group("attrs") or ""))
        close = text.find("</async>", m.end())
        if close < 0:
            raise TagError("unbalanced_span", m.start(), "span is never closed")
        content = text[m.end() : close]
        inner = token.search(content)
        if inner is not None:
            raise TagError("nested_span", m.end() + inner.start(), "tag inside a span")
        if not content.strip():
            raise TagError("empty_span", m.start(), "span has no content")
        topic = " ".join(attrs.get("topic", "").split())
        if len(topic.split()) > spec.max_topic_words:
            raise TagError("topic_too_long", m.start(), f"topic {topic!r} has more than {spec.max_topic_words} words")
        n_tokens_text = attrs.get("tokens")
        if n_tokens_text is None:
            n_tokens = count(content)
        elif n_tokens_text.strip().isdigit():
            n_tokens = int(n_tokens_text)
        else:
            raise TagError("bad_length", m.start(), f"tokens={n_tokens_text!r} is not a whole number")
        entries.append(PlanEntry(topic=topic, length=spec.units(n_tokens)))
        spans.append(content)
        pos = close + len("</async>")
    if entries:
        rounds.append(Round(entries, spans, sync=False))
    if not rounds:
        raise TagError("empty_response", 0, "no span")
    return TaggedResponse(rounds=rounds, end=end)
