"""``pdlightning evaluate alpaca``: decode AlpacaEval prompts with any decoder,
write ``model_outputs.json``, judge against reference outputs and compute the
length-controlled win rate with alpaca_eval's own code.

    pdlightning evaluate alpaca --prompts alpaca_eval.json --checkpoint DIR --decoder planned \\
        --reference reference_outputs.json --judge-url http://127.0.0.1:8000/v1 --judge-model NAME \\
        --out runs/alpaca/planned [--r 0.75 --tau 0.9 ...]

Every constructor argument of the decoder is an option, as in ``pdlightning generate``.
The prompts (and the reference, when judging) are read and checked before the model
loads; bad input ends the command with one line naming the file and line. A reused
``--out`` holds the new run only: the earlier run's ``annotations.json`` and
``leaderboard.json`` are removed once the new generations are done.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from pdlightning.eval.alpaca import (
    JudgeConfig,
    JudgeError,
    _alpaca_metrics,
    evaluate_alpaca,
    load_prompts,
    load_reference,
)
from pdlightning.generate import add_strategy_arguments, strategy_class, strategy_kwargs

PROG = "pdlightning evaluate alpaca"


def _fail(message: object) -> SystemExit:
    """The one-line exit of a bad input."""
    return SystemExit(f"{PROG}: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "alpaca":
        print("usage: pdlightning evaluate alpaca --prompts FILE_OR_HUB_NAME --checkpoint DIR --decoder NAME ...",
              file=sys.stderr)
        return 2
    argv = argv[1:]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--decoder", default="planned")
    cls = strategy_class(pre.parse_known_args(argv)[0].decoder, PROG)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True,
                   help="local .json (list) or .jsonl file of records with 'instruction', or a hub dataset name")
    p.add_argument("--checkpoint", required=True, help="a HF directory written by fit or export")
    p.add_argument("--decoder", default="planned")
    p.add_argument("--reference", help="reference model_outputs.json (alpaca_eval format) to judge against")
    p.add_argument("--judge-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default="judge")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the variable holding the key")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", required=True,
                   help="output directory (an earlier run's annotations/leaderboard there are replaced)")
    p.add_argument("--limit", type=int, help="first N prompts only (keeps alpaca_eval's order)")
    p.add_argument("--generator", help="generator name written in the outputs (default: the decoder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run the checkpoint's own modelling code (e.g. a Dream fine-tune)")
    p.add_argument("--seed", type=int, default=0)
    add_strategy_arguments(p, cls)
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be at least 1, got {a.limit}")
    if a.judge_url and not a.reference:
        p.error("--judge-url needs --reference (the alpaca_eval outputs file to judge against)")
    from pdlightning.decoding import LanguageModel, get_strategy

    try:
        strategy = get_strategy(a.decoder, **strategy_kwargs(a))
    except (TypeError, ValueError) as e:
        raise _fail(e) from None
    try:  # every input is read and checked before the model loads
        prompts = load_prompts(a.prompts, a.limit)
        refs = load_reference(a.reference, [q["instruction"] for q in prompts]) if a.reference else None
        if a.judge_url:
            _alpaca_metrics()
    except (ImportError, OSError, ValueError) as e:
        raise _fail(e) from None
    try:
        lm = LanguageModel.from_pretrained(a.checkpoint, device=a.device, trust_remote_code=a.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _fail(e) from None

    def generate(instructions: list[str]) -> list:
        return strategy.generate(lm, instructions, torch.Generator().manual_seed(a.seed))

    judge = JudgeConfig(base_url=a.judge_url, model=a.judge_model, api_key_env=a.api_key_env,
                        max_concurrency=a.concurrency) if a.judge_url else None
    try:
        board = evaluate_alpaca(prompts, generate, a.out, refs, judge, a.generator or strategy.name)
    except (ImportError, OSError, ValueError, RuntimeError, JudgeError) as e:
        raise _fail(e) from None
    print(json.dumps(board, indent=2))
    return 0
