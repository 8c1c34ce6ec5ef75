"""Tests of the annotators and ``pdlightning annotate`` (``pdlightning.data.annotate``).

The LLM annotator talks to a real HTTP server on 127.0.0.1 that speaks the
OpenAI chat-completions protocol and annotates deterministically.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.data import synthetic as syn
from pdlightning.data.annotate import (
    AnnotationError,
    HeuristicAnnotator,
    annotate_file,
    main,
    span_structure,
    split_parts,
    structure_agreement,
    topic_of,
)
from pdlightning.data.llm_annotator import INSTRUCTION_VERSION, LLMAnnotator, realign
from pdlightning.tags import TagError, TagSpec, parse, render, strip

SECRET = "sk-test-DO-NOT-LEAK-4242"


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return syn.generate_split("train", 1000, seed=0)


def _roundtrip(tagged: Any, spec: TagSpec) -> str:
    return strip(parse(render(tagged, spec), spec, require_end=True), spec)


# --------------------------------------------------------------------------- heuristic


def test_heuristic_recovers_the_bundled_structure(examples: list[dict]) -> None:
    ann = HeuristicAnnotator()
    assert structure_agreement(examples, ann) >= 0.95
    assert structure_agreement(syn.generate_split("test", 200), ann) >= 0.95
    depends = [e for e in examples if e["parts"][-1]["depends"]]
    assert len(depends) >= 150  # the sync decision is really exercised
    assert structure_agreement(depends, ann) >= 0.95


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_heuristic_roundtrip_lengths_and_topics(examples: list[dict], preset: str) -> None:
    spec = TagSpec.preset(preset)
    ann = HeuristicAnnotator(spec=spec)
    for ex in examples[:300]:
        tagged = ann.annotate(ex["prompt"], ex["response"])
        assert _roundtrip(tagged, spec) == ex["response"]
        for entry, span in zip(tagged.entries(), tagged.span_texts(), strict=True):
            assert 1 <= len(entry.topic.split()) <= spec.max_topic_words
            assert entry.length == spec.units(syn.count_tokens(span))


def test_heuristic_topics_and_syncs_on_hand_written_examples() -> None:
    ann = HeuristicAnnotator()
    text = ("Step one: clean the frame, which takes about 5 minutes.\n"
            "Step two is to check the tires, for about 12 minutes.\n"
            "In total, the task takes about 17 minutes.")
    tagged = ann.annotate("Fix a bike.", text)
    assert [e.topic for e in tagged.entries()] == ["step one", "step two", "total task"]
    assert [s for _, s in span_structure(tagged)] == [False, False, True]
    assert render(tagged).startswith("<topic>step one 2</topic><topic>step two 2</topic><async>Step one:")
    # a comparison refers back to two earlier parts; a plain fact with "than" does not
    fox = "The fox is red and lives in the forest.\nThe owl is gray and lives in the forest.\n"
    assert span_structure(ann.annotate("", fox + "The fox is heavier than the owl."))[-1][1]
    assert not span_structure(ann.annotate("", fox + "It sleeps more than ten hours a day."))[-1][1]
    assert topic_of("**Sleep:** eight hours") == "sleep"
    assert topic_of("Here are some tips:\n1. Drink water daily.") == "drink water"


def test_heuristic_splits_general_text() -> None:
    text = ("Here are some tips:\n\n1. Sleep eight hours every night.\n2. Exercise for thirty minutes.\n\n"
            "```python\ndef f(x):\n\n    return x\n```\n" + "This is a long sentence with many words in it. " * 12)
    parts = split_parts(text)
    assert "".join(parts) == text
    assert parts[0].startswith("Here are some tips:\n\n1. Sleep")  # the header joins its first item
    assert any(p.startswith("```python") and p.endswith("```\n") for p in parts)  # code block kept whole
    assert len(parts) >= 5 and all(syn.count_tokens(p) <= 60 for p in parts[3:])  # long line cut at sentences


def test_heuristic_rejects_empty_and_tagged_responses() -> None:
    ann = HeuristicAnnotator()
    with pytest.raises(TagError) as err:
        ann.annotate("p", " \n ")
    assert err.value.rule == "empty_response"
    with pytest.raises(AnnotationError) as err2:
        ann.annotate("p", "a <sync/> b")
    assert err2.value.reason == "contains_tag"
    assert ann.outcome("p", "x </async>").reason == "contains_tag"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Cd.!?:-*1\n\t`#é")), max_size=300))
def test_heuristic_roundtrip_any_text(text: str) -> None:
    out = HeuristicAnnotator().outcome("p", text)
    if not text.strip():
        assert out.reason == "empty_response"
    else:
        assert out.tagged is not None and _roundtrip(out.tagged, TagSpec()) == text


# --------------------------------------------------------------------------- a local OpenAI-compatible server


def _pasta(response: str) -> str:
    """Deterministic annotation: one span per line; newlines alternately inside and outside the span."""
    out = []
    for k, line in enumerate(re.findall(r"[^\n]*\n|[^\n]+$", response)):
        body, nl = (line[:-1], line[-1:]) if line.endswith("\n") and k % 2 else (line, "")
        sync = "<sync/>" if k and line.startswith(("In total", "Overall", "Altogether")) else ""
        out.append(f'{sync}<async topic="line {k}" tokens="{len(body.split())}">{body}</async>{nl}')
    return "".join(out)


class _Server:
    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: str, headers: dict[str, str] | None = None) -> None:
                data = body.encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout test)
                    self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body: dict) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, '{"error": "not found"}')
                user = body["messages"][-1]["content"]
                response = user[user.index("<<<ANSWER\n") + 10 : user.rindex("\nANSWER>>>")]
                with server.lock:
                    server.seen[response] += 1
                    n = server.seen[response]
                    server.auth.append(self.headers.get("Authorization"))
                time.sleep(server.delay)
                if "SLOW" in response and n == 1:
                    time.sleep(1.5)
                if "RATE" in response and n == 1:
                    return self._send(429, '{"error": "slow down"}', {"Retry-After": "0"})
                if "FAIL" in response and n == 1 or "ALWAYS503" in response:
                    return self._send(500 if "FAIL" in response else 503, '{"error": "oops"}')
                if "GARBAGE" in response and n == 1:
                    return self._send(200, "<html>not json</html>")
                if "ECHOKEY" in response:
                    return self._send(401, json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}))
                content = _pasta(response)
                if "REWRITE" in response:
                    content = content.replace("REWRITE", "rewrite")
                if "UNBALANCED" in response:
                    content = content[: content.rindex("</async>")]
                if "FENCED" in response:
                    content = f"```xml\n{content}\n```"
                reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                return self._send(200, json.dumps(reply))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("PD_TEST_KEY", SECRET)
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _llm(server: _Server, **kw: Any) -> LLMAnnotator:
    args: dict[str, Any] = {"model": "test-model", "api_key_env": "PD_TEST_KEY", "timeout_s": 1.0,
                            "max_retries": 2, "backoff_s": 0.01}
    return LLMAnnotator(server.url, **{**args, **kw})


# --------------------------------------------------------------------------- LLM annotator


def test_llm_roundtrip_on_bundled_examples(server: _Server, examples: list[dict]) -> None:
    ann = _llm(server)
    outs = list(ann.annotate_many((e["prompt"], e["response"]) for e in examples[:40]))
    for ex, out in zip(examples[:40], outs, strict=True):
        assert out.tagged is not None, out
        assert _roundtrip(out.tagged, ann.spec) == ex["response"]
        assert [s for s, _ in span_structure(out.tagged)][:-1] == [p["text"] + "\n" for p in ex["parts"][:-1]]
    assert server.auth and set(server.auth) == {f"Bearer {SECRET}"}


def test_llm_retries_timeouts_429_500_and_bad_bodies(server: _Server) -> None:
    ann = _llm(server)
    for marker in ("SLOW", "RATE", "FAIL", "GARBAGE", "FENCED"):
        text = f"First line about {marker}.\nSecond line here."
        assert strip(ann.annotate("p", text)) == text
        assert server.seen[text] == (1 if marker == "FENCED" else 2), marker
    out = ann.outcome("p", "This ALWAYS503 line.")
    assert out.reason == "request_failed" and "gave up after 3 attempts" in out.detail
    assert server.seen["This ALWAYS503 line."] == 3


def test_llm_discards_malformed_replies(server: _Server, tmp_path: Path) -> None:
    ann = _llm(server, cache_dir=tmp_path / "cache")
    assert ann.outcome("p", "A REWRITE line.\nAnother one.").reason == "text_changed"
    assert ann.outcome("p", "An UNBALANCED line.\nAnother one.").reason == "unbalanced_span"
    assert not list((tmp_path / "cache").glob("*.json"))  # invalid replies are not cached
    assert realign(["a", "b"], "a\n b  ") == ["a\n ", "b  "]
    assert realign(["a", "c"], "a b") is None


def test_llm_cache_hit_sends_no_request(server: _Server, tmp_path: Path) -> None:
    text = "Ann is 31.\nShe lives in Rome.\nOverall, Ann is 31 and from Rome."
    first = _llm(server, cache_dir=tmp_path).annotate("p", text)
    assert server.seen[text] == 1
    assert [s for _, s in span_structure(first)] == [False, False, True]
    again = _llm(server, cache_dir=tmp_path)
    assert again.annotate("p", text) == first and again.requests == 0 and server.seen[text] == 1
    entry = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert entry["version"] == INSTRUCTION_VERSION and entry["model"] == "test-model"
    _llm(server, cache_dir=tmp_path, model="other").annotate("p", text)  # another model: another key
    assert server.seen[text] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_llm_concurrency_is_bounded_and_order_kept(server: _Server) -> None:
    server.delay = 0.1
    rows = [("p", f"Row number {k} is here.\nAnd a second line.") for k in range(12)]
    outs = list(_llm(server, max_concurrency=3).annotate_many(rows))
    assert [strip(o.tagged) for o in outs] == [r for _, r in rows]
    assert 2 <= server.max_in_flight <= 3


def test_llm_api_key_never_leaks(server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": "p", "response": "One fact.\nAnother fact."},
            {"prompt": "p", "response": "ECHOKEY line."},
            {"prompt": "p", "response": "This ALWAYS503 line."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    code = main(["--input", str(src), "--output", str(out), "--annotator", "llm", "--base-url", server.url,
                 "--model", "m", "--api-key-env", "PD_TEST_KEY", "--cache-dir", str(tmp_path / "cache"),
                 "--timeout", "0.5", "--max-retries", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and "kept 1, discarded 2" in captured.out and "request_failed: 2" in captured.out
    assert f"Bearer {SECRET}" in server.auth
    rejected = (tmp_path / "out.jsonl.rejected.jsonl").read_text()
    assert "HTTP 401" in rejected and "***" in rejected
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    for text in [captured.out, captured.err, repr(_llm(server)), *(p.read_text() for p in files)]:
        assert SECRET not in text


# --------------------------------------------------------------------------- annotate_file


class _Counting(HeuristicAnnotator):
    """Heuristic annotator that counts calls and can raise KeyboardInterrupt at call k."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.stop_at = stop_at

    def annotate(self, prompt: str, response: str) -> Any:
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(prompt)
        return super().annotate(prompt, response)


