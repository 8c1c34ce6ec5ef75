"""AlpacaEval: generate with a decoder, judge against reference outputs with an
OpenAI-compatible chat-completions endpoint, and score with alpaca_eval's own
win-rate and length-controlled win-rate (LCWR) code. Files use alpaca_eval's
formats (``output_1`` = reference, ``output_2`` = model). The API key is read from
the env var named by :attr:`JudgeConfig.api_key_env`, never logged or written.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = "AlpacaEval scoring needs alpaca_eval: pip install 'pdlightning[eval]'"

SYSTEM_PROMPT = (
    "You are a careful, impartial judge of instruction following. You compare two "
    "responses to the same instruction and choose the one a thoughtful human would prefer."
)
USER_TEMPLATE = """## Instruction

{instruction}

## Output (a)

{output_a}

## Output (b)

{output_b}

## Task

Which output follows the instruction better (helpful, correct, clear)? Do not favour an
output for its length alone. Reply with exactly "Output (a)" or "Output (b)"."""

_CHOICE = re.compile(r"output\s*\(?\s*([ab])\b", re.IGNORECASE)
_BARE = re.compile(r"^\W*([ab])\W*$", re.IGNORECASE)


def _alpaca_metrics() -> Any:
    """Import ``alpaca_eval.metrics`` lazily, with an install hint when missing."""
    try:
        from alpaca_eval import metrics
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    if not hasattr(metrics, "get_length_controlled_winrate"):
        raise ImportError(f"{INSTALL_HINT} (alpaca_eval.metrics.glm_winrate failed to import)")
    return metrics


def _get(obj: Any, name: str) -> Any:
    """Read ``name`` from a dict key or an attribute (duck typing)."""
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


#: Extensions of the local prompt and reference files.
RECORD_SUFFIXES = (".json", ".jsonl")

#: Files of a judged run that describe one ``model_outputs.json``: removed when a new one is written.
JUDGE_OUTPUTS = ("annotations.json", "leaderboard.json")


def _write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temporary file in the same folder + ``os.replace``).

    The file gets the usual permissions (``0o666`` less the umask), like every other output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """Read a ``.json`` list of records or a ``.jsonl`` file, each record with where it is.

    Returns:
        ``(location, record)`` pairs; the location is ``"row N"`` (0-based index of the
        record), preceded by ``"line L"`` (1-based) in a ``.jsonl`` file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not UTF-8, not valid JSON (the line is named), or not a list.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {n} (row {len(rows)})", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"row {i}", row) for i, row in enumerate(data)]


def load_prompts(
    source: str, limit: int | None = None, config: str | None = "alpaca_eval", split: str = "eval"
) -> list[dict]:
    """Load AlpacaEval-style prompts.

    Args:
        source: A local ``.json`` (list of records) or ``.jsonl`` file, or a hub dataset name
            (e.g. ``"tatsu-lab/alpaca_eval"``) loaded with ``datasets.load_dataset``. An
            existing file is always read as a local file, never taken for a hub name.
        limit: Keep only the first ``limit`` prompts (order is kept: the LCWR uses positions).
        config: Hub dataset config; split: its split (both ignored for local files).

    Returns:
        Records ``{"instruction": str, "dataset"?: str}``.

    Raises:
        FileNotFoundError: A ``.json``/``.jsonl`` source that does not exist.
        ValueError: An existing file of another extension, a file that is not valid JSON,
            or a row without a string ``instruction`` field (file and line/row are named).
    """
    path = Path(source)
    if path.suffix in RECORD_SUFFIXES or path.is_file():
        if path.suffix not in RECORD_SUFFIXES:
            raise ValueError(f"{path}: unsupported prompt file extension {path.suffix or '(none)'!r}; "
                             f"use {' or '.join(RECORD_SUFFIXES)} (a hub dataset is named by its id)")
        rows = _read_records(path)
    else:
        from datasets import load_dataset

        args = (source, config) if config else (source,)
        rows = [(f"row {i}", row) for i, row in enumerate(load_dataset(*args, split=split))]
    if limit is not None:
        rows = rows[:limit]
    prompts = []
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"{source} {where}: no string 'instruction' field")
        rec = {"instruction": row["instruction"]}
        if row.get("dataset") is not None:
            rec["dataset"] = row["dataset"]
        prompts.append(rec)
    return prompts


