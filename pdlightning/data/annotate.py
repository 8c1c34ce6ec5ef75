"""Turn plain ``(prompt, response)`` pairs into tagged planned-diffusion responses.

:class:`HeuristicAnnotator` (offline, the default) makes one span per line or
list item (long paragraphs cut at sentences), a topic of at most three words
from a leading label or the first content words, and a ``<sync/>`` only before
a part that refers back to earlier ones (a closing total, comparison or
summary). :class:`~pdlightning.data.llm_annotator.LLMAnnotator` asks any
OpenAI-compatible endpoint. Separators stay inside the span before them, so
``strip(annotate(p, r)) == r``. :func:`annotate_file` tags a JSONL file in any
row form training reads (resume, failed requests retried, atomic output,
rejected rows kept); :func:`main` is ``pdlightning annotate``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdlightning.tags import PRESETS, PlanEntry, Round, TagError, TaggedResponse, TagSpec, render


class AnnotationError(ValueError):
    """A response could not be annotated.

    Attributes:
        reason: Short name of the cause (``text_changed``, ``request_failed``,
            ``contains_tag``, ...), used as the discard reason.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass
class Outcome:
    """The result of annotating one row: a tagged response, or why there is none."""

    tagged: TaggedResponse | None = None
    reason: str | None = None
    detail: str = ""


class Annotator(ABC):
    """Something that tags a plain response with plan entries, spans and syncs."""

    spec: TagSpec

    @abstractmethod
    def annotate(self, prompt: str, response: str) -> TaggedResponse:
        """Tag one response.

        Args:
            prompt: The instruction the response answers (context only).
            response: The plain response text.

        Returns:
            The tagged response; ``strip`` of it gives back ``response`` exactly.

        Raises:
            TagError: The annotation is malformed (``.rule`` names the rule).
            AnnotationError: Any other reason the response cannot be tagged.
        """

    def outcome(self, prompt: str, response: str) -> Outcome:
        """Like :meth:`annotate`, with expected failures turned into an :class:`Outcome`."""
        try:
            return Outcome(self.annotate(prompt, response))
        except TagError as e:
            return Outcome(reason=e.rule, detail=str(e))
        except AnnotationError as e:
            return Outcome(reason=e.reason, detail=str(e))

    def annotate_many(self, rows: Iterable[tuple[str, str]]) -> Iterator[Outcome]:
        """Annotate ``(prompt, response)`` pairs, yielding outcomes in input order."""
        for prompt, response in rows:
            yield self.outcome(prompt, response)


def check_plain(response: str, spec: TagSpec) -> None:
    """Raise unless ``response`` is non-empty text free of control strings."""
    if not isinstance(response, str):
        raise AnnotationError("bad_row", f"response is {type(response).__name__}, not text")
    if not response.strip():
        raise TagError("empty_response", 0, "the response is empty")
    for s in (*spec.strings().values(), "<async", "</async>", "<sync/>"):
        if s in response:
            raise AnnotationError("contains_tag", f"the response already contains {s!r}")


# --------------------------------------------------------------------------- heuristic

