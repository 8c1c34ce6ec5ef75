"""``pdlightning bench``: train (or reuse) the models of the paper's comparison
on the embedded default, decode the test prompts with every decoder, and write
``results.json``, ``results.md`` and plots, every ratio taken against AR in the
same run. Sweeps (any decoder knob: r, tau, length_scale, Fast-dLLM's factor) and ablations (no sync, no topics) are
entries of the same config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from pdlightning.decoding import Generation, LanguageModel, get_strategy
from pdlightning.eval.machine import describe, machine_info
from pdlightning.eval.metrics import (
    FactAccuracy,
    FactAccuracyDelta,
    PlanValidity,
    SpanLengthError,
    SpeedUp,
    TokensPerAnswer,
    fact_accuracy_against_others,
    fact_accuracy_by_group,
    facts_found,
    paired_bootstrap,
)


@dataclass
class ModelSpec:
    """A model to train: config files and command-line overrides for ``pdlightning fit``.

    ``init_from`` names a model listed before this one: training starts from
    its exported weights (``--model.backbone.pretrained``), e.g. two models
    that share an AR warm-up and differ only in their last stage.
    """

    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None


@dataclass
class DecoderSpec:
    """A row of the comparison: a decoder on a model, with its arguments."""

    name: str
    model: str
    decoder: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    """One knob of one decoder row swept over values."""

    row: str
    knob: str
    values: list[Any]


SPLITS = ("train", "validation", "test")


@dataclass
class BenchConfig:
    out_dir: str = "runs/bench"
    threads: int = 2
    seed: int = 0
    cache_dir: str = ".cache/pdlightning"
    split: str = "test"
    limit: int = 100
    warmup: int = 2
    baseline: str = "AR"
    models: dict[str, ModelSpec] = field(default_factory=dict)
    decoders: list[DecoderSpec] = field(default_factory=list)
    sweeps: list[SweepSpec] = field(default_factory=list)

    def check_settings(self, path: str | Path) -> None:
        """Refuse a run setting of the wrong type or range, naming it (before any training)."""
        for key, kind, low in (("threads", int, 1), ("seed", int, 0), ("limit", int, 1), ("warmup", int, 0),
                               ("out_dir", str, None), ("cache_dir", str, None), ("baseline", str, None)):
            value = getattr(self, key)
            if not isinstance(value, kind) or isinstance(value, bool) or (low is not None and value < low):
                want = f"an integer >= {low}" if kind is int else "a string"
                raise ValueError(f"{path}: {key} must be {want}, got {value!r}")
        if self.split not in SPLITS:
            raise ValueError(f"{path}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> BenchConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        raw["models"] = {k: _row(path, f"model {k!r}", ModelSpec, v) for k, v in (raw.get("models") or {}).items()}
        raw["decoders"] = [_row(path, f"decoder row {n}", DecoderSpec, d) for n, d in enumerate(raw.get("decoders") or [])]
        raw["sweeps"] = [_row(path, f"sweep {n}", SweepSpec, s) for n, s in enumerate(raw.get("sweeps") or [])]
        cfg = cls(**raw)
        cfg.check_settings(path)
        names = list(cfg.models)
        for k, (name, spec) in enumerate(cfg.models.items()):
            if spec.init_from is not None and spec.init_from not in names[:k]:
                raise ValueError(f"{path}: model {name!r} starts from {spec.init_from!r}, "
                                 "which is not a model listed before it")
        for d in cfg.decoders:
            if d.model not in cfg.models:
                raise ValueError(f"{path}: decoder row {d.name!r} uses unknown model {d.model!r}")
        rows = {d.name: d for d in cfg.decoders}
        if cfg.baseline not in rows:
            raise ValueError(f"{path}: baseline {cfg.baseline!r} is not a decoder row")
        for d in cfg.decoders:  # a bad decoder or argument fails now, not after the training
            _check_decoder(path, f"decoder row {d.name!r}", d.decoder, d.args)
        for n, sw in enumerate(cfg.sweeps):
            if sw.row not in rows:
                raise ValueError(f"{path}: sweep {n} sweeps row {sw.row!r}, which is not a decoder row "
                                 f"(rows: {', '.join(rows)})")
            for value in sw.values:
                row, args = cfg.sweep_point(sw, value)
                _check_decoder(path, f"sweep {n} ({sw.row}/{sw.knob}={value})", row.decoder, args)
        return cfg

    def sweep_point(self, sw: SweepSpec, value: Any) -> tuple[DecoderSpec, dict[str, Any]]:
        """The decoder row a sweep point varies, and that row's arguments with the knob set to ``value``."""
        row = next(d for d in self.decoders if d.name == sw.row)
        return row, {**row.args, sw.knob: value}


