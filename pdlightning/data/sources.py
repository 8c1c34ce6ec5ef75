"""Where training rows come from, loaded through ``datasets``.

Every source yields rows with ``prompt`` and ``response`` (plain answer text),
optionally ``system``, ``tagged`` (canonical tagged text) and ``answer_keys``:

* ``bundled``: the generated, verifiable instruction set (embedded default),
  written once to the cache as JSONL (the same bytes every time), tagged from
  the generator's ground-truth parts;
* a local ``.json`` / ``.jsonl`` / ``.parquet`` file (or folder of them) in the
  authors' ``prompt`` / ``completion`` form; ``completion`` may be tagged
  (canonical or PASTA attribute form) or plain;
* SlimOrca's ``conversations`` form (system / human / gpt turns), by hub name
  when online (``Open-Orca/SlimOrca``) or by local path when not.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import datasets

from pdlightning.tags import PlanEntry, Round, TaggedResponse, TagSpec, render

BUNDLED_VERSION = "v1"
DEFAULT_BUNDLED_SIZES = {"train": 6000, "validation": 200, "test": 200}
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def tagged_from_parts(parts: list[dict[str, Any]], spec: TagSpec, count_tokens: Any) -> str:
    """Canonical tagged text from ground-truth parts (separators kept inside spans).

    A part with ``depends`` opens a new round after ``<sync/>``.
    """
    rounds: list[Round] = [Round([], [])]
    for k, part in enumerate(parts):
        text = part["text"] + ("\n" if k < len(parts) - 1 else "")
        if part.get("depends") and rounds[-1].entries:
            rounds[-1].sync = True
            rounds.append(Round([], []))
        rounds[-1].entries.append(PlanEntry(part["topic"], spec.units(count_tokens(part["text"]))))
        rounds[-1].spans.append(text)
    return render(TaggedResponse(rounds=rounds, end=True), spec)


def _atomic_write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # concurrent writers never share a temp file
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)


def bundled_files(
    cache_dir: str | Path, sizes: dict[str, int] | None = None, seed: int = 0, spec: TagSpec | None = None
) -> dict[str, str]:
    """Generate the bundled set into the cache once; return split -> JSONL path."""
    from pdlightning.data import synthetic

    sizes = {**DEFAULT_BUNDLED_SIZES, **(sizes or {})}
    spec = spec or TagSpec()
    # the generator's own source is part of the key: a changed generator never reuses stale files
    code = hashlib.sha256(inspect.getsource(synthetic).encode()).hexdigest()[:10]
    key = f"bundled-{BUNDLED_VERSION}-{code}-seed{seed}-" + "-".join(f"{k}{sizes[k]}" for k in sorted(sizes))
    directory = Path(cache_dir) / key
    directory.mkdir(parents=True, exist_ok=True)
    paths = {split: str(directory / f"{split}.jsonl") for split in sizes}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    data = synthetic.generate_dataset(sizes, seed=seed)
    for split, rows in data.items():
        for row in rows:
            row["tagged"] = tagged_from_parts(row["parts"], spec, synthetic.count_tokens)
        _atomic_write_jsonl(rows, Path(paths[split]))
    return paths


def _answer_field(text: Any) -> str:
    """``tagged`` for an answer already carrying plan tags (canonical or PASTA), else ``response``."""
    tagged = isinstance(text, str) and ("<async" in text or "<topic>" in text or "<promise>" in text)
    return "tagged" if tagged else "response"


#: fields a flat row's prompt and answer are read from, the first one set wins (authors', Alpaca forms)
PROMPT_FIELDS = ("prompt", "instruction")
ANSWER_FIELDS = ("completion", "response", "output")


def _first(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    """The first of ``names`` that ``row`` sets. A null counts as unset: ``datasets`` gives every
    row of a file every column, so a file mixing ``completion`` and ``response`` rows has nulls."""
    return next((row[name] for name in names if row.get(name) is not None), None)


def _conversation(turns: Any) -> tuple[Any, Any, Any]:
    """``(prompt, system, answer)`` of SlimOrca turns: the first human and gpt values, the last system one.

    The system turn stays out of the prompt (the chat template puts it in its own
    place). Anything but a list of dicts has no turns, so a malformed row is
    dropped downstream as ``bad_row`` instead of stopping the whole load.
    """
    prompt = system = answer = None
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        who, value = turn.get("from"), turn.get("value")
        if who == "system":
            system = value
        elif who == "human" and prompt is None:
            prompt = value
        elif who == "gpt" and answer is None:
            answer = value
    return prompt, system, answer


def normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    """Map the accepted input forms to ``prompt`` / ``response`` / ``tagged`` / ``system`` (and the
    bundled set's ``answer_keys`` and ``family``).

    The one reader of row forms: ``pdlightning annotate`` uses it too, so it
    accepts exactly the rows training reads. A row's own ``tagged`` field (an
    annotate output, in any form) wins over the answer's; a plain answer stays
    the ``response`` beside it.
    """
    out: dict[str, Any] = {
        "prompt": None, "response": None, "tagged": None, "system": None, "answer_keys": None, "family": None
    }
    if row.get("conversations") is not None:  # SlimOrca
        out["prompt"], out["system"], answer = _conversation(row["conversations"])
    else:
        out["prompt"] = _first(row, PROMPT_FIELDS)
        out["system"] = row.get("system")
        answer = _first(row, ANSWER_FIELDS)
    out[_answer_field(answer)] = answer
    if row.get("tagged") is not None:
        out["tagged"] = row["tagged"]
    if row.get("answer_keys") is not None:
        out["answer_keys"] = list(row["answer_keys"])
    out["family"] = row.get("family")  # the bundled set's task family (None elsewhere)
    return out


def load_rows(
    source: str,
    cache_dir: str | Path,
    bundled_sizes: dict[str, int] | None = None,
    seed: int = 0,
    validation_fraction: float = 0.02,
    spec: TagSpec | None = None,
) -> datasets.DatasetDict:
    """Load a source as a ``DatasetDict`` with ``train`` and ``validation`` (and ``test`` when it has one).

    Args:
        source: ``bundled``, a local file or folder, or a hub dataset name.
        cache_dir: Where generated files and the ``datasets`` cache live.
        bundled_sizes: Split sizes of the bundled set.
        seed: Seed of generation and of the validation split of single-split sources.
        validation_fraction: Held-out fraction when the source has only ``train``.
        spec: Tag spec used to tag the bundled set.
    """
    hf_cache = str(Path(cache_dir) / "hf")
    if source == "bundled":
        files = bundled_files(cache_dir, bundled_sizes, seed, spec)
        raw = datasets.load_dataset("json", data_files=files, cache_dir=hf_cache)
    else:
        path = Path(source)
        if path.exists():
            files = sorted(path.glob("*")) if path.is_dir() else [path]
            # a folder's data files, not annotate's side files (rejected rows) beside them
            files = [f for f in files if f.suffix in LOCAL_SUFFIXES and not f.name.endswith(".rejected.jsonl")]
            if not files:
                raise ValueError(f"{source}: no .json, .jsonl or .parquet file found")
            builder = LOCAL_SUFFIXES[files[0].suffix]
            raw = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, cache_dir=hf_cache)
        else:
            raw = datasets.load_dataset(source, cache_dir=hf_cache)
        if "validation" not in raw:
            split = raw["train"].train_test_split(test_size=validation_fraction, seed=seed)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"], **(
                {"test": raw["test"]} if "test" in raw else {})})
    keep = ["prompt", "response", "tagged", "system", "answer_keys", "family"]
    return datasets.DatasetDict(
        {
            name: ds.map(normalise_row, remove_columns=[c for c in ds.column_names if c not in keep])
            for name, ds in raw.items()
        }
    )