_STOPWORD_TEXT = """a an the and or but if then so of to in on at by for with from as into about over after
    before is are was were be been being am do does did has have had it its this that these those
    there here i you he she we they me him her us them my your his our their mine what which who
    whom whose when where why how all any both each few more most other some such no not only own
    same than too very can will just should would could may might must let also now up out down
    off again further once please lets get got"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_LABEL = re.compile(
    r"^\s*(?:[-*+\u2022]\s+|\d+[.)]\s+|#+\s+)?[*_]{0,2}(?P<label>[^\W\d_][\w' -]{0,40}?)"
    r"(?:[*_]{1,2}\s*:|\s*:[*_]{0,2})(?:\s|$)"
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
#: phrases that on their own mark a part as depending on earlier parts
STRONG_CUES = re.compile(
    r"\b(in total|overall|in summary|to sum up|to summari[sz]e|summing up|in short|in sum|all in all|"
    r"altogether|all together|in conclusion|to conclude|taken together|together take|"
    r"the total|in all|that makes|this makes|that brings|between the two|of the two|of these|"
    r"of all (?:of )?(?:them|these|the)|compared (?:to|with)|in comparison|combined)\b",
    re.IGNORECASE,
)
#: superlatives: mark it together with a reference to one earlier part
SUPERLATIVES = re.compile(
    r"\bthe (most|least|fewest|best|worst|\w+iest|largest|biggest|smallest|highest|lowest|longest|"
    r"shortest|oldest|youngest|cheapest|fastest|slowest|greatest|tallest|richest|warmest|coldest)\b",
    re.IGNORECASE,
)
#: phrases that mark it only together with references to at least two earlier parts
WEAK_CUES = re.compile(r"\b(than|both|together|total|sum|all|each|either|neither)\b", re.IGNORECASE)


def _lines(text: str) -> list[str]:
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _sentence_chunks(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Split ``text`` at sentence ends into chunks of at most ``max_tokens`` (when possible)."""
    cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
    sentences = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    chunks: list[str] = []
    for s in sentences:
        if chunks and count(chunks[-1]) + count(s) <= max_tokens:
            chunks[-1] += s
        else:
            chunks.append(s)
    return chunks


def split_parts(
    response: str, max_part_tokens: int = 60, min_part_tokens: int = 3,
    count_tokens: Callable[[str], int] | None = None,
) -> list[str]:
    """Split a response into parts; ``"".join(split_parts(r)) == r``.

    Every line is a part (blank lines stay at the end of the part before them);
    a fenced code block is one part; a line under ``min_part_tokens`` tokens
    (or a short header ending in ``:``) joins the next part; a line over
    ``max_part_tokens`` is cut at sentence ends. ``count_tokens`` defaults to
    :func:`default_count_tokens`.
    """
    count = count_tokens or default_count_tokens
    blocks: list[str] = []
    lead = ""
    fence = False
    for line in _lines(response):
        stripped = line.strip()
        if fence or (not stripped and blocks):
            blocks[-1] += line  # inside a code block, or a blank line: joins the previous part
            fence = fence != stripped.startswith("```")
            continue
        if not stripped:
            lead += line
            continue
        blocks.append(lead + line)
        lead = ""
        fence = stripped.startswith("```") and stripped.count("```") % 2 == 1
    if lead:  # whitespace only
        return [lead]
    parts: list[str] = []
    carry = ""
    for k, block in enumerate(blocks):
        text = carry + block
        body = block.strip()
        short = count(body) < min_part_tokens or (body.endswith(":") and count(body) <= 12)
        if short and k + 1 < len(blocks) and not body.startswith("```"):
            carry = text
            continue
        carry = ""
        if count(body) > max_part_tokens and not body.startswith("```") and not _LIST_ITEM.match(body):
            parts.extend(_sentence_chunks(text, max_part_tokens, count))
        else:
            parts.append(text)
    return parts


def default_count_tokens(text: str) -> int:
    """Token count of the bundled set (:func:`pdlightning.data.synthetic.count_tokens`)."""
    from pdlightning.data.synthetic import count_tokens

    return count_tokens(text)


def topic_of(part: str, max_words: int = 3, words: int = 2) -> str:
    """A topic of at most ``max_words`` lowercase words for one part.

    A leading label (``Step one: ...``, ``**Name:** ...``) gives the topic when
    it is short enough; otherwise the first ``words`` content words do
    (stopwords and numbers dropped).
    """
    lines = [line for line in part.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        part = "\n".join(lines[1:])  # a header joined to the item after it: name the item
    m = _LABEL.match(part)
    if m is not None:
        label = [w.lower() for w in _WORD.findall(m.group("label"))]
        if 0 < len(label) <= max_words:
            return " ".join(label)
    content = [w.lower() for w in _WORD.findall(part) if w.lower() not in _STOPWORDS and not w.isdigit()]
    return " ".join(content[: min(words, max_words)])


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in _STOPWORDS}


