"""Where the planned model's facts go: its value look-ups and its plans, per task family.

    python benchmarks/probe_lookup.py [--models runs/quickstart/models] [--limit 60]

Two probes on the bundled test prompts, with the models `pdlightning demo` (or
`pdlightning bench`) trained:

- **Look-ups, teacher-forced.** The reference answer is given and only the
  tokens of its answer keys (names, values, numbers; not function words) are to
  be predicted, greedily, each model in its own layout: the planned model sees
  the reference plan and every span with those tokens masked (one pass); an AR
  model (the baseline, the warm-up) predicts each from the answer to its left.
  This is how well a model can look a value up when the rest is right.
  A planned model is also probed with the key tokens to the left of each one
  given ("left keys given": one pass per key token), which is what an AR
  model's teacher forcing gives it: ``100`` is three tokens, and AR predicts
  the last ``0`` having seen ``1 0``. Compare AR models with this column.
- **Reference plans** (planned models): facts of the planned decoder with its
  own plan, and with the reference answer's first plan forced in its place.
  The difference is what the plans cost; what is left is the spans'.

Prints one table (a row per family, then all) and one JSON line last.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import torch

from pdlightning.data.synthetic import fact_accuracy
from pdlightning.decoding import LanguageModel
from pdlightning.decoding.dense_planned import DensePlannedDiffusion
from pdlightning.decoding.planned import PlannedDiffusion
from pdlightning.eval.bench import BenchConfig
from pdlightning.eval.machine import machine_info
from pdlightning.layout import encode_plain, encode_response, entry_ids
from pdlightning.masks import Role, batch_attention_mask, roles
from pdlightning.tags import parse
from pdlightning.tokenizer import format_prompt

PLANNED = {"planned": False, "dense_planned": True}  # model directory -> dense attention
AUTOREGRESSIVE = ("autoregressive", "warmup")  # the other models (diffusion, ablations) are skipped
FUNCTION_WORDS = "a an of the named called and , ."


class ReferencePlan(PlannedDiffusion):
    """Planned diffusion with the first round's plan forced to ``plan_ids`` (batch size 1)."""

    plan_ids: list[int] = []
    terminator: int = 0

    def _plan_round(self, lm: LanguageModel, st: Any, generator: torch.Generator) -> None:
        if st.rounds[0] > 0:
            return super()._plan_round(lm, st, generator)
        st.plan_start[0] = len(st.seq[0])
        st.seq[0].extend(self.plan_ids)
        st.terminator[0] = self.terminator


class DenseReferencePlan(ReferencePlan):
    """The same for models trained with dense attention among a round's spans."""

    dense = True


def key_token_ids(lm: LanguageModel, keys: list[str]) -> set[int]:
    enc = lm.tokenizer.encode
    return {i for k in keys for i in enc(k, add_special_tokens=False)} - set(
        enc(FUNCTION_WORDS, add_special_tokens=False)
    )