def load_reference(path: str | Path, instructions: Sequence[str]) -> list[dict]:
    """The reference (baseline) record of every instruction, from an alpaca_eval outputs file.

    Args:
        path: ``.json`` list (alpaca_eval's ``model_outputs.json``) or ``.jsonl`` of records
            with string ``instruction`` and ``output`` fields.
        instructions: The prompts to judge, in order.

    Returns:
        One record per instruction, matched by instruction text.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Bad JSON, a record without string ``instruction``/``output`` (file and
            line/row are named), or an instruction without a reference output.
    """
    path = Path(path)
    by_instr: dict[str, dict] = {}
    for where, rec in _read_records(path):
        for key in ("instruction", "output"):
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                raise ValueError(f"{path} {where}: no string {key!r} field")
        by_instr.setdefault(rec["instruction"], rec)
    missing = [s for s in instructions if s not in by_instr]
    if missing:
        raise ValueError(f"{path}: no reference output for {len(missing)} "
                         f"prompt(s), e.g. {missing[0][:80]!r}")
    return [by_instr[s] for s in instructions]


def write_model_outputs(
    prompts: Sequence[dict], generations: Sequence[Any], path: str | Path, generator: str
) -> list[dict]:
    """Write alpaca_eval's ``model_outputs.json`` atomically.

    Args:
        prompts: Records from :func:`load_prompts`.
        generations: One per prompt, objects or dicts with ``text``, ``seconds``, ``critical_path``.
        path: Output file.
        generator: Name of the model/decoder (alpaca_eval's ``generator`` field).

    Returns:
        The written records.
    """
    if len(prompts) != len(generations):
        raise ValueError(f"{len(prompts)} prompts but {len(generations)} generations")
    records = []
    for p, g in zip(prompts, generations, strict=True):
        rec = {"instruction": p["instruction"], "output": str(_get(g, "text")), "generator": generator}
        rec.update({"dataset": p["dataset"]} if "dataset" in p else {})
        rec.update(latency_s=float(_get(g, "seconds")), critical_path=int(_get(g, "critical_path")))
        records.append(rec)
    _write_json(path, records)
    return records


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat-completions judge.

    Attributes:
        base_url: API root such as ``http://host:8000/v1`` (``/chat/completions`` is appended);
            ``None`` disables judging.
        model: Judge model name sent in the request.
        api_key_env: NAME of the environment variable holding the API key (never the key).
        max_concurrency: Parallel requests.
        timeout_s: Per-request timeout in seconds.
        max_retries: Retries on HTTP 429/5xx, timeouts and connection errors.
        backoff_s: First retry delay, doubled each retry (a ``Retry-After`` header wins).
        seed: Seed of the A/B order randomisation.
    """

    base_url: str | None
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 4
    timeout_s: float = 60
    max_retries: int = 3
    backoff_s: float = 1.0
    seed: int = 0


class JudgeError(Exception):
    """The judge endpoint rejected a request in a way retries cannot fix (e.g. HTTP 401/404)."""


def _chat(judge: JudgeConfig, messages: list[dict], api_key: str | None) -> str:
    """POST one chat completion with retries/backoff; return the reply text."""
    url = judge.base_url.rstrip("/")  # type: ignore[union-attr]
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    body = json.dumps({"model": judge.model, "messages": messages, "temperature": 0, "max_tokens": 16})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(judge.max_retries + 1):
        retry_after = None
        try:
            req = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=judge.timeout_s) as resp:
                payload = json.loads(resp.read())
            return payload["choices"][0]["message"].get("content") or ""
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise JudgeError(f"judge returned HTTP {e.code} for {url}") from None
            err, retry_after = f"HTTP {e.code}", e.headers.get("Retry-After")
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            err = type(e).__name__
        if attempt == judge.max_retries:
            raise RuntimeError(f"judge failed after {attempt + 1} attempts: {err}")
        delay = judge.backoff_s * 2**attempt
        if retry_after is not None and retry_after.replace(".", "", 1).isdigit():
            delay = min(float(retry_after), 60.0)
        log.info("judge %s, retrying in %.2fs (attempt %d)", err, delay, attempt + 1)
        time.sleep(delay)
    raise AssertionError("unreachable")


def parse_choice(reply: str) -> str | None:
    """Parse a judge reply into ``"a"``, ``"b"``, ``"tie"`` or ``None`` (unparseable)."""
    m = _CHOICE.search(reply) or _BARE.match(reply)
    if m:
        return m.group(1).lower()
    return "tie" if "tie" in reply.lower() else None


def annotate_pairwise(
    instructions: Sequence[str], outputs: Sequence[str], reference_outputs: Sequence[str],
    judge: JudgeConfig,
) -> list[dict]:
    """Ask the judge which output is better for every prompt, in random A/B order.

    Args:
        instructions: The prompts.
        outputs: The model's outputs.
        reference_outputs: The reference (baseline) outputs.
        judge: Endpoint configuration.

    Returns:
        Per prompt ``{"preference", "raw_completion", "is_swapped"}``; ``preference`` is 1.0
        (reference wins), 2.0 (model wins), 1.5 (tie) or ``None`` (unparseable/failed).
    """
    n = len(instructions)
    if not (len(outputs) == len(reference_outputs) == n):
        raise ValueError("instructions, outputs and reference_outputs differ in length")
    if not judge.base_url:
        raise ValueError("JudgeConfig.base_url is not set")
    api_key = os.environ.get(judge.api_key_env)
    if not api_key:
        log.warning("env var %s is not set: calling the judge without an API key", judge.api_key_env)
    rng = random.Random(judge.seed)
    swaps = [rng.random() < 0.5 for _ in range(n)]  # True: the model's output is shown as (a)

    def one(i: int) -> dict:
        a, b = (outputs[i], reference_outputs[i]) if swaps[i] else (reference_outputs[i], outputs[i])
        user = USER_TEMPLATE.format(instruction=instructions[i], output_a=a, output_b=b)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        try:
            reply = _chat(judge, messages, api_key)
        except RuntimeError as e:  # retries exhausted; JudgeError (e.g. HTTP 401) propagates
            log.warning("prompt %d not judged: %s", i, e)
            return {"preference": None, "raw_completion": None, "is_swapped": swaps[i], "error": str(e)}
        choice = parse_choice(reply)
        if choice in ("a", "b"):
            pref = 2.0 if (choice == "a") == swaps[i] else 1.0
        else:
            pref = 1.5 if choice == "tie" else None
        return {"preference": pref, "raw_completion": reply, "is_swapped": swaps[i]}

    pool = ThreadPoolExecutor(max_workers=max(1, judge.max_concurrency))
    try:
        return list(pool.map(one, range(n)))
    finally:  # a JudgeError cancels the queued requests instead of sending them all
        pool.shutdown(wait=True, cancel_futures=True)


def judge_pairwise(
    instructions: Sequence[str], outputs: Sequence[str], reference_outputs: Sequence[str],
    judge: JudgeConfig,
) -> list[float | None]:
    """Preferences in alpaca_eval's convention (1 = reference wins, 2 = model wins, 1.5 = tie).

    See :func:`annotate_pairwise` for the arguments; ``None`` marks unparseable/failed replies.
    """
    return [a["preference"] for a in annotate_pairwise(instructions, outputs, reference_outputs, judge)]


def compute_metrics(annotations: list[dict]) -> dict:
    """Raw and length-controlled win rates from alpaca_eval's own metric functions.

    Args:
        annotations: alpaca_eval annotations (``preference``, ``output_1``/``output_2``,
            ``generator_1``/``generator_2``, ``index`` = position in AlpacaEval); each gets
            ``glm_preference`` in place when the LCWR is computed.

    Returns:
        ``get_winrate``'s metrics plus ``get_length_controlled_winrate``'s LCWR (``None`` and
        ``lc_error`` when the GLM fails, e.g. its ``df_gamed.csv`` cannot be fetched offline).
    """
    import pandas as pd

    metrics = _alpaca_metrics()
    df = pd.DataFrame(annotations)
    df["preference"] = df["preference"].astype(float)
    out = {k: float(v) if isinstance(v, float) else int(v) for k, v in metrics.get_winrate(df).items()}
    try:
        lc = metrics.get_length_controlled_winrate(df, save_weights_dir=None, is_add_glm_preference_inplace=True)
        out["length_controlled_winrate"] = float(lc["length_controlled_winrate"])
        out["lc_standard_error"] = float(lc["lc_standard_error"])
        for rec, p in zip(annotations, df["glm_preference"], strict=True):
            rec["glm_preference"] = float(p)
    except Exception as e:  # noqa: BLE001 - keep the raw win rate when the GLM cannot run
        log.warning("length-controlled win rate unavailable: %s: %s", type(e).__name__, e)
        out["length_controlled_winrate"] = None
        out["lc_error"] = f"{type(e).__name__}: {e}"
    return out


def evaluate_alpaca(
    prompts_source: str | Sequence[dict],
    generate_fn: Callable[[list[str]], Sequence[Any]],
    out_dir: str | Path,
    reference_outputs_path: str | Path | Sequence[dict] | None,
    judge: JudgeConfig | None,
    generator_name: str,
    limit: int | None = None,
) -> dict:
    """Generate, write ``model_outputs.json``, judge against the reference and score.

    ``out_dir`` holds one run: once the generations are done, the judge outputs of an
    earlier run there (``annotations.json``, ``leaderboard.json``, which describe its
    ``model_outputs.json``) are removed before the new ``model_outputs.json`` replaces the old
    one, so no stale file is left beside the new outputs. Use a fresh ``out_dir`` per decoder
    to keep every run. A failure before the generations are done leaves the folder untouched.

    Args:
        prompts_source: See :func:`load_prompts`, or records it returned.
        generate_fn: ``generate_fn(instructions) -> generations`` (``text``, ``seconds``,
            ``critical_path``).
        out_dir: Folder for ``model_outputs.json``, ``annotations.json``, ``leaderboard.json``.
        reference_outputs_path: alpaca_eval outputs file of the baseline, matched by instruction,
            or the records :func:`load_reference` returned for these prompts.
        judge: Judge endpoint; ``None`` or ``base_url=None`` writes the outputs and skips judging.
        generator_name: Name of the evaluated decoder.
        limit: Evaluate only the first ``limit`` prompts.

    Returns:
        The leaderboard dict (``win_rate``, ``length_controlled_winrate``, ``n``,
        ``mean_latency_s``, ``mean_critical_path``, ...), also written to ``leaderboard.json``.
    """
    out = Path(out_dir)
    judging = judge is not None and bool(judge.base_url)
    if isinstance(prompts_source, str):
        prompts = load_prompts(prompts_source, limit)
    else:
        prompts = list(prompts_source)[:limit] if limit is not None else list(prompts_source)
    instructions = [p["instruction"] for p in prompts]
    refs: list[dict] = []
    if judging:
        _alpaca_metrics()  # fail before generating when the extra is missing
        if reference_outputs_path is None:
            raise ValueError("judging needs reference_outputs_path (alpaca_eval outputs file)")
        refs = (load_reference(reference_outputs_path, instructions)
                if isinstance(reference_outputs_path, (str, Path)) else list(reference_outputs_path))
    generations = list(generate_fn(instructions))
    for name in JUDGE_OUTPUTS:  # they describe the model_outputs.json about to be replaced
        (out / name).unlink(missing_ok=True)
    records = write_model_outputs(prompts, generations, out / "model_outputs.json", generator_name)
    n = len(records)
    board: dict[str, Any] = {"generator": generator_name, "n": n}
    for key, name in (("latency_s", "mean_latency_s"), ("critical_path", "mean_critical_path")):
        board[name] = sum(r[key] for r in records) / max(n, 1)
    if not judging:
        log.warning("no judge configured (--judge-url not given): wrote %s, skipped judging",
                    out / "model_outputs.json")
        board.update(judged=False, win_rate=None, length_controlled_winrate=None)
        _write_json(out / "leaderboard.json", board)
        return board
    assert judge is not None
    ref_name = refs[0].get("generator", "reference") if refs else "reference"
    judged = annotate_pairwise(instructions, [r["output"] for r in records],
                               [r["output"] for r in refs], judge)
    annotations = [
        {"instruction": rec["instruction"], "output_1": ref["output"],
         "generator_1": ref.get("generator", ref_name), "output_2": rec["output"],
         "generator_2": generator_name, "annotator": judge.model, "index": i,
         **({"dataset": rec["dataset"]} if "dataset" in rec else {}), **j}
        for i, (rec, ref, j) in enumerate(zip(records, refs, judged, strict=True))
    ]
    scored = [a for a in annotations if a["preference"] is not None]
    if not scored:
        raise RuntimeError("the judge produced no usable preference")
    board.update(judged=True, judge_model=judge.model, reference=ref_name, n_unjudged=n - len(scored))
    board.update(compute_metrics(scored))
    _write_json(out / "annotations.json", annotations)
    _write_json(out / "leaderboard.json", board)
    log.info("%s: win rate %.2f, LCWR %s over %d prompts", generator_name, board["win_rate"],
             board["length_controlled_winrate"], n)
    return board
