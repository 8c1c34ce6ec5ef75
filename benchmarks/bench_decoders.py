"""Forward passes and latency per decoder at batch 1 and batch 8 on the tiny
models, ratios against AR from the same run.

    python benchmarks/bench_decoders.py [--models runs/quickstart/models] [--limit 32]

Uses the models `pdlightning demo` (or `pdlightning bench`) trained: the AR
baseline for AR, the planned model for PD, and, when present, the dense and
diffusion models for PD-DA, vanilla diffusion and Fast-dLLM. Latency is per
response: batch seconds / batch size; forward passes are those of the batch a
response was decoded in. The rows take turns over chunks of prompts (the largest batch size), so a
spell of a slower machine hits them alike. Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pdlightning.decoding import LanguageModel
from pdlightning.eval.bench import BenchConfig, Job, evaluate_rows, load_prompts
from pdlightning.eval.machine import machine_info

ROWS = [  # name, model directory, decoder, args
    ("AR", "autoregressive", "autoregressive", {"max_new_tokens": 400}),
    ("diffusion", "diffusion", "diffusion", {"max_new_tokens": 256}),
    ("Fast-dLLM", "diffusion", "fast_dllm", {"max_new_tokens": 256}),
    ("PD", "planned", "planned", {"max_new_tokens": 600}),
    ("PD-DA", "dense_planned", "dense_planned", {"max_new_tokens": 600}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="runs/quickstart/models")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = BenchConfig(limit=a.limit, warmup=2)
    prompts = load_prompts(cfg)
    models = {d.name: d / "hf" for d in Path(a.models).iterdir() if (d / "hf/model.safetensors").exists()}
    if "autoregressive" not in models:
        raise SystemExit(f"no AR model under {a.models}: run `pdlightning demo` first")
    lms = {name: LanguageModel.from_pretrained(path) for name, path in models.items()}
    jobs = [Job(f"{name}@{bs}", lms[model], decoder, {**args, "batch_size": bs})
            for bs in a.batch_sizes for name, model, decoder, args in ROWS if model in lms]
    out = {j.label: res for j, (res, _) in zip(jobs, evaluate_rows(jobs, prompts, cfg), strict=True)}  # taking turns
    for key, r in out.items():
        base = out[f"AR@{key.split('@')[1]}"]
        r["speedup_vs_ar"] = base["latency_s"] / r["latency_s"]
        r["passes_vs_ar"] = r["forward_passes"] / base["forward_passes"]
    print(f"{'decoder@batch':<16}{'facts':>7}{'latency s':>11}{'speed-up':>10}{'passes':>9}{'vs AR':>7}"
          f"{'crit path':>11}{'fed':>8}")
    for key, r in out.items():
        print(f"{key:<16}{100 * r['fact_accuracy']:>6.1f}%{r['latency_s']:>11.3f}{r['speedup_vs_ar']:>9.2f}x"
              f"{r['forward_passes']:>9.1f}{r['passes_vs_ar']:>7.2f}{r['critical_path']:>11.1f}"
              f"{r['fed_positions']:>8.0f}")
    print(json.dumps({"bench": "decoders", "results": out, "machine": machine_info(a.threads)}))


if __name__ == "__main__":
    main()