def depends_on_earlier(part: str, earlier: Sequence[str]) -> bool:
    """Whether ``part`` refers back to the ``earlier`` parts (a total, comparison or summary).

    A strong cue phrase (``in total``, ``overall``, ``to sum up``, ``of these``,
    ...) suffices. A superlative (``the most``, ``the heaviest``) needs a word
    found in exactly one earlier part (an entity named there); a weak cue
    (``than``, ``both``, ``all``, ...) needs such words from two earlier parts.
    """
    if not earlier or part.lstrip().startswith("```"):
        return False
    if STRONG_CUES.search(part):
        return True
    superlative, weak = SUPERLATIVES.search(part), WEAK_CUES.search(part)
    if not (superlative or weak):
        return False
    sets = [_content_words(e) for e in earlier]
    seen = Counter(w for s in sets for w in s)
    mine = _content_words(part)
    refs = sum(any(seen[w] == 1 for w in s & mine) for s in sets)
    return refs >= 2 or (superlative is not None and refs >= 1)


@dataclass
class HeuristicAnnotator(Annotator):
    """Offline annotator: parts from line breaks, topics from labels, syncs from cue phrases.

    Attributes:
        spec: Tag strings, length unit and topic size.
        count_tokens: Token counter for planned lengths (the synthetic set's by default).
        max_part_tokens: Lines longer than this are split into sentences.
        topic_words: Content words in a topic without a label (capped by the spec).
    """

    spec: TagSpec = field(default_factory=TagSpec)
    count_tokens: Callable[[str], int] = default_count_tokens
    max_part_tokens: int = 60
    topic_words: int = 2

    def annotate(self, prompt: str, response: str) -> TaggedResponse:
        """Tag one response (see :class:`Annotator`)."""
        check_plain(response, self.spec)
        parts = split_parts(response, self.max_part_tokens, count_tokens=self.count_tokens)
        rounds = [Round([], [])]
        for k, part in enumerate(parts):
            if rounds[-1].spans and depends_on_earlier(part, parts[:k]):
                rounds[-1].sync = True
                rounds.append(Round([], []))
            topic = topic_of(part, self.spec.max_topic_words, self.topic_words)
            rounds[-1].entries.append(PlanEntry(topic, self.spec.units(self.count_tokens(part))))
            rounds[-1].spans.append(part)
        return TaggedResponse(rounds=rounds, end=True)


def span_structure(tagged: TaggedResponse) -> list[tuple[str, bool]]:
    """``(span text, preceded by <sync/>)`` for every span, in order."""
    out: list[tuple[str, bool]] = []
    synced = False
    for rnd in tagged.rounds:
        for k, span in enumerate(rnd.spans):
            out.append((span, synced and k == 0))
        synced = rnd.sync
    return out


def structure_agreement(examples: Iterable[dict], annotator: Annotator) -> float:
    """Fraction of bundled examples (with ``parts``) whose structure the annotator recovers.

    An example agrees when the spans are exactly its parts (each ``\\n``
    separator inside the span before it) and a ``<sync/>`` stands exactly
    before the parts marked ``depends``. ``0.0`` for no examples.
    """
    n = good = 0
    for ex in examples:
        n += 1
        parts = ex["parts"]
        truth = [(p["text"] + ("\n" if k < len(parts) - 1 else ""), bool(p["depends"]) and k > 0)
                 for k, p in enumerate(parts)]
        out = annotator.outcome(ex["prompt"], ex["response"])
        good += out.tagged is not None and span_structure(out.tagged) == truth
    return good / n if n else 0.0


# --------------------------------------------------------------------------- files

#: discard reasons of a transient failure (the endpoint was down or erred), retried by a re-run
RETRY_REASONS = frozenset({"request_failed"})


