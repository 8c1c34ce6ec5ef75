"""``pdlightning evaluate alpaca``: decode AlpacaEval prompts with any decoder,
write ``model_outputs.json``, judge against reference outputs and compute the
length-controlled win rate with alpaca_eval's own code.

    pdlightning evaluate alpaca --prompts alpaca_eval.json --checkpoint DIR --decoder planned \\
        --reference reference_outputs.json --judge-url http://127.0.0.1:8000/v1 --judge-model NAME \\
        --out runs/alpaca/planned [--r 0.75 --tau 0.9 ...]

Every constructor argument of the decoder is an option, as in ``pdlightning generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from pdlightning.eval.alpaca import JudgeConfig, evaluate_alpaca
from pdlightning.generate import add_strategy_arguments, strategy_class, strategy_kwargs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "alpaca":
        print("usage: pdlightning evaluate alpaca --prompts FILE_OR_HUB_NAME --checkpoint DIR --decoder NAME ...",
              file=sys.stderr)
        return 2
    argv = argv[1:]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--decoder", default="planned")
    cls = strategy_class(pre.parse_known_args(argv)[0].decoder, "pdlightning evaluate alpaca")
    p = argparse.ArgumentParser(prog="pdlightning evaluate alpaca", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="local .json/.jsonl with 'instruction', or a hub dataset name")
    p.add_argument("--checkpoint", required=True, help="a HF directory written by fit or export")
    p.add_argument("--decoder", default="planned")
    p.add_argument("--reference", help="reference model_outputs.json (alpaca_eval format) to judge against")
    p.add_argument("--judge-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default="judge")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the variable holding the key")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=int, help="first N prompts only (keeps alpaca_eval's order)")
    p.add_argument("--generator", help="generator name written in the outputs (default: the decoder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    add_strategy_arguments(p, cls)
    a = p.parse_args(argv)
    from pdlightning.decoding import LanguageModel, get_strategy

    try:
        strategy = get_strategy(a.decoder, **strategy_kwargs(a))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"pdlightning evaluate alpaca: {e}") from None
    try:
        lm = LanguageModel.from_pretrained(a.checkpoint, device=a.device)
    except OSError as e:
        raise SystemExit(f"pdlightning evaluate alpaca: {e}") from None

    def generate(instructions: list[str]) -> list:
        return strategy.generate(lm, instructions, torch.Generator().manual_seed(a.seed))

    judge = JudgeConfig(base_url=a.judge_url, model=a.judge_model, api_key_env=a.api_key_env,
                        max_concurrency=a.concurrency) if a.judge_url else None
    board = evaluate_alpaca(a.prompts, generate, a.out, a.reference, judge, a.generator or strategy.name,
                            limit=a.limit)
    print(json.dumps(board, indent=2))
    return 0