def _write_input(path: Path, examples: list[dict]) -> list[str]:
    lines = [json.dumps({"id": e["id"], "prompt": e["prompt"], "response": e["response"]}) for e in examples]
    lines[3] = "{not json"
    lines[5] = json.dumps({"prompt": "p"})  # no response
    lines[8] = json.dumps({"prompt": "p", "completion": 7})  # wrong type
    lines[10] = json.dumps({"prompt": examples[10]["prompt"], "completion": "Done <sync/> here."})  # a tag
    lines.insert(6, "")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_annotate_file_resumes_after_an_interrupt(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, examples[:20])
    first = _Counting(stop_at=7)
    with pytest.raises(KeyboardInterrupt):
        annotate_file(src, out, first, progress=False)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists() and partial.exists()
    assert not (tmp_path / "out.jsonl.rejected.jsonl").exists()
    assert len(partial.read_text().splitlines()) == 7
    with partial.open("a") as f:
        f.write('{"id": "torn wri')  # an interrupted write: cut off on resume
    second = _Counting()
    summary = annotate_file(src, out, second, progress=False)
    # every row annotated exactly once over both runs (bad rows never reach the annotator)
    assert Counter(first.calls + second.calls) == Counter(e["prompt"] for k, e in enumerate(examples[:20])
                                                          if k not in (3, 5, 8))
    assert summary.rows == 20 and summary.kept == 16 and summary.resumed > 7
    assert summary.discarded == Counter({"bad_row": 3, "contains_tag": 1})
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    want = [e for k, e in enumerate(examples[:20]) if k not in (3, 5, 8, 10)]
    assert [r["id"] for r in kept] == [e["id"] for e in want]
    for row, ex in zip(kept, want, strict=True):
        assert set(row) == {"id", "prompt", "response", "tagged"} and strip(row["tagged"]) == ex["response"]
    rejected = [json.loads(line) for line in (tmp_path / "out.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(4, "bad_row"), (6, "bad_row"), (10, "bad_row"),
                                                            (12, "contains_tag")]
    assert "in.jsonl:4: not valid JSON" in rejected[0]["detail"] and rejected[0]["raw"] == "{not json"
    assert "missing field 'response'" in rejected[1]["detail"]
    assert "'completion' is int" in rejected[2]["detail"]
    assert not partial.exists()
    # a finished run re-run: nothing annotated again, same output
    third = _Counting()
    before = out.read_text()
    again = annotate_file(src, out, third, progress=False)
    assert third.calls == [] and out.read_text() == before and again.kept == 16


def test_annotate_file_refuses_a_changed_input(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": e["prompt"], "response": e["response"]}) + "\n"
                           for e in examples[:6]))
    with pytest.raises(KeyboardInterrupt):
        annotate_file(src, out, _Counting(stop_at=3), progress=False)
    src.write_text("".join(json.dumps({"prompt": e["prompt"], "response": e["response"]}) + "\n"
                           for e in examples[1:7]))
    with pytest.raises(ValueError, match="does not match"):
        annotate_file(src, out, _Counting(), progress=False)
    summary = annotate_file(src, out, _Counting(), resume=False, progress=False)
    assert summary.kept == 6 and summary.resumed == 0