@dataclass
class Summary:
    """What :func:`annotate_file` did (counts cover the whole output, resumed rows included)."""

    output: str
    rows: int = 0
    kept: int = 0
    resumed: int = 0
    retried: int = 0
    discarded: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lost = sum(self.discarded.values())
        earlier = [f"{self.resumed} resumed from an earlier run"] if self.resumed else []
        earlier += [f"{self.retried} failed requests retried"] if self.retried else []
        lines = [f"annotated {self.rows} rows -> {self.output}: kept {self.kept}, discarded {lost}"
                 + (f" ({', '.join(earlier)})" if earlier else "")]
        lines += [f"  {reason}: {n}" for reason, n in self.discarded.most_common()]
        if lost:
            lines.append(f"  rejected rows (with reasons): {self.output}.rejected.jsonl")
        return "\n".join(lines)


def _scan_partial(path: Path) -> int:
    """Complete rows of a ``.partial`` file; a torn last line (interrupted write) is cut off."""
    if not path.exists():
        return 0
    n = good = 0
    with path.open("rb") as f:
        for raw in f:
            try:
                json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n"):
                break
            n, good = n + 1, good + len(raw)
    if good != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good)
    return n


def _jsonl(path: Path) -> Iterator[Any]:
    if path.exists():
        with path.open(encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)


def _complete_jsonl(path: Path) -> Iterator[Any]:
    """Rows of a finished output; ValueError at the first line that is not a complete JSON object."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                row = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise ValueError(f"line {n} is not a complete JSON object")
            yield row


def _mismatch(src: Path, kept: Iterator[Any], rejected: list[Any], done: int) -> str | None:
    """Why ``kept`` + ``rejected`` rows are not the annotated first ``done`` rows of ``src`` (None if they are).

    Every input row must be a rejected one (by ``line``, still holding what was
    rejected there: an input fixed in place is not done) or have the next kept
    row: the same fields plus a string ``tagged``. No row may be left over.
    """
    by_line = {r.get("line"): r for r in rejected if isinstance(r, dict)}
    skipped = 0
    for k, line in itertools.islice(_nonblank(src), done):
        if k in by_line:
            if not _rejected_here(by_line[k], line):
                return f"input line {k} changed since it was rejected"
            skipped += 1
            continue
        row, prev = _parse_row(line, "")[0], next(kept, None)
        if (row is None or not isinstance(prev, dict) or not isinstance(prev.get("tagged"), str)
                or {**prev, "tagged": None} != {**row, "tagged": None}):
            return f"at input line {k}"
    if skipped != len(rejected) or next(kept, None) is not None:
        return "it has more rows than the input"
    return None


def _rejected_here(record: dict[str, Any], line: str) -> bool:
    """Whether a rejected row's record is of this input line: its ``raw`` text (a bad row) or its ``row``."""
    if "raw" in record:
        return record["raw"] == line.rstrip("\n")
    try:
        return "row" in record and record["row"] == json.loads(line)
    except ValueError:
        return False


def _first_retry(rejected: list[Any]) -> int | None:
    """Index of the first rejected row whose request failed (retried on a re-run), None if none did."""
    return next((i for i, r in enumerate(rejected) if isinstance(r, dict)
                 and r.get("reason") in RETRY_REASONS and isinstance(r.get("line"), int)), None)


def _resume_point(src: Path, n_kept: int, rejected: list[Any]) -> tuple[int, int, list[Any], int]:
    """``(input rows done, kept rows, rejected rows, failed rows retried)`` to resume from.

    Rows are written in input order and a run resumes after the first ``done``
    input rows, so a failed request is retried by resuming at the first failed
    row: the rows before it stay, every row from it on is done again (kept ones
    too; an LLM cache makes that cheap). Those rows are never checked against
    the input, since nothing of them is kept.
    """
    first = _first_retry(rejected)
    if first is None:
        return n_kept + len(rejected), n_kept, rejected, 0
    line = rejected[first]["line"]
    done = sum(1 for k, _ in _nonblank(src) if k < line)
    retried = sum(isinstance(r, dict) and r.get("reason") in RETRY_REASONS for r in rejected[first:])
    return done, done - first, rejected[:first], retried