@torch.inference_mode()
def lookup_accuracy(lm: LanguageModel, row: dict, dense: bool | None, left_keys: bool = False) -> float:
    """Greedy accuracy on the reference answer's key tokens (``dense`` None = an AR model).

    ``left_keys``: a planned model predicts each key token with the key tokens
    to its left unmasked, one pass each (an AR model always has them).
    """
    spec, tok = lm.spec, lm.tokenizer
    prompt = format_prompt(tok, row["prompt"])
    if dense is None:
        response = encode_plain(row["response"], tok, spec)
    else:  # every span as long as its plan says, as the decoder lays it out
        ref = parse(row["tagged"], spec)
        entries = [e for r in ref.rounds for e in r.entries]
        spans = [s for r in ref.rounds for s in r.spans]
        pads = [max(0, e.length * spec.length_unit - len(tok.encode(s, add_special_tokens=False)))
                for e, s in zip(entries, spans, strict=True)]
        response = encode_response(ref, tok, spec, topic_heads=True, pads=pads)
    ids = torch.tensor([prompt + response], device=lm.device)
    key_ids = key_token_ids(lm, row["answer_keys"])
    keys = torch.tensor([[t in key_ids for t in ids[0].tolist()]], device=lm.device)
    if dense is None:
        probe = keys.clone()
        probe[:, : len(prompt)] = False
        x = ids
    else:
        role = roles(ids, spec, torch.tensor([len(prompt)], device=lm.device))
        probe = keys & (role == Role.CONTENT)
        x = torch.where(probe, spec.id("mask"), ids)
    targets = probe[0].nonzero()[:, 0]
    per_key = left_keys and dense is not None
    if per_key:  # row k: key tokens k, k+1, ... masked; scores key token k
        x = ids.repeat(len(targets), 1)
        later = targets[None, :] >= targets[:, None]
        x[:, targets] = torch.where(later, spec.id("mask"), x[:, targets])
    mask = batch_attention_mask(x, spec, dense=bool(dense))
    pos = torch.arange(x.shape[1], device=lm.device)[None].expand(x.shape[0], -1)
    pred = lm.forward(x, mask, pos).logits.argmax(-1)
    if lm.shift or dense is None:  # token i scored at i - 1
        pred = torch.cat([pred[:, :1], pred[:, :-1]], dim=1)
    pred = pred[torch.arange(len(targets)) if per_key else 0, targets]
    return float((pred == ids[0, targets]).float().mean())


def planned_facts(lm: LanguageModel, row: dict, dense: bool, reference: bool) -> float:
    own = DensePlannedDiffusion if dense else PlannedDiffusion
    dec = (DenseReferencePlan if dense else ReferencePlan)(max_new_tokens=600) if reference else own(max_new_tokens=600)
    if reference:
        first = parse(row["tagged"], lm.spec).rounds[0]
        dec.plan_ids = [i for e in first.entries for i in entry_ids(lm.tokenizer, lm.spec, e)]
        dec.terminator = lm.spec.id("sync" if first.sync else "end")
    return fact_accuracy(dec.generate(lm, [row["prompt"]])[0].text, row["answer_keys"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="runs/quickstart/models")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from pdlightning.data.sources import load_rows

    cfg = BenchConfig()
    data = load_rows("bundled", cfg.cache_dir, seed=cfg.seed)[cfg.split]
    rows = [data[i] for i in range(min(a.limit, len(data)))]
    dirs = sorted(d for d in Path(a.models).iterdir() if (d / "hf/model.safetensors").exists())
    if not dirs:
        raise SystemExit(f"no trained models under {a.models}: run `pdlightning demo` first")
    scores: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for d in dirs:
        if d.name not in PLANNED and d.name not in AUTOREGRESSIVE:
            continue
        lm = LanguageModel.from_pretrained(d / "hf")
        dense = PLANNED.get(d.name)
        for row in rows:
            found = {f"{d.name} look-ups": lookup_accuracy(lm, row, dense)}
            if dense is not None:
                found[f"{d.name} look-ups, left keys given"] = lookup_accuracy(lm, row, dense, left_keys=True)
                found[f"{d.name} facts"] = planned_facts(lm, row, dense, reference=False)
                found[f"{d.name} facts, ref. plan"] = planned_facts(lm, row, dense, reference=True)
            for col, v in found.items():
                scores[col][row["family"]].append(v)
                scores[col]["all"].append(v)
    families = sorted({f for col in scores.values() for f in col} - {"all"}) + ["all"]
    print(f"{'family':<13}" + "".join(f"{c:>{max(10, len(c) + 2)}}" for c in scores))
    table = {c: {f: sum(v[f]) / len(v[f]) for f in families if v[f]} for c, v in scores.items()}
    for f in families:
        print(f"{f:<13}" + "".join(f"{100 * table[c].get(f, float('nan')):>{max(10, len(c) + 2) - 1}.1f}%"
                                   for c in scores))
    print(json.dumps({"prompts": len(rows), "per_prompt_mean": table, "machine": machine_info(a.threads)}))


if __name__ == "__main__":
    main()
