"""AlpacaEval path: prompt loading, model_outputs.json, a real local OpenAI-compatible
judge server (with 429/500 retries), and the win rates from alpaca_eval's own code."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pdlightning.eval import alpaca
from pdlightning.eval.alpaca import (
    JudgeConfig,
    JudgeError,
    evaluate_alpaca,
    judge_pairwise,
    load_prompts,
    parse_choice,
    write_model_outputs,
)

SECRET = "sk-test-SECRET-d2f1c0ffee"
KEY_ENV = "PDL_TEST_JUDGE_KEY"
N = 10
MODEL_WINS = {0, 2, 3, 5, 7, 8}  # prompts where the model's output carries the keyword
FLAKY = {1: 429, 4: 500}  # prompt index -> status returned on the first attempt


def _instruction(i: int) -> str:
    return f"Question {i}: explain topic number {i}."


class _JudgeHandler(BaseHTTPRequestHandler):
    """OpenAI chat-completions speaking judge: prefers the output containing ``GOOD``."""

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        if self.headers.get("Authorization") != f"Bearer {srv.expected_key}":
            return self._send(401, {"error": {"message": "bad key"}})
        user = body["messages"][-1]["content"]
        instr = user.split("## Instruction")[1].split("## Output (a)")[0].strip()
        a = user.split("## Output (a)")[1].split("## Output (b)")[0]
        b = user.split("## Output (b)")[1].split("## Task")[0]
        with srv.lock:
            srv.attempts[instr] += 1
            attempt = srv.attempts[instr]
        idx = int(instr.split()[1].rstrip(":"))
        if idx in FLAKY and attempt == 1:
            headers = {"Retry-After": "0"} if FLAKY[idx] == 429 else None
            return self._send(FLAKY[idx], {"error": {"message": "try again"}}, headers)
        assert ("GOOD" in a) != ("GOOD" in b)
        content = "Output (a)" if "GOOD" in a else "**Output (b)** is better."
        self._send(200, {
            "id": f"chatcmpl-{idx}-{attempt}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        })


@pytest.fixture
def judge_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    srv.attempts, srv.lock, srv.expected_key = Counter(), threading.Lock(), SECRET
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def judge(judge_server, monkeypatch) -> JudgeConfig:
    monkeypatch.setenv(KEY_ENV, SECRET)
    port = judge_server.server_address[1]
    return JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="fake-judge",
                       api_key_env=KEY_ENV, max_concurrency=3, timeout_s=5, backoff_s=0.01)


def _model_text(i: int) -> str:
    return f"GOOD answer to {i}, " + "detail " * i if i in MODEL_WINS else f"meh {i}"


def _fake_generate(instructions: list[str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(text=_model_text(int(s.split()[1].rstrip(":"))), seconds=0.5 + 0.1 * k,
                            critical_path=10 + k) for k, s in enumerate(instructions)]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": _instruction(i), "dataset": "toy"}) + "\n"
                               for i in range(N)))
    refs = [{"instruction": _instruction(i), "generator": "ref_model",
             "output": f"meh reference {i}" if i in MODEL_WINS else f"GOOD reference answer {i}"}
            for i in range(N)]
    ref_path = tmp_path / "reference_outputs.json"
    ref_path.write_text(json.dumps(refs))
    return prompts, ref_path


@pytest.fixture
def offline_glm(tmp_path: Path, monkeypatch):
    """Serve a synthetic ``df_gamed.csv`` instead of alpaca_eval's hub download."""
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    rng = np.random.default_rng(0)
    rows = [{"model": m, "index": i, "instruction_difficulty": float(rng.normal()),
             "preference": float(rng.uniform()), "std_delta_len": float(rng.normal()),
             "not_gamed_baseline": False} for m in ("gamed_long", "gamed_short") for i in range(N)]
    path = tmp_path / "df_gamed.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    monkeypatch.setattr(glm, "hf_hub_download", lambda **kw: str(path))
    return glm