def _keep_first_rows(path: Path, n: int) -> None:
    """Cut a ``.partial`` file after its first ``n`` rows."""
    if path.exists():
        with path.open("r+b") as f:
            for _ in range(n):
                f.readline()
            f.truncate(f.tell())


def _nonblank(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        yield from ((k, line) for k, line in enumerate(f, start=1) if line.strip())


def _parse_row(line: str, where: str) -> tuple[dict[str, Any] | None, str, str]:
    """``(row, prompt, response)``, or ``(None, "", error)`` for a bad row.

    Prompt and response are read as training reads them
    (:func:`~pdlightning.data.sources.normalise_row`), so every row form it
    accepts is annotated, and a SlimOrca system turn stays out of the prompt,
    as it does there. An answer already carrying plan tags is passed on, to be
    rejected as ``contains_tag``.
    """
    from pdlightning.data.sources import normalise_row  # here: sources imports ``datasets``

    try:
        row = json.loads(line)
    except ValueError as e:
        return None, "", f"{where}: not valid JSON ({e})"
    if not isinstance(row, dict):
        return None, "", f"{where}: expected a JSON object, got {type(row).__name__}"
    norm = normalise_row(row)
    prompt, response = norm["prompt"], norm["response"] if norm["response"] is not None else norm["tagged"]
    for kind, value in (("prompt", prompt), ("answer", response)):
        if not isinstance(value, str):
            return None, "", f"{where}: {_field_problem(row, kind, value)}"
    return row, prompt, response


def _field_problem(row: dict[str, Any], kind: str, value: Any) -> str:
    """Why the ``prompt`` or ``answer`` of ``row`` is not text, named as the row's form names it."""
    from pdlightning.data.sources import ANSWER_FIELDS, PROMPT_FIELDS

    if value is not None and value is row.get("tagged"):
        return f"field 'tagged' is {type(value).__name__}, not a string"
    if row.get("conversations") is not None:
        turn = "human" if kind == "prompt" else "gpt"
        return (f"'conversations' has no {turn!r} turn" if value is None
                else f"the {turn!r} turn's value is {type(value).__name__}, not a string")
    names = PROMPT_FIELDS if kind == "prompt" else ANSWER_FIELDS
    present = [n for n in names if n in row]
    if present:
        return f"field {present[0]!r} is {type(value).__name__}, not a string"
    if kind == "answer":  # named as most rows name it
        names = ("response", *(n for n in names if n != "response"))
    return f"missing field {names[0]!r} (or {' or '.join(map(repr, names[1:]))})"


def annotate_file(
    input: str | Path, output: str | Path, annotator: Annotator, resume: bool = True,
    progress: bool = True,
) -> Summary:
    """Tag a JSONL file of rows in any form training reads (``prompt`` + ``response`` or
    ``completion``, SlimOrca ``conversations``, ...; see :func:`_parse_row`).

    Writes every kept row with its original fields plus ``tagged`` (canonical
    text) to ``output + ".partial"`` as it goes, discarded rows (with ``line``,
    ``reason``, ``detail`` and the ``row``, or the ``raw`` line of a bad row) to
    ``output + ".rejected.jsonl.partial"``, and renames both at the end, so
    ``output`` only ever exists complete. Rows are written in input order; a
    re-run resumes after the rows already written, or at the first row whose
    request failed (:data:`RETRY_REASONS`), redoing every row from it on.

    Args:
        input: Input JSONL path.
        output: Output JSONL path.
        annotator: The annotator (its ``spec`` renders the tagged text).
        resume: Continue an interrupted (or finished) run instead of starting over. An
            existing ``output`` is only ever replaced when it is a finished run on this
            input or on its first rows (rows added to the input since are then
            annotated); it is reopened as a copy, so it stays whole until the run
            ends. ``resume=False`` replaces it.
        progress: Show a tqdm progress bar on stderr.

    Raises:
        FileNotFoundError: The input does not exist.
        ValueError: A partial output does not match the input (it changed since, a
            rejected row included), an existing output is not a finished run on this
            input or its first rows (it is left as it was),
            the output is a directory, or the output (or one of its side files) is the input.
    """
    from tqdm import tqdm

    src, out = Path(input), Path(output)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: input file not found")
    partial = out.with_name(out.name + ".partial")
    rejected = out.with_name(out.name + ".rejected.jsonl")
    rejected_partial = rejected.with_name(rejected.name + ".partial")
    for p in (out, partial, rejected, rejected_partial):  # resuming would move the input away
        if p.exists() and p.samefile(src):
            raise ValueError(f"{out}: the output would overwrite the input {src}; write it to another file")
    if out.is_dir():
        raise ValueError(f"{out}: --output is a directory; name a file")
    summary = Summary(output=str(out), rows=sum(1 for _ in _nonblank(src)))
    if not resume:
        for p in (partial, rejected_partial):
            p.unlink(missing_ok=True)
    elif out.exists():
        # the final rename replaces it: only if it is a finished run on this input, or on
        # its first rows (rows were added to the input since), which this run extends
        try:
            rejected_rows = list(_complete_jsonl(rejected)) if rejected.exists() else []
            covered = sum(1 for _ in _complete_jsonl(out)) + len(rejected_rows)
            with closing(_complete_jsonl(out)) as rows:
                problem = ("it has more rows than the input" if covered > summary.rows
                           else "it is empty" if covered == 0 < summary.rows
                           else _mismatch(src, rows, rejected_rows, covered))
        except ValueError as e:
            problem = str(e)
        if problem:
            raise ValueError(f"{out} already exists and is not an annotate output of {src} ({problem}); "
                             "nothing was changed: choose another --output, or pass --no-resume to replace it")
        if not partial.exists():  # reopen a copy: ``out`` stays whole until the final rename
            if rejected.exists():
                shutil.copyfile(rejected, rejected_partial)
            else:
                rejected_partial.unlink(missing_ok=True)
            shutil.copyfile(out, partial)  # last: a .partial exists only with its rejected rows
    out.parent.mkdir(parents=True, exist_ok=True)
    n_kept = _scan_partial(partial)
    _scan_partial(rejected_partial)
    rejected_before = list(_jsonl(rejected_partial))
    done, n_kept, rejected_before, summary.retried = _resume_point(src, n_kept, rejected_before)
    summary.resumed, summary.kept = done, n_kept
    summary.discarded.update(r.get("reason", "unknown") for r in rejected_before if isinstance(r, dict))

    # the rows written before must be the first rows of the input, in order
    with closing(_jsonl(partial)) as kept_rows:
        problem = ("it has more rows than the input" if done > summary.rows
                   else "a failed row is out of place" if n_kept < 0
                   else _mismatch(src, itertools.islice(kept_rows, n_kept), rejected_before, done))
    if problem:
        raise ValueError(f"{partial} does not match {src} ({problem}): the input changed since the "
                         f"interrupted run; delete {partial} or pass --no-resume")
    if summary.retried:
        # kept rows first: killed in between, the rejected file still names the same first
        # failed row, so the next run cuts at the same place
        _keep_first_rows(partial, n_kept)
        _keep_first_rows(rejected_partial, len(rejected_before))
    lines = itertools.islice(_nonblank(src), done, None)

    queue: deque[tuple[int, dict[str, Any] | None, str, str]] = deque()

    def todo() -> Iterator[tuple[str, str]]:
        for k, line in lines:
            row, prompt, response = _parse_row(line, f"{src}:{k}")
            queue.append((k, row, line, response if row is None else ""))
            if row is not None:
                yield prompt, response

    def reject(fr: Any, k: int, reason: str, detail: str, payload: dict[str, Any]) -> None:
        fr.write(json.dumps({"line": k, "reason": reason, "detail": detail, **payload}, ensure_ascii=False) + "\n")
        fr.flush()
        summary.discarded[reason] += 1
        if len(summary.first_errors) < 5:
            summary.first_errors.append(detail)

    def flush_bad(fr: Any) -> None:
        while queue and queue[0][1] is None:
            k, _, line, detail = queue.popleft()
            reject(fr, k, "bad_row", detail, {"raw": line.rstrip("\n")})
            bar.update()

    spec = getattr(annotator, "spec", PRESETS["paper"])
    with (
        partial.open("a", encoding="utf-8") as fo,
        rejected_partial.open("a", encoding="utf-8") as fr,
        tqdm(total=summary.rows, initial=done, disable=not progress, desc="annotate", unit="row") as bar,
        closing(annotator.annotate_many(todo())) as outcomes,
    ):
        for result in outcomes:
            flush_bad(fr)
            k, row, _, _ = queue.popleft()
            assert row is not None
            if result.tagged is not None:
                fo.write(json.dumps({**row, "tagged": render(result.tagged, spec)}, ensure_ascii=False) + "\n")
                fo.flush()
                summary.kept += 1
            else:
                reason = result.reason or "unknown"
                reject(fr, k, reason, f"{src}:{k}: {result.detail}", {"row": row})
            bar.update()
        flush_bad(fr)
    if sum(summary.discarded.values()):
        os.replace(rejected_partial, rejected)
    else:
        rejected_partial.unlink(missing_ok=True)
        rejected.unlink(missing_ok=True)
    os.replace(partial, out)
    return summary


# --------------------------------------------------------------------------- command


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlightning annotate",
        description="Tag plain JSONL responses with plan entries, spans and syncs.",
    )
    p.add_argument("--input", required=True, help="JSONL with 'prompt' and 'response' (or 'completion'), "
                   "or SlimOrca 'conversations' (any form training reads)")
    p.add_argument("--output", required=True, help="JSONL to write (original fields plus 'tagged')")
    p.add_argument("--annotator", choices=("heuristic", "llm"), default="heuristic")
    p.add_argument("--tag-preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or api.openai.com)")
    p.add_argument("--model", help="chat model name (llm annotator)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (llm annotator)")
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--cache-dir", help="cache replies here (llm annotator)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``pdlightning annotate``: tag a JSONL file and print the summary.

    Args:
        argv: Arguments without the subcommand (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when no row was kept, 2 for bad input, 130 when interrupted.
    """
    parser = _build_parser()
    a = parser.parse_args(argv)
    spec = TagSpec.preset(a.tag_preset)
    if a.annotator == "llm" and not a.model:
        parser.error("--model is required with --annotator llm")
    try:
        annotator: Annotator = HeuristicAnnotator(spec=spec)
        if a.annotator == "llm":
            from pdlightning.data.llm_annotator import LLMAnnotator

            annotator = LLMAnnotator(
                a.base_url, a.model, api_key_env=a.api_key_env, max_concurrency=a.concurrency,
                max_retries=a.max_retries, timeout_s=a.timeout, cache_dir=a.cache_dir, spec=spec,
            )
        summary = annotate_file(a.input, a.output, annotator, resume=not a.no_resume,
                                progress=not a.no_progress)
    except (OSError, ValueError) as e:
        print(f"pdlightning annotate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pdlightning annotate: interrupted; progress kept in {a.output}.partial, "
              "run the same command again to resume", file=sys.stderr)
        return 130
    for err in summary.first_errors:
        print(f"discarded: {err}", file=sys.stderr)
    print(summary)
    return 1 if summary.rows and not summary.kept else 0


if __name__ == "__main__":
    sys.exit(main())