def test_main_heuristic(tmp_path: Path, capsys: pytest.CaptureFixture, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    syn.write_jsonl(examples[:30], src)
    assert main(["--input", str(src), "--output", str(out), "--tag-preset", "official",
                     "--no-progress"]) == 0
    assert "kept 30, discarded 0" in capsys.readouterr().out
    spec = TagSpec.preset("official")
    rows = syn.read_jsonl(out)
    assert all(strip(r["tagged"], spec) == r["response"] and r["tagged"].endswith(spec.end) for r in rows)
    assert rows[0]["parts"] == examples[0]["parts"]  # original fields kept
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
    assert "missing.jsonl: input file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["a list"]\n')
    assert main(["--input", str(bad), "--output", str(tmp_path / "o.jsonl"), "--no-progress"]) == 1
    assert "bad.jsonl:1: expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", str(src), "--output", str(out), "--annotator", "llm"])  # no --model
    # the input named as the output (or as its partial file) is refused, and left as it was
    before = src.read_bytes()
    for target in (src, src.with_name("x.jsonl")):
        if target != src:
            target.with_name(target.name + ".partial").symlink_to(src)
        assert main(["--input", str(src), "--output", str(target), "--no-progress"]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
        assert src.read_bytes() == before


def _plain_input(path: Path, examples: list[dict], n: int = 5) -> list[dict]:
    rows = [{"prompt": e["prompt"], "response": e["response"]} for e in examples[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _assert_untouched(out: Path, before: bytes) -> None:
    assert out.read_bytes() == before
    assert not out.with_name(out.name + ".partial").exists()
    assert not out.with_name(out.name + ".rejected.jsonl.partial").exists()


def test_annotate_refuses_an_existing_text_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                examples: list[dict]) -> None:
    src, notes = tmp_path / "in.jsonl", tmp_path / "notes.txt"
    _plain_input(src, examples)
    notes.write_text("my notes\nline 2\n")
    assert main(["--input", str(src), "--output", str(notes), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt already exists" in err and "nothing was changed" in err and "--no-resume" in err
    _assert_untouched(notes, b"my notes\nline 2\n")
    # --no-resume replaces it, as the message says
    assert main(["--input", str(src), "--output", str(notes), "--no-progress", "--no-resume"]) == 0
    assert len(notes.read_text().splitlines()) == 5


def test_annotate_refuses_an_unrelated_jsonl_output(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _plain_input(src, examples)
    for text in ('{"mine": 1, "tagged": "x"}\n',  # a JSONL file of the user's
                 '{"prompt": "p", "response": "r", "tagged": "t"}\n{"torn',
                 ""):  # an empty file is not the output of a non-empty input either
        out.write_text(text)
        with pytest.raises(ValueError, match=r"out\.jsonl already exists .*nothing was changed"):
            annotate_file(src, out, _Counting(), progress=False)
        _assert_untouched(out, text.encode())
    # a finished run's rows in another order are not this input's annotations
    annotate_file(src, out, _Counting(), resume=False, progress=False)
    swapped = out.read_text().splitlines(keepends=True)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    out.write_text("".join(swapped))
    with pytest.raises(ValueError, match=r"nothing was changed"):
        annotate_file(src, out, _Counting(), progress=False)
    _assert_untouched(out, "".join(swapped).encode())


def test_annotate_extends_a_finished_run_when_rows_are_added(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = _write_input(src, examples[:12])
    src.write_text("\n".join(lines[:7]) + "\n")  # the first 6 rows, two of them bad
    first_calls = _Counting()
    annotate_file(src, out, first_calls, progress=False)
    rejected = tmp_path / "out.jsonl.rejected.jsonl"
    first, first_rejected = out.read_text(), rejected.read_text()
    assert first and first_rejected
    src.write_text("\n".join(lines) + "\n")  # the user appends rows to the input
    with pytest.raises(KeyboardInterrupt):  # a killed extension leaves the first run whole
        annotate_file(src, out, _KilledAtStart(), progress=False)
    assert out.read_text() == first and rejected.read_text() == first_rejected
    calls, fresh_calls = _Counting(), _Counting()
    summary = annotate_file(src, out, calls, progress=False)
    fresh = tmp_path / "fresh.jsonl"
    annotate_file(src, fresh, fresh_calls, progress=False)
    assert summary.resumed == 6 and calls.calls == fresh_calls.calls[len(first_calls.calls):]  # only new rows
    assert calls.calls
    assert out.read_text() == fresh.read_text()  # as if the whole input had been annotated at once
    assert rejected.read_text() == (tmp_path / "fresh.jsonl.rejected.jsonl").read_text()
    assert out.read_text().startswith(first)


def test_annotate_refuses_rows_without_tagged(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _plain_input(src, examples)
    out.write_bytes(src.read_bytes())  # the input copied as the output: not annotated
    calls = _Counting()
    with pytest.raises(ValueError, match=r"out\.jsonl already exists .*input line 1"):
        annotate_file(src, out, calls, progress=False)
    _assert_untouched(out, src.read_bytes())
    out.unlink()
    partial = tmp_path / "out.jsonl.partial"  # nor is an untagged row in a .partial taken as done
    partial.write_text("".join(src.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ValueError, match="does not match"):
        annotate_file(src, out, calls, progress=False)
    assert calls.calls == [] and not out.exists()


def test_annotate_refuses_a_directory_as_output(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "outdir"
    _plain_input(src, examples)
    out.mkdir()
    (out / "keep.txt").write_text("data")
    for resume in (True, False):
        with pytest.raises(ValueError, match=r"outdir: --output is a directory"):
            annotate_file(src, out, _Counting(), resume=resume, progress=False)
        assert (out / "keep.txt").read_text() == "data"
        assert not (tmp_path / "outdir.partial").exists()


class _KilledAtStart(HeuristicAnnotator):
    def annotate_many(self, rows: Any) -> Iterator[Any]:
        raise KeyboardInterrupt
        yield


def test_annotate_rerun_of_a_finished_run_keeps_the_output(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, examples[:12])
    annotate_file(src, out, _Counting(), progress=False)
    rejected = tmp_path / "out.jsonl.rejected.jsonl"
    before, rejected_before = out.read_bytes(), rejected.read_bytes()
    with pytest.raises(KeyboardInterrupt):  # a re-run killed: the finished output is still there
        annotate_file(src, out, _KilledAtStart(), progress=False)
    assert out.read_bytes() == before and rejected.read_bytes() == rejected_before
    calls = _Counting()
    summary = annotate_file(src, out, calls, progress=False)  # and a later re-run finishes it
    assert calls.calls == [] and summary.kept == 8 and summary.resumed == 12
    assert out.read_bytes() == before and rejected.read_bytes() == rejected_before
    assert not (tmp_path / "out.jsonl.partial").exists()


# --------------------------------------------------------------------------- row forms and resume checks


def _conversation(system: str | None, human: str | None, gpt: Any) -> dict:
    turns = [("system", system), ("human", human), ("gpt", gpt)]
    return {"conversations": [{"from": who, "value": value} for who, value in turns if value is not None]}


def test_annotate_reads_slimorca_rows_and_training_keeps_their_tags(tmp_path: Path, examples: list[dict]) -> None:
    from pdlightning.data.sources import load_rows

    src, out = tmp_path / "slim.jsonl", tmp_path / "slim.tagged.jsonl"
    rows = [_conversation("You are helpful.", e["prompt"], e["response"]) for e in examples[:8]]
    rows[2]["conversations"].pop()  # no answer
    rows[5] = _conversation(None, examples[5]["prompt"], 7)  # an answer that is not text
    rows.append({"instruction": examples[8]["prompt"], "output": examples[8]["response"]})  # Alpaca form
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = _Counting()
    summary = annotate_file(src, out, calls, progress=False)
    assert summary.kept == 7 and summary.discarded == Counter({"bad_row": 2})
    # the prompt is the human turn: the system turn stays out of it, as in the data path
    assert calls.calls == [e["prompt"] for k, e in enumerate(examples[:9]) if k not in (2, 5)]
    rejected = [json.loads(line) for line in (tmp_path / "slim.tagged.jsonl.rejected.jsonl").read_text().splitlines()]
    assert "slim.jsonl:3: 'conversations' has no 'gpt' turn" in rejected[0]["detail"]
    assert "slim.jsonl:6: the 'gpt' turn's value is int, not a string" in rejected[1]["detail"]
    tagged = [json.loads(line) for line in out.read_text().splitlines()]
    assert tagged[0] == {**rows[0], "tagged": tagged[0]["tagged"]}  # original fields kept, plus tagged
    assert strip(tagged[0]["tagged"]) == examples[0]["response"]
    # loaded for training, every row keeps the annotator's tags and its system turn
    loaded = load_rows(str(out), tmp_path / "cache", validation_fraction=0.25)
    got = {r["prompt"]: r for split in ("train", "validation") for r in loaded[split]}
    assert len(got) == 7
    for row in tagged:
        prompt = row.get("instruction") or row["conversations"][1]["value"]
        assert got[prompt]["tagged"] == row["tagged"]
        assert got[prompt]["system"] == (None if "instruction" in row else "You are helpful.")


def test_annotate_refuses_a_rejected_row_edited_in_place(tmp_path: Path, examples: list[dict]) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = _write_input(src, examples[:12])
    annotate_file(src, out, _Counting(), progress=False)
    before = out.read_bytes()
    fixed = json.dumps({"prompt": examples[3]["prompt"], "response": examples[3]["response"]})
    for k, edit in ((3, fixed),  # the bad row at input line 4, fixed
                    (11, json.dumps({"prompt": "p", "completion": "Done, with no tag now."}))):  # line 12
        src.write_text("\n".join([*lines[:k], edit, *lines[k + 1:]]) + "\n")
        with pytest.raises(ValueError, match=rf"input line {k + 1} changed since it was rejected.*--no-resume"):
            annotate_file(src, out, _Counting(), progress=False)
        _assert_untouched(out, before)
    # the same in an interrupted run: its .partial is refused
    src.write_text("\n".join(lines) + "\n")
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        annotate_file(src, out, _Counting(stop_at=5), progress=False)  # rows up to line 8 written
    src.write_text("\n".join([*lines[:3], fixed, *lines[4:]]) + "\n")
    calls = _Counting()
    with pytest.raises(ValueError, match=r"does not match .*input line 4 changed since it was rejected.*delete"):
        annotate_file(src, out, calls, progress=False)
    assert calls.calls == []
    summary = annotate_file(src, out, calls, resume=False, progress=False)
    assert summary.kept == 9 and summary.discarded == Counter({"bad_row": 2, "contains_tag": 1})


class _Flaky(_Counting):
    """Counting annotator whose request fails (endpoint down) for the rows with the given prompts."""

    def __init__(self, fail: set[str], stop_at: int | None = None) -> None:
        super().__init__(stop_at)
        self.fail = fail

    def annotate(self, prompt: str, response: str) -> Any:
        tagged = super().annotate(prompt, response)
        if prompt in self.fail:
            raise AnnotationError("request_failed", "HTTP 503 from http://127.0.0.1/v1: down")
        return tagged


def test_annotate_retries_failed_requests(tmp_path: Path, examples: list[dict]) -> None:
    src, out, fresh = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "fresh.jsonl"
    _write_input(src, examples[:12])  # bad rows: 3, 5, 8 (lines 4, 6, 10); a tag in row 10
    annotate_file(src, fresh, _Counting(), progress=False)
    rejected, partial = tmp_path / "out.jsonl.rejected.jsonl", tmp_path / "out.jsonl.partial"
    prompts = [e["prompt"] for e in examples[:12]]
    redone = [prompts[k] for k in (7, 9, 10, 11)]  # every good row from the first failed one (line 9) on

    first = annotate_file(src, out, _Flaky({prompts[7], prompts[9]}), progress=False)
    assert first.discarded["request_failed"] == 2 and first.kept == 6
    calls = _Counting()
    summary = annotate_file(src, out, calls, progress=False)
    assert calls.calls == redone
    assert summary.retried == 2 and summary.resumed == 7 and summary.kept == 8
    assert summary.discarded == Counter({"bad_row": 3, "contains_tag": 1})
    assert "(7 resumed from an earlier run, 2 failed requests retried)" in str(summary)
    assert out.read_bytes() == fresh.read_bytes()
    assert rejected.read_bytes() == (tmp_path / "fresh.jsonl.rejected.jsonl").read_bytes()

    # a killed retry leaves the finished output whole, and a later run finishes it
    annotate_file(src, out, _Flaky({prompts[9]}), resume=False, progress=False)
    before, rejected_before = out.read_bytes(), rejected.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        annotate_file(src, out, _KilledAtStart(), progress=False)
    assert out.read_bytes() == before and rejected.read_bytes() == rejected_before
    calls = _Counting()
    annotate_file(src, out, calls, progress=False)
    assert calls.calls == prompts[9:] and out.read_bytes() == fresh.read_bytes()

    # an interrupted run: its .partial resumes at the failed row too
    with pytest.raises(KeyboardInterrupt):
        annotate_file(src, out, _Flaky({prompts[7]}, stop_at=7), resume=False, progress=False)
    assert '"request_failed"' in (tmp_path / "out.jsonl.rejected.jsonl.partial").read_text()
    calls = _Counting()
    summary = annotate_file(src, out, calls, progress=False)
    assert calls.calls == redone and summary.retried == 1 and out.read_bytes() == fresh.read_bytes()

    # killed between cutting the kept rows and the rejected ones: the next run cuts at the same row
    annotate_file(src, out, _Flaky({prompts[7]}), resume=False, progress=False)
    partial.write_text("".join(out.read_text().splitlines(keepends=True)[:5]))
    (tmp_path / "out.jsonl.rejected.jsonl.partial").write_bytes(rejected.read_bytes())
    calls = _Counting()
    summary = annotate_file(src, out, calls, progress=False)
    assert calls.calls == redone and summary.retried == 1 and out.read_bytes() == fresh.read_bytes()