def _check_decoder(path: str | Path, where: str, decoder: str, args: dict[str, Any]) -> None:
    """Build the strategy once so that a wrong name, argument or value names its row."""
    try:
        get_strategy(decoder, **args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {where}: {e}") from None


def _row(path: str | Path, where: str, cls: type, row: Any) -> Any:
    """One row of a bench YAML as ``cls``; a wrong or missing key names the row."""
    if not isinstance(row, dict):
        raise ValueError(f"{path}: {where} must be a mapping, got {row!r}")
    try:
        return cls(**row)
    except TypeError as e:
        fields = ", ".join(cls.__dataclass_fields__)
        raise ValueError(f"{path}: {where}: {e} (its keys: {fields})") from None


# --------------------------------------------------------------------------- training


def fit_args(name: str, spec: ModelSpec, cfg: BenchConfig, trained: dict[str, Path] | None = None) -> list[str]:
    """The ``pdlightning fit`` arguments that train model ``name`` under ``cfg.out_dir``."""
    root = Path(cfg.out_dir) / "models" / name
    return [
        *(a for c in spec.configs for a in ("--config", c)),
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--data.cache_dir={cfg.cache_dir}",
        f"--seed_everything={cfg.seed}",
        f"--data.seed={cfg.seed}",  # the models learn the set the prompts are read from (load_prompts)
        *([f"--model.backbone.pretrained={(trained or {})[spec.init_from]}"] if spec.init_from else []),
        *spec.overrides,
        "--trainer.callbacks+=pdlightning.model.callbacks.ExportHF",
        f"--trainer.callbacks.dirpath={root / 'hf'}",
    ]


def train_model(name: str, spec: ModelSpec, cfg: BenchConfig, trained: dict[str, Path] | None = None) -> Path:
    """Run ``pdlightning fit`` for one model unless its export already exists.

    ``trained`` maps the models trained so far to their exports (for ``init_from``)."""
    root = Path(cfg.out_dir) / "models" / name
    hf = root / "hf"
    # what it was trained with: a run asking for another seed or recipe must not reuse it
    record, wanted = root / "trained_with.json", {"seed": cfg.seed, **asdict(spec)}
    if (hf / "model.safetensors").exists():
        had = json.loads(record.read_text()) if record.exists() else wanted  # older runs kept no record
        changed = [k for k in wanted if had.get(k) != wanted[k]]
        if changed:
            k = changed[0]
            raise SystemExit(f"[bench] model {name} in {hf} was trained with {k} {had.get(k)!r}, and this run asks "
                             f"for {wanted[k]!r}: give another --out_dir (or delete {root}) to train it anew"
                             + (f", or run with --seed {had['seed']}" if k == "seed" else ""))
        print(f"[bench] model {name}: reusing {hf}")
        return hf
    args = [sys.executable, "-m", "pdlightning.cli", "fit", *fit_args(name, spec, cfg, trained)]
    print(f"[bench] training {name}: {' '.join(args[2:])}")
    t0 = time.time()
    # training runs on the bench's `threads` too (torch would take every core: two benches
    # side by side would then oversubscribe the CPU and slow each other several-fold)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cfg.threads)}
    done = subprocess.run(args, env=env)
    if done.returncode != 0 or not (hf / "model.safetensors").exists():
        raise SystemExit(f"[bench] training {name} failed (exit {done.returncode})")
    record.write_text(json.dumps(wanted, indent=1) + "\n")
    print(f"[bench] model {name} trained in {(time.time() - t0) / 60:.1f} min")
    return hf


# --------------------------------------------------------------------------- decoding


def load_prompts(cfg: BenchConfig) -> list[dict[str, Any]]:
    from pdlightning.data.sources import load_rows

    rows = load_rows("bundled", cfg.cache_dir, seed=cfg.seed)[cfg.split]
    n = min(cfg.limit, len(rows))
    return [{k: rows[i][k] for k in ("prompt", "answer_keys", "family", "response")} for i in range(n)]


@dataclass
class Job:
    """One row to decode: a label, its model, and its strategy's name and arguments."""

    label: str
    lm: LanguageModel
    decoder: str
    args: dict[str, Any] = field(default_factory=dict)


def evaluate_rows(jobs: list[Job], prompts: list[dict[str, Any]],
                  cfg: BenchConfig) -> list[tuple[dict[str, Any], list[Generation]]]:
    """Decode every prompt with every job, taking turns; score each job.

    The prompts go in chunks (the largest batch size of any job), and every job
    decodes a chunk before the next chunk starts. A machine that slows down for
    a while (another process, a throttled core) then slows every row alike, and
    the latency ratios between rows hold. Decoding row after row, one such spell
    during the AR row once made AR look twice as slow as it is.
    """
    strategies = [get_strategy(j.decoder, **j.args) for j in jobs]
    texts = [p["prompt"] for p in prompts]
    for job, strategy in zip(jobs, strategies, strict=True):  # warm-up, not timed
        strategy.generate(job.lm, texts[: cfg.warmup], torch.Generator().manual_seed(cfg.seed))
    generators = [torch.Generator().manual_seed(cfg.seed) for _ in jobs]
    gens: list[list[Generation]] = [[] for _ in jobs]
    chunk = max(s.batch_size for s in strategies)
    with tqdm(total=len(texts) * len(jobs), desc=f"decoding with {len(jobs)} decoders", unit="answer",
              leave=False) as bar:
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            for job, strategy, generator, done in zip(jobs, strategies, generators, gens, strict=True):
                bar.set_postfix_str(job.label)
                done.extend(strategy.generate(job.lm, part, generator))
                bar.update(len(part))
    return [(score_row(job.lm, s.batch_size, g, prompts), g) for job, s, g in zip(jobs, strategies, gens, strict=True)]


def score_row(lm: LanguageModel, batch_size: int, gens: list[Generation],
              prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Quality, latency per response and counters of one row's generations."""
    from torchmetrics.text import CHRFScore

    from pdlightning.data.synthetic import count_tokens

    facts, validity = FactAccuracy(), PlanValidity()
    span_error, tokens = SpanLengthError(lm.spec.length_unit), TokensPerAnswer()
    answers, keys, families = [g.text for g in gens], [p["answer_keys"] for p in prompts], [p.get("family") for p in prompts]
    facts.update(answers, keys)
    guessed = fact_accuracy_against_others(answers, keys, families) if None not in families else None
    references = [p.get("response") for p in prompts]
    chrf = None
    if None not in references:  # the whole text against the reference answer: sees what facts do not
        metric = CHRFScore()  # (a cut or garbled fact-free sentence)
        metric.update(answers, [[r] for r in references])
        chrf = float(metric.compute())
    validity.update(gens)
    span_error.update(gens, count_tokens)
    tokens.update(gens)
    n = len(gens)
    per_response = [g.counters.seconds / max(1, batch_size) for g in gens]
    found = [facts_found(a, k) for a, k in zip(answers, keys, strict=True)]
    return {
        "fact_accuracy": float(facts.compute()),
        # the same answers against the keys of the other prompts of their family: what guessing scores
        "fact_accuracy_other_prompts": guessed,
        "chrf": chrf,
        "latency_s": sum(per_response) / n,
        "critical_path": sum(g.counters.critical_path for g in gens) / n,
        "forward_passes": sum(g.counters.forward_passes for g in gens) / n,
        "fed_positions": sum(g.counters.fed_positions for g in gens) / n,
        "content_tokens": float(tokens.compute()),
        "control_tokens": sum(g.counters.control_tokens for g in gens) / n,
        "pad_tokens": sum(g.counters.pad_tokens for g in gens) / n,
        "plan_validity": float(validity.compute()) if any(g.plan is not None for g in gens) else None,
        "span_length_error": float(span_error.compute()) if any(g.plan for g in gens) else None,
        "n": n,
        "facts_by_family": fact_accuracy_by_group(answers, keys, families) if None not in families else None,
        # what the paired confidence intervals against the baseline resample (add_ratios)
        "per_prompt": {"facts_found": found, "answer_keys": [len(k) for k in keys], "latency_s": per_response},
    }


def add_ratios(results: dict[str, dict[str, Any]], baseline: str, seed: int = 0) -> None:
    """Speed-up, critical-path ratio and Δ facts of every row against the baseline row of this run."""
    base = results[baseline]
    for r in results.values():
        r.update(against_baseline(r, base, seed))


def against_baseline(r: dict[str, Any], base: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """One row's ratios against the baseline row of the same run, with 95% paired bootstrap
    intervals (over the prompts) of its Δ facts and speed-up when both rows hold per-prompt
    results (``None`` otherwise, as in results.json before 2026-12-06)."""
    out = {
        "speedup_vs_ar": base["latency_s"] / r["latency_s"],
        "critical_path_vs_ar": r["critical_path"] / base["critical_path"],
        "fact_accuracy_minus_ar": r["fact_accuracy"] - base["fact_accuracy"],
        "fact_accuracy_minus_ar_ci": None,
        "speedup_vs_ar_ci": None,
    }
    mine, theirs = r.get("per_prompt"), base.get("per_prompt")
    if mine and theirs and len(mine["facts_found"]) == len(theirs["facts_found"]) > 1:
        t = {k: torch.tensor(v, dtype=torch.float64) for k, v in mine.items()}
        b = {k: torch.tensor(v, dtype=torch.float64) for k, v in theirs.items()}
        out["fact_accuracy_minus_ar_ci"] = list(paired_bootstrap(
            FactAccuracyDelta(), t["facts_found"], b["facts_found"], t["answer_keys"], seed=seed))
        out["speedup_vs_ar_ci"] = list(paired_bootstrap(SpeedUp(), t["latency_s"], b["latency_s"], seed=seed))
    return out


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| decoder | model | facts | facts vs other prompts' keys | Δ facts vs AR [95% CI] | chrF vs reference "
            "| latency (s) | speed-up vs AR [95% CI] | critical path | ratio vs AR | forward passes | fed positions | content tok | control tok "
            "| pad tok |")
    lines = [head, "|" + "---|" * 15]
    for name, r in results.items():
        other = r.get("fact_accuracy_other_prompts")
        fed = r.get("fed_positions")  # results.json before 2026-12-05 lack it
        lines.append(
            f"| {name} | {r['model']} | {100 * r['fact_accuracy']:.1f}% "
            f"| {'–' if other is None else f'{100 * other:.1f}%'} | {_delta(r)} "
            f"| {_chrf(r)} | {r['latency_s']:.3f} | {_speedup(r)} | {r['critical_path']:.1f} "
            f"| {r['critical_path_vs_ar']:.2f} | {r['forward_passes']:.1f} | {'–' if fed is None else f'{fed:.0f}'} "
            f"| {r['content_tokens']:.1f} "
            f"| {r['control_tokens']:.1f} | {r['pad_tokens']:.1f} |"
        )
    return "\n".join(lines)


def markdown_families(results: dict[str, dict[str, Any]], baseline: str) -> str:
    """Facts per task family (a row each, the most keys first), a column per decoder: each
    decoder's accuracy, and for the others its difference from the baseline's, in points."""
    rows = {name: r["facts_by_family"] for name, r in results.items() if r.get("facts_by_family")}
    if baseline not in rows:
        return ""
    names = [baseline, *(n for n in rows if n != baseline)]
    base = rows[baseline]
    lines = ["| family | keys | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for family in sorted(base, key=lambda f: (-base[f]["keys"], f)):
        cells = [f"{100 * base[family]['facts']:.1f}%"]
        for name in names[1:]:
            got = rows[name].get(family)
            cells.append("–" if got is None else f"{100 * (got['facts'] - base[family]['facts']):+.1f}")
        lines.append(f"| {family} | {base[family]['keys']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(ci: list[float] | None, fmt: str, scale: float = 1.0) -> str:
    """`` [low, high]`` of a 95% interval for a table cell; empty where there is none."""
    return "" if ci is None else f" [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]"


def _delta(r: dict[str, Any]) -> str:
    """A row's Δ facts against the baseline, in points, with its interval."""
    if r.get("fact_accuracy_minus_ar") is None:
        return "–"
    return f"{100 * r['fact_accuracy_minus_ar']:+.1f}{_interval(r.get('fact_accuracy_minus_ar_ci'), '+.1f', 100)}"


def _speedup(r: dict[str, Any]) -> str:
    """A row's speed-up against the baseline with its interval."""
    return f"{r['speedup_vs_ar']:.2f}x{_interval(r.get('speedup_vs_ar_ci'), '.2f')}"


def _chrf(r: dict[str, Any]) -> str:
    """A row's chrF for a table (results.json before 2026-12-06 and data without references lack it)."""
    return "–" if r.get("chrf") is None else f"{100 * r['chrf']:.1f}"


def markdown_sweeps(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """One table of every sweep point: facts, critical path, latency and speed-up against the baseline."""
    lines = ["| sweep | value | facts | Δ facts vs AR [95% CI] | chrF | critical path | latency (s) "
             "| speed-up vs AR [95% CI] |", "|" + "---|" * 8]
    for key, points in sweeps.items():
        for r in points:
            lines.append(f"| {key} | {r['value']} | {100 * r['fact_accuracy']:.1f}% | {_delta(r)} | {_chrf(r)} "
                         f"| {r['critical_path']:.1f} | {r['latency_s']:.3f} | {_speedup(r)} |")
    return "\n".join(lines)


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Names on the frontier of (latency lower, quality higher)."""
    front = []
    for lat, q, name in points:
        if not any((l2 <= lat and q2 >= q) and (l2 < lat or q2 > q) for l2, q2, _ in points):
            front.append(name)
    return front


def sweep_point_name(key: str, value: Any) -> str:
    """The label of one sweep point: ``PD/step_ratio`` at 0.5 is ``PD/step_ratio=0.5``."""
    return f"{key}={value}"


def all_points(results: dict[str, dict[str, Any]],
               sweeps: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every decoded setting by name: the decoder rows, then every sweep point."""
    points = dict(results)
    for key, rows in sweeps.items():
        points.update({sweep_point_name(key, r["value"]): r for r in rows})
    return points


def markdown_frontier(results: dict[str, dict[str, Any]], sweeps: dict[str, list[dict[str, Any]]],
                      baseline: str) -> str:
    """The Pareto frontier of latency against facts over every row and sweep point, fastest first.

    It answers "what is the fastest setting within so many points of AR" from the run
    itself (``Δ facts`` and ``speed-up`` are against the baseline row of the same run)."""
    points = all_points(results, sweeps)
    base = results[baseline]
    front = pareto([(r["latency_s"], r["fact_accuracy"], n) for n, r in points.items()])
    lines = ["| on the frontier | facts | Δ facts vs AR [95% CI] | chrF | speed-up vs AR [95% CI] | critical path |",
             "|" + "---|" * 6]
    for name in sorted(front, key=lambda n: points[n]["latency_s"]):
        r = points[name]
        lines.append(f"| {name} | {100 * r['fact_accuracy']:.1f}% "
                     f"| {100 * (r['fact_accuracy'] - base['fact_accuracy']):+.1f}"
                     f"{_interval(r.get('fact_accuracy_minus_ar_ci'), '+.1f', 100)} | {_chrf(r)} "
                     f"| {base['latency_s'] / r['latency_s']:.2f}x{_interval(r.get('speedup_vs_ar_ci'), '.2f')} "
                     f"| {r['critical_path']:.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], sweeps: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """Latency against quality (every sweep as a line of small points, the Pareto frontier
    over rows and sweep points marked), critical path per decoder, one plot per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    files = []
    points = all_points(results, sweeps)
    pts = [(r["latency_s"], r["fact_accuracy"], n) for n, r in points.items()]
    front = set(pareto(pts))
    colour = {name: f"C{i % 10}" for i, name in enumerate(results)}  # a row and its sweeps share one
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, rows in sweeps.items():
        ax.plot([r["latency_s"] for r in rows], [100 * r["fact_accuracy"] for r in rows], ".:", lw=1, alpha=0.7,
                color=colour.get(key.rpartition("/")[0]), label=key)
        for r in rows:
            if sweep_point_name(key, r["value"]) in front:
                ax.annotate(sweep_point_name(key.rpartition("/")[2], r["value"]), (r["latency_s"], 100 * r["fact_accuracy"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
    for name, r in results.items():
        lat, q = r["latency_s"], r["fact_accuracy"]
        ax.scatter(lat, 100 * q, s=60, marker="*" if name in front else "o", color=colour[name])
        ax.annotate(name, (lat, 100 * q), textcoords="offset points", xytext=(5, 5))
    fl = sorted((lat, q) for lat, q, n in pts if n in front)
    ax.plot([p[0] for p in fl], [100 * p[1] for p in fl], "k--", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.12)  # room for the labels of the extreme points inside the frame
    # within one decade matplotlib labels every minor tick in 10^x form, and they overlap: plain numbers, fewer ticks
    seconds = ticker.FuncFormatter(lambda v, _: f"{v:.2g}")
    ax.xaxis.set_major_formatter(seconds)
    ax.xaxis.set_minor_locator(ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.xaxis.set_minor_formatter(seconds)
    ax.set_xlabel("latency per response (s, log)")
    ax.set_ylabel("fact accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "latency_vs_quality.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(results)
    ax.bar(names, [results[n]["critical_path"] for n in names])
    ax.set_ylabel("forward passes on the critical path")
    fig.tight_layout()
    files.append(out / "critical_path.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    for key, rows in sweeps.items():
        fig, ax1 = plt.subplots(figsize=(5, 3.5))
        xs = [r["value"] for r in rows]
        ax1.plot(xs, [100 * r["fact_accuracy"] for r in rows], "o-", label="fact accuracy")
        ax1.set_xlabel(key.rpartition("/")[2])
        ax1.set_ylabel("fact accuracy (%)")
        ax2 = ax1.twinx()
        ax2.plot(xs, [r["latency_s"] for r in rows], "s--", color="tab:red", label="latency")
        ax2.set_ylabel("latency (s)")
        ax1.set_title(key)
        fig.tight_layout()
        files.append(out / f"sweep_{key.replace('/', '_')}.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def results_dir(cfg: BenchConfig) -> Path:
    """Where a run's results go: ``out_dir`` for the test split, ``out_dir/<split>`` for
    another, so choosing a knob on validation never overwrites the test results
    (the models in ``out_dir/models`` are shared)."""
    return Path(cfg.out_dir) if cfg.split == "test" else Path(cfg.out_dir) / cfg.split


def run(cfg: BenchConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    out = results_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    checkpoints: dict[str, Path] = {}
    for name, spec in cfg.models.items():  # in order: init_from refers to an earlier model
        checkpoints[name] = train_model(name, spec, cfg, checkpoints)
    prompts = load_prompts(cfg)
    lms = {name: LanguageModel.from_pretrained(path) for name, path in checkpoints.items()}
    swept = [(sw, value) for sw in cfg.sweeps for value in sw.values]
    jobs = [Job(row.name, lms[row.model], row.decoder, row.args) for row in cfg.decoders]
    for sw, value in swept:
        row, args = cfg.sweep_point(sw, value)
        jobs.append(Job(sweep_point_name(f"{sw.row}/{sw.knob}", value), lms[row.model], row.decoder, args))
    evaluated = evaluate_rows(jobs, prompts, cfg)  # every row and sweep point, taking turns
    results: dict[str, dict[str, Any]] = {}
    for row, (res, gens) in zip(cfg.decoders, evaluated[: len(cfg.decoders)], strict=True):
        results[row.name] = {"model": row.model, "decoder": row.decoder, "args": row.args, **res}
        with (out / f"generations_{row.name}.jsonl").open("w") as f:
            for p, g in zip(prompts, gens, strict=True):
                f.write(json.dumps({**g.to_dict(), "answer_keys": p["answer_keys"]}) + "\n")
        print(f"[bench] {row.name}: facts {100 * res['fact_accuracy']:.1f}%, {res['latency_s']:.3f} s, "
              f"critical path {res['critical_path']:.1f}")
    add_ratios(results, cfg.baseline, cfg.seed)
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for (sw, value), (res, _) in zip(swept, evaluated[len(cfg.decoders):], strict=True):
        key = f"{sw.row}/{sw.knob}"
        sweeps.setdefault(key, []).append(
            {"value": value, **res, **against_baseline(res, results[cfg.baseline], cfg.seed)})
        print(f"[bench] {sweep_point_name(key, value)}: facts {100 * res['fact_accuracy']:.1f}%, {res['latency_s']:.3f} s, "
              f"critical path {res['critical_path']:.1f}")
    table = markdown_table(results)
    families = markdown_families(results, cfg.baseline)
    if families:
        table += f"\n\nFacts per task family ({cfg.baseline}'s, then each row's difference in points):\n\n{families}"
    if sweeps:
        table += f"\n\n{markdown_sweeps(sweeps)}\n\n{markdown_frontier(results, sweeps, cfg.baseline)}"
    summary = {
        "config": asdict(cfg),
        "machine": machine_info(cfg.threads),
        "results": results,
        "sweeps": sweeps,
        "minutes": (time.time() - started) / 60,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table + "\n")
    files = plot(results, sweeps, out)
    print("\n" + table + "\n")
    print(f"[bench] machine: {describe(summary['machine'])}, {cfg.threads} threads")
    print(f"[bench] wrote {out / 'results.json'}, {out / 'results.md'} and {len(files)} plots in {out}")
    return summary


def config_from_args(prog: str, description: str | None, default: str, argv: list[str] | None) -> BenchConfig:
    """The bench YAML named on the command line, with its command-line overrides applied."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default=default, help="bench YAML")
    p.add_argument("--out_dir", help="override out_dir")
    p.add_argument("--limit", type=int, help="override the number of test prompts")
    p.add_argument("--split", choices=SPLITS,
                   help="override the split decoded (choose knobs on validation, report test)")
    p.add_argument("--seed", type=int, help="override the run's one seed (training, data, decoding): a replicate, "
                   "written to <out_dir>-seed<N> unless --out_dir is given")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}")
    if not Path(a.config).exists():
        p.error(f"{a.config} not found; run it from the repository root")
    try:
        cfg = BenchConfig.from_yaml(a.config)
    except ValueError as e:
        p.error(str(e))
    if a.seed is not None and a.seed != cfg.seed:
        cfg.seed = a.seed
        cfg.out_dir = f"{cfg.out_dir}-seed{a.seed}"  # never reuse models trained with another seed
    cfg.out_dir = a.out_dir or cfg.out_dir
    cfg.limit = a.limit or cfg.limit
    cfg.split = a.split or cfg.split
    return cfg


def main(argv: list[str] | None = None) -> int:
    run(config_from_args("pdlightning bench", __doc__, "configs/bench/tiny.yaml", argv))
    return 0
