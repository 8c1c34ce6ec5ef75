"""Annotate responses with any OpenAI-compatible chat-completions endpoint.

The model is asked to wrap every part of a response in
``<async topic="..." tokens="N">...</async>`` and to put ``<sync/>`` before a
part that needs earlier ones, changing nothing else. Its reply is converted
with :func:`pdlightning.tags.from_pasta` and kept only if the span contents
give back the response character for character (whitespace the model moved
between spans is put back inside them); anything else is discarded as
``text_changed`` or with the :class:`~pdlightning.tags.TagError` rule broken.

Requests are retried with exponential backoff on 429, 5xx, timeouts and
connection errors; :meth:`LLMAnnotator.annotate_many` runs a bounded number of
them in parallel; valid replies are cached on disk. The API key is read from
the environment at request time and never stored, logged or cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pdlightning.data.annotate import (
    AnnotationError,
    Annotator,
    Outcome,
    check_plain,
    default_count_tokens,
)
from pdlightning.tags import (
    PlanEntry,
    Round,
    TaggedResponse,
    TagSpec,
    from_pasta,
    parse,
    render,
    strip,
)

SYSTEM_PROMPT = """\
You mark up answers written by an assistant so that they can be generated in parallel.
Split the answer into its natural parts: a paragraph, a list item, a step, or one self-contained
sentence about one fact. Wrap each part, in order, as
<async topic="T" tokens="N">PART</async>
where T names the part in one to three plain lowercase words and N estimates how many tokens
the part has. Write <sync/> between two parts only when the later part cannot be written
without reading the earlier ones (a total, a comparison, a summary or a conclusion that uses
them); parts that can be written independently get no <sync/>.
Rules:
- Copy the answer exactly: every character, space, line break and punctuation mark stays as it
  is and in the same order. Do not fix, shorten, reword, translate or add anything.
- Keep each line break inside the part it ends (just before </async>).
- Output nothing outside the tags: no preamble, no explanation, no code fences.
"""

USER_TEMPLATE = """\
Example. Answer:
Ann is 31 years old.
She lives in Rome.
In short, Ann is a 31-year-old from Rome.
Marked up:
<async topic="age" tokens="7">Ann is 31 years old.
</async><async topic="home city" tokens="5">She lives in Rome.
</async><sync/><async topic="summary" tokens="12">In short, Ann is a 31-year-old from Rome.</async>

Now mark up the answer below. It answers this instruction (for context only):
<<<INSTRUCTION
{prompt}
INSTRUCTION>>>