def test_load_prompts_json_jsonl_and_limit(tmp_path: Path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"instruction": "a", "dataset": "d", "output": "x"}, {"instruction": "b"}]))
    assert load_prompts(str(p)) == [{"instruction": "a", "dataset": "d"}, {"instruction": "b"}]
    q = tmp_path / "p.jsonl"
    q.write_text('{"instruction": "a"}\n\n{"instruction": "b"}\n{"instruction": "c"}\n')
    assert [r["instruction"] for r in load_prompts(str(q), limit=2)] == ["a", "b"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_load_prompts_missing_instruction_raises(tmp_path: Path, suffix: str):
    rows = [{"instruction": "ok"}, {"prompt": "no instruction here"}]
    p = tmp_path / f"bad{suffix}"
    p.write_text(json.dumps(rows) if suffix == ".json" else "\n".join(map(json.dumps, rows)))
    with pytest.raises(ValueError, match=r"bad\.jsonl?.*row 1.*instruction"):
        load_prompts(str(p))


def test_write_model_outputs_objects_and_dicts(tmp_path: Path):
    prompts = [{"instruction": "a", "dataset": "d"}, {"instruction": "b"}]
    gens = [SimpleNamespace(text="x", seconds=1.5, critical_path=7),
            {"text": "y", "seconds": 2, "critical_path": 3}]
    path = tmp_path / "out" / "model_outputs.json"
    write_model_outputs(prompts, gens, path, generator="pd")
    assert json.loads(path.read_text()) == [
        {"instruction": "a", "output": "x", "generator": "pd", "dataset": "d", "latency_s": 1.5,
         "critical_path": 7},
        {"instruction": "b", "output": "y", "generator": "pd", "latency_s": 2.0, "critical_path": 3},
    ]
    assert [f.name for f in path.parent.iterdir()] == ["model_outputs.json"]  # no temp file left
    with pytest.raises(ValueError, match="2 prompts but 1"):
        write_model_outputs(prompts, gens[:1], path, generator="pd")


@pytest.mark.parametrize(("reply", "choice"), [
    ("Output (a)", "a"), ("output (B)", "b"), ("**Output (b)** is better.", "b"), ("Output b", "b"),
    ("a", "a"), (" B. ", "b"), ("Tie", "tie"), ("Output about equal", None), ("I cannot decide", None),
])
def test_parse_choice(reply: str, choice: str | None):
    assert parse_choice(reply) == choice


def test_judge_pairwise_unswaps_and_retries(judge, judge_server):
    instructions = [_instruction(i) for i in range(N)]
    outputs = [_model_text(i) for i in range(N)]
    refs = ["GOOD ref" if i not in MODEL_WINS else "meh ref" for i in range(N)]
    prefs = judge_pairwise(instructions, outputs, refs, judge)
    assert prefs == [2.0 if i in MODEL_WINS else 1.0 for i in range(N)]
    assert judge_server.attempts[_instruction(1)] == 2  # 429 then success
    assert judge_server.attempts[_instruction(4)] == 2  # 500 then success
    assert sum(judge_server.attempts.values()) == N + 2
    # both orders were used, and the order is reproducible from the seed
    swaps = [a["is_swapped"] for a in alpaca.annotate_pairwise(instructions, outputs, refs, judge)]
    assert 0 < sum(swaps) < N


def test_judge_bad_key_fails_fast(judge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge_pairwise(["q"], ["o"], ["r"], judge)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # sklearn deprecations inside alpaca_eval
def test_evaluate_alpaca_end_to_end(judge, files, tmp_path, offline_glm, monkeypatch, caplog):
    metrics = pytest.importorskip("alpaca_eval.metrics")
    prompts, ref_path = files
    calls = []
    real_lc = metrics.get_length_controlled_winrate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_lc(*args, **kwargs)

    monkeypatch.setattr(metrics, "get_length_controlled_winrate", spy)
    out = tmp_path / "run"
    caplog.set_level("DEBUG")
    board = evaluate_alpaca(str(prompts), _fake_generate, out, ref_path, judge, "pd-test")

    outputs = json.loads((out / "model_outputs.json").read_text())
    assert len(outputs) == N
    assert set(outputs[0]) == {"instruction", "output", "generator", "dataset", "latency_s",
                               "critical_path"}
    assert all(o["generator"] == "pd-test" and o["dataset"] == "toy" for o in outputs)
    assert outputs[3]["output"] == _model_text(3)

    assert board["n"] == N and board["n_total"] == N and board["judged"] is True
    assert board["win_rate"] == pytest.approx(100 * len(MODEL_WINS) / N)
    assert board["n_wins"] == len(MODEL_WINS) and board["n_wins_base"] == N - len(MODEL_WINS)
    assert board["mean_latency_s"] == pytest.approx(np.mean([0.5 + 0.1 * k for k in range(N)]))
    assert board["mean_critical_path"] == pytest.approx(10 + (N - 1) / 2)
    assert len(calls) == 1 and calls[0]["save_weights_dir"] is None
    lc = board["length_controlled_winrate"]
    assert isinstance(lc, float) and 0 <= lc <= 100
    assert json.loads((out / "leaderboard.json").read_text()) == board

    annotations = json.loads((out / "annotations.json").read_text())
    assert [a["preference"] for a in annotations] == [2.0 if i in MODEL_WINS else 1.0 for i in range(N)]
    assert {a["generator_1"] for a in annotations} == {"ref_model"}
    assert all("glm_preference" in a for a in annotations)
    # the same number straight from alpaca_eval's function on the written annotations
    direct = real_lc(pd.DataFrame(annotations), save_weights_dir=None)
    assert lc == pytest.approx(direct["length_controlled_winrate"])

    for f in out.iterdir():
        assert SECRET not in f.read_text()
    assert SECRET not in caplog.text


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_evaluate_alpaca_lc_unavailable_keeps_raw_winrate(judge, files, tmp_path, monkeypatch):
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(glm, "hf_hub_download", offline)
    prompts, ref_path = files
    board = evaluate_alpaca(str(prompts), _fake_generate, tmp_path / "r", ref_path, judge, "pd", limit=4)
    assert board["n"] == 4
    assert board["win_rate"] == pytest.approx(100 * len(MODEL_WINS & set(range(4))) / 4)
    assert board["length_controlled_winrate"] is None and "offline" in board["lc_error"]


def test_evaluate_alpaca_missing_reference_fails_before_generating(judge, files, tmp_path):
    pytest.importorskip("alpaca_eval")
    prompts, ref_path = files
    ref_path.write_text(json.dumps(json.loads(ref_path.read_text())[:-1]))

    def never(instructions):
        raise AssertionError("generate_fn must not run")

    with pytest.raises(ValueError, match="no reference output for 1 prompt"):
        evaluate_alpaca(str(prompts), never, tmp_path / "r", ref_path, judge, "pd")


def test_evaluate_alpaca_without_judge_writes_outputs_only(files, tmp_path, caplog):
    prompts, _ = files
    out = tmp_path / "nojudge"
    board = evaluate_alpaca(str(prompts), _fake_generate, out, None,
                            JudgeConfig(base_url=None, model="x"), "pd", limit=3)
    assert board["judged"] is False and board["win_rate"] is None and board["n"] == 3
    assert len(json.loads((out / "model_outputs.json").read_text())) == 3
    assert not (out / "annotations.json").exists()
    assert "skipped judging" in caplog.text


def test_missing_alpaca_eval_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("alpaca_eval"):
            raise ImportError("No module named 'alpaca_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'pdlightning\[eval\]'"):
        alpaca._alpaca_metrics()


# ----------------------------------------------------------------------------- bad input: one line, no traceback


def test_load_prompts_malformed_jsonl_line_names_file_and_line(tmp_path: Path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"instruction": "a"}\n\n{"instruction": "b",\n')
    with pytest.raises(ValueError, match=r"p\.jsonl line 3: not valid JSON"):
        load_prompts(str(p))
    q = tmp_path / "p.json"
    q.write_text('[{"instruction": "a"},\n oops]')
    with pytest.raises(ValueError, match=r"p\.json line 2: not valid JSON"):
        load_prompts(str(q))


def test_load_prompts_an_existing_file_is_never_a_hub_name(tmp_path: Path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError("a local file went to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    p = tmp_path / "prompts.txt"
    p.write_text("explain X\n")
    with pytest.raises(ValueError, match=r"prompts\.txt: unsupported prompt file extension '\.txt'; use \.json or \.jsonl"):
        load_prompts(str(p))
    with pytest.raises(FileNotFoundError, match=r"missing\.json: no such file"):
        load_prompts(str(tmp_path / "missing.json"))


def _cli(argv: list[str], monkeypatch) -> str:
    """Run ``evaluate alpaca`` expecting a one-line exit before any model loads."""
    from pdlightning.decoding import LanguageModel
    from pdlightning.eval import alpaca_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the inputs were checked")

    monkeypatch.setattr(LanguageModel, "from_pretrained", no_model)
    with pytest.raises(SystemExit) as e:
        alpaca_cli.main(["alpaca", "--checkpoint", "unused", "--decoder", "autoregressive", *argv])
    message = str(e.value.code)
    assert message.startswith("pdlightning evaluate alpaca: ") and "\n" not in message
    return message


@pytest.mark.parametrize(("content", "name", "expected"), [
    ('{"instruction": "a"}\n{"instruction": \n', "p.jsonl", r"p\.jsonl line 2: not valid JSON"),
    ('{"instruction": "a"}\n{"prompt": "b"}\n', "p.jsonl", r"p\.jsonl line 2 \(row 1\): no string 'instruction'"),
    (None, "missing.json", r"missing\.json: no such file"),
    ("explain X\n", "prompts.txt", r"prompts\.txt: unsupported prompt file extension '\.txt'"),
])
def test_cli_bad_prompts_exit_with_one_line_before_the_model_loads(tmp_path, monkeypatch, content, name, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    message = _cli(["--prompts", str(path), "--out", str(tmp_path / "out")], monkeypatch)
    assert re.search(expected, message), message
    assert not (tmp_path / "out").exists()


def test_cli_bad_reference_exits_with_one_line_before_the_model_loads(files, tmp_path, monkeypatch):
    prompts, ref_path = files
    out = ["--prompts", str(prompts), "--out", str(tmp_path / "out")]
    assert "nope.json: no such file" in _cli([*out, "--reference", str(tmp_path / "nope.json")], monkeypatch)
    refs = json.loads(ref_path.read_text())
    del refs[2]["output"]
    ref_path.write_text(json.dumps(refs))
    message = _cli([*out, "--reference", str(ref_path)], monkeypatch)
    assert "reference_outputs.json row 2: no string 'output' field" in message


def test_cli_corrupt_tag_spec_in_the_checkpoint_exits_with_one_line(files, tmp_path, monkeypatch):
    from pdlightning.eval import alpaca_cli
    from pdlightning.tags import TagSpec
    from pdlightning.tokenizer import build_tokenizer

    ckpt = tmp_path / "hf"
    tok, _ = build_tokenizer(["Her name is Ann Lee. She is 31."] * 5, TagSpec(), vocab_size=280)
    tok.save_pretrained(ckpt)
    (ckpt / "config.json").write_text('{"model_type": "qwen2"}')
    (ckpt / "tag_spec.json").write_text('{"plan_open": "<topic>",')
    with pytest.raises(SystemExit) as e:
        alpaca_cli.main(["alpaca", "--prompts", str(files[0]), "--checkpoint", str(ckpt), "--decoder", "autoregressive",
                         "--out", str(tmp_path / "out")])
    assert re.fullmatch(r"pdlightning evaluate alpaca: .*tag_spec\.json: not valid JSON .*", str(e.value.code))


def test_cli_a_failing_evaluation_exits_with_one_line(files, tmp_path, monkeypatch):
    from pdlightning.decoding import LanguageModel
    from pdlightning.eval import alpaca_cli

    def judge_fails(*args, **kwargs):
        raise JudgeError("judge returned HTTP 401 for http://x/v1/chat/completions")

    monkeypatch.setattr(LanguageModel, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(alpaca_cli, "evaluate_alpaca", judge_fails)
    with pytest.raises(SystemExit) as e:
        alpaca_cli.main(["alpaca", "--prompts", str(files[0]), "--checkpoint", "x", "--decoder", "autoregressive",
                         "--out", str(tmp_path / "out")])
    assert str(e.value.code) == "pdlightning evaluate alpaca: judge returned HTTP 401 for http://x/v1/chat/completions"


# ----------------------------------------------------------------------------- outputs of a reused --out


def test_a_reused_out_dir_holds_no_stale_judge_outputs_and_normal_permissions(files, tmp_path, caplog):
    prompts, _ = files
    out = tmp_path / "run"
    out.mkdir()
    stale = [{"instruction": "from an earlier decoder", "preference": 2.0}]
    (out / "annotations.json").write_text(json.dumps(stale))
    (out / "leaderboard.json").write_text(json.dumps({"generator": "earlier", "judged": True}))

    def crash(instructions):
        raise RuntimeError("generation failed")

    with pytest.raises(RuntimeError):  # a run that fails before its outputs exist touches nothing
        evaluate_alpaca(str(prompts), crash, out, None, None, "pd", limit=2)
    assert json.loads((out / "annotations.json").read_text()) == stale

    old_umask = os.umask(0o022)
    try:
        evaluate_alpaca(str(prompts), _fake_generate, out, None, None, "pd", limit=2)
    finally:
        os.umask(old_umask)
    assert sorted(f.name for f in out.iterdir()) == ["leaderboard.json", "model_outputs.json"]
    assert json.loads((out / "leaderboard.json").read_text())["generator"] == "pd"
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert "--judge-url" in caplog.text and "base_url" not in caplog.text