Answer to mark up (between the markers, without the marker lines):
<<<ANSWER
{response}
ANSWER>>>
"""

#: changes whenever the instructions change, so cached replies are never reused across them
INSTRUCTION_VERSION = "pasta-1-" + hashlib.sha256((SYSTEM_PROMPT + USER_TEMPLATE).encode()).hexdigest()[:10]

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
_TOPIC_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_FENCE = re.compile(r"^\s*```[\w-]*\n(?P<body>.*)\n```\s*$", re.DOTALL)


class _Retryable(Exception):
    """A failure worth another attempt (``retry_after``: seconds the server asked for)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _endpoint(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def realign(spans: list[str], response: str) -> list[str] | None:
    """Put whitespace the model left between or around spans back inside them.

    Args:
        spans: Span contents in order.
        response: The original response.

    Returns:
        Spans whose concatenation is ``response`` (each whitespace gap joins the
        span before it; a leading gap joins the first span), or ``None`` if any
        non-whitespace character differs.
    """
    out: list[str] = []
    pos = 0
    for span in spans:
        start = pos
        while not response.startswith(span, start):
            if start < len(response) and response[start].isspace():
                start += 1
            else:
                return None
        gap = response[pos:start]
        if out:
            out[-1] += gap
            out.append(span)
        else:
            out.append(gap + span)
        pos = start + len(span)
    rest = response[pos:]
    if not out or rest.strip():
        return None
    out[-1] += rest
    return out


class LLMAnnotator(Annotator):
    """Annotator backed by an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: Endpoint base (``http://host:port/v1``) or the full
            ``.../chat/completions`` URL.
        model: Model name sent with every request.
        api_key_env: Environment variable holding the API key (none sent if unset).
        max_concurrency: Requests in flight in :meth:`annotate_many`.
        max_retries: Extra attempts after a retryable failure.
        timeout_s: Seconds to wait for one request.
        cache_dir: Folder for cached valid replies (JSON files); ``None``: no cache.
        temperature: Sampling temperature.
        spec: Tag spec of the result (length unit, topic size).
        count_tokens: Token counter for a missing ``tokens`` attribute and ``relength``.
        relength: Replace the model's token estimates by counted lengths.
        backoff_s: First retry delay; doubles each attempt (with jitter).
        max_backoff_s: Upper bound of one delay.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 4,
        max_retries: int = 4,
        timeout_s: float = 60,
        cache_dir: str | Path | None = None,
        temperature: float = 0.0,
        spec: TagSpec | None = None,
        count_tokens: Callable[[str], int] | None = None,
        relength: bool = False,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0 and timeout_s > 0")
        self.url = _endpoint(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.temperature = temperature
        self.spec = spec or TagSpec()
        self.count_tokens = count_tokens or default_count_tokens
        self.relength = relength
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.requests = 0  # HTTP requests sent (attempts included)
        self._lock = threading.Lock()
        # PASTA replies always use the paper's sync string; length unit and topic size are ours
        self._pasta_spec = TagSpec(length_unit=self.spec.length_unit, max_topic_words=self.spec.max_topic_words)

    def __repr__(self) -> str:
        return f"LLMAnnotator(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    # ------------------------------------------------------------------ request

    def messages(self, prompt: str, response: str) -> list[dict[str, str]]:
        """The chat messages sent for one response."""
        user = USER_TEMPLATE.format(prompt=prompt, response=response)
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def cache_key(self, prompt: str, response: str) -> str:
        """Hash of (model, prompt, response, instruction version)."""
        blob = json.dumps([self.model, prompt, response, INSTRUCTION_VERSION], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace") if e.fp else ""
            message = f"HTTP {e.code} from {self.url}: {detail}".strip()
            if e.code in _RETRY_STATUS:
                after = e.headers.get("Retry-After") if e.headers else None
                raise _Retryable(message, float(after) if after and after.isdigit() else None) from None
            raise AnnotationError("request_failed", message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__} from {self.url}: {e}") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"reply from {self.url} is not a chat completion: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise _Retryable(f"reply from {self.url} has no text content")
        return content

    def complete(self, prompt: str, response: str) -> str:
        """The model's raw reply for one response, with retries and backoff.

        Raises:
            AnnotationError: ``request_failed`` after the last attempt, or at
                once for a non-retryable HTTP status (e.g. 400, 401, 404).
        """
        payload = {"model": self.model, "temperature": self.temperature,
                   "messages": self.messages(prompt, response)}
        body = json.dumps(payload, ensure_ascii=False).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.max_backoff_s))
                time.sleep(delay)
            except AnnotationError as e:
                raise AnnotationError("request_failed", self._redact(str(e))) from None
        raise AnnotationError(
            "request_failed", self._redact(f"gave up after {self.max_retries + 1} attempt{'s' if self.max_retries else ''}: {last}")
        )

    # ------------------------------------------------------------------ cache

    def _cache_path(self, prompt: str, response: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.cache_key(prompt, response)}.json"

    def _cache_get(self, path: Path | None) -> str | None:
        if path is None or not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        reply = entry.get("reply") if isinstance(entry, dict) else None
        return reply if isinstance(reply, str) and entry.get("version") == INSTRUCTION_VERSION else None

    def _cache_put(self, path: Path | None, reply: str) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"version": INSTRUCTION_VERSION, "model": self.model, "reply": reply}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ validation

    def parse_reply(self, reply: str, response: str) -> TaggedResponse:
        """Validate a reply and convert it to the canonical tagged response.

        Raises:
            TagError: The reply breaks a rule of the tag language.
            AnnotationError: ``text_changed`` if its spans do not give back ``response``.
        """
        fenced = _FENCE.match(reply)
        if fenced and "<async" in fenced.group("body"):
            reply = fenced.group("body")
        pasta = from_pasta(reply, self._pasta_spec, count_tokens=self.count_tokens)
        spans = realign(pasta.span_texts(), response)
        if spans is None:
            raise AnnotationError("text_changed", "the reply's spans do not reproduce the response exactly")
        texts = iter(spans)
        rounds = []
        for rnd in pasta.rounds:
            new_spans = [next(texts) for _ in rnd.spans]
            entries = [
                PlanEntry(
                    " ".join(_TOPIC_WORD.findall(e.topic.lower())),
                    self.spec.units(self.count_tokens(s)) if self.relength else e.length,
                )
                for e, s in zip(rnd.entries, new_spans, strict=True)
            ]
            rounds.append(Round(entries, new_spans, rnd.sync))
        tagged = TaggedResponse(rounds=rounds, end=True)
        if strip(tagged, self.spec) != response or parse(render(tagged, self.spec), self.spec) != tagged:
            raise AnnotationError("text_changed", "the tagged response does not round-trip to the response")
        return tagged

    # ------------------------------------------------------------------ annotation

    def annotate(self, prompt: str, response: str) -> TaggedResponse:
        """Tag one response (cached reply if any, else one request with retries)."""
        check_plain(response, self.spec)
        path = self._cache_path(prompt, response)
        reply = self._cache_get(path)
        if reply is not None:
            return self.parse_reply(reply, response)
        reply = self.complete(prompt, response)
        tagged = self.parse_reply(reply, response)
        self._cache_put(path, reply)  # only valid replies: an invalid one is asked again next run
        return tagged

    def outcome(self, prompt: str, response: str) -> Outcome:
        """:meth:`annotate` with failures as an :class:`Outcome` (API key redacted)."""
        result = super().outcome(prompt, response)
        result.detail = self._redact(result.detail)
        return result

    def annotate_many(self, rows: Iterable[tuple[str, str]]) -> Iterator[Outcome]:
        """Annotate with up to ``max_concurrency`` requests in flight, yielding in input order."""
        window = 2 * self.max_concurrency
        pending: deque[Future[Outcome]] = deque()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="llm-annotate")
        try:
            for prompt, response in rows:
                pending.append(pool.submit(self.outcome, prompt, response))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
