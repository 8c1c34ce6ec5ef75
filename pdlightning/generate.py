"""``pdlightning generate``: decode prompts with any decoding strategy.

Every constructor argument of the chosen strategy is a command-line option
(``--step_ratio 0.5`` or its short alias ``--r 0.5``; ``--threshold``/``--tau``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: Short aliases of the paper's knob names.
ALIASES = {"r": "step_ratio", "tau": "threshold"}

COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m"]
RESET, DIM = "\033[0m", "\033[2m"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(annotation: Any) -> Any:
    """An argparse ``type`` for a constructor annotation (Optional and Literal included)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return str
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return _converter(args[0]) if args else str
    if annotation is bool:
        return _bool
    if annotation in (int, float, str):
        return annotation
    return json.loads


def strategy_class(name: str, prog: str = "pdlightning generate") -> type:
    """The class behind ``--decoder`` (short name or class path), or exit naming the problem."""
    from pdlightning.decoding.base import strategy_class as resolve

    try:
        return resolve(name)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{prog}: {e}") from None


def _hints(init: Any) -> dict[str, Any]:
    """Type hints of one ``__init__`` (empty when they cannot be resolved)."""
    try:
        return typing.get_type_hints(init)
    except Exception:  # an unresolvable forward reference in a user's class: fall back to the defaults
        return {}


def _choices(annotation: Any) -> list[Any] | None:
    """The values of a ``Literal`` (also inside ``Optional``), else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is typing.Literal:
            return list(typing.get_args(a))
    return None


def knob_descriptions(cls: type) -> dict[str, str]:
    """Each constructor argument's description from the ``Args:`` sections of the
    docstrings of ``cls`` and the classes it derives from (the most derived wins)."""
    import docstring_parser

    found: dict[str, str] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        for doc in (klass.__dict__.get("__doc__"), getattr(init, "__doc__", None)):
            if not doc:
                continue
            try:
                params = docstring_parser.parse(doc).params
            except docstring_parser.ParseError:  # a user's free-form docstring: no descriptions from it
                continue
            for param in params:
                if param.description:
                    found.setdefault(param.arg_name, " ".join(param.description.replace("``", "").split()))
    return found


def add_strategy_arguments(parser: argparse.ArgumentParser, cls: type) -> list[str]:
    """Add one option per constructor argument of ``cls`` and of the classes it derives
    from (a subclass passing ``**kwargs`` on keeps every inherited knob); return their names.

    Each option's type is its annotation in the class that declares it, else the
    type of its default (a ``bool`` default parses ``false`` as False), else text.
    Its help is its description in the classes' docstrings (``Args:``) and its default.
    """
    descriptions = knob_descriptions(cls)
    names: list[str] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        hints = _hints(init)
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in seen:
                continue
            seen.add(p.name)
            flags = [f"--{p.name}"] + [f"--{a}" for a, target in ALIASES.items() if target == p.name]
            default = None if p.default is inspect.Parameter.empty else p.default
            annotation = hints.get(p.name, str if default is None else type(default))
            choices = _choices(annotation)
            parser.add_argument(
                *flags, dest=f"strategy__{p.name}", type=_converter(annotation), choices=choices,
                metavar=None if choices else p.name.upper(),
                default=argparse.SUPPRESS,
                help=f"{descriptions.get(p.name, klass.__name__ + ' argument')} (default {default!r})".replace("%", "%%"),
            )
            names.append(p.name)
    return names


def strategy_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    return {k.removeprefix("strategy__"): v for k, v in vars(ns).items() if k.startswith("strategy__")}


def _read_prompts(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    """The prompts of ``--prompt`` or of the ``--input`` file, and each one's system
    prompt: a row's own ``system``, else ``--system`` (ValueError/OSError naming the file)."""
    if args.prompt:
        return list(args.prompt), [args.system] * len(args.prompt)
    prompts: list[str] = []
    systems: list[str | None] = []
    try:
        with open(args.input, encoding="utf-8") as f:
            lines = list(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {args.input}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--input {args.input}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.input}:{n}: not JSON ({e})") from None
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{args.input}:{n}: needs a 'prompt' (or 'instruction') string")
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{args.input}:{n}: 'system' must be a string (or null), got {type(system).__name__}")
        prompts.append(text)
        systems.append(system if system is not None else args.system)
    if not prompts:
        raise ValueError(f"--input {args.input}: no prompts in it (one JSON object with a 'prompt' per line)")
    return prompts, systems


def show(generation: Any, colour: bool, spans: bool = True) -> str:
    """A response with its plan and (unless they were streamed already) each span in colour."""
    lines = []
    if generation.plan is not None:
        plan = ", ".join(f"{e.topic or '-'} ({e.length})" for e in generation.plan)
        lines.append(f"{DIM}plan:{RESET} {plan}" if colour else f"plan: {plan}")
        for k, (entry, span) in enumerate(zip(generation.plan, (generation.spans or []) if spans else [],
                                              strict=False)):
            c = COLOURS[k % len(COLOURS)] if colour else ""
            lines.append(f"{c}[{entry.topic or k}] {span.strip()}{RESET if colour else ''}")
        if generation.repairs:
            lines.append(f"repairs: {', '.join(generation.repairs)}")
    c = generation.counters
    lines.append(
        f"answer: {generation.text}\n"
        f"({c.critical_path} passes on the critical path, {c.forward_passes} in all, "
        f"{c.fed_positions} positions fed, "
        f"{c.content_tokens} content tokens, {c.seconds:.2f} s)"
    )
    return "\n".join(lines)


def _why_empty(g: Any) -> str:
    """Why a generation without repairs has no answer text."""
    n = len(g.token_ids)
    if n <= 1:
        return "the model ended at once"
    return f"{n} tokens generated, none of them answer text (tags, plan entries or pads only)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--decoder", default="planned")
    known, _ = pre.parse_known_args(argv)
    cls = strategy_class(known.decoder)
    p = argparse.ArgumentParser(prog="pdlightning generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a HF directory written by fit (ExportHF) or export")
    p.add_argument("--decoder", default="planned",
                   help="short name or class path of a DecodingStrategy (with --help: that decoder's options)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--input", help="JSONL file with a 'prompt' per line (and optionally its own 'system')")
    p.add_argument("--system", help="a system prompt for every prompt without its own (formatted as training "
                                    "formats a row's system)")
    p.add_argument("--output", help="write one JSON result per line here (a file there is replaced when the run ends)")
    p.add_argument("--show-plan", action="store_true", help="show the plan and each span in colour")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (matters when --temperature > 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"],
        help="the backbone's attention (flex_attention is for GPUs)",
    )
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run the checkpoint's own modelling code (e.g. a Dream fine-tune)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_strategy_arguments(p, cls)
    args = p.parse_args(argv)
    if args.input and args.output and Path(args.output).exists() and Path(args.output).samefile(args.input):
        p.error(f"--output {args.output} is the --input file: the results would overwrite the prompts")
    if args.output and Path(args.output).is_dir():
        p.error(f"--output {args.output} is a directory; name a file")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from pdlightning.decoding import LanguageModel, get_strategy

    try:
        strategy = get_strategy(args.decoder, **strategy_kwargs(args))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"pdlightning generate: {e}") from None
    try:
        prompts, systems = _read_prompts(args)
        lm = LanguageModel.from_pretrained(
            args.checkpoint, device=args.device, attn_implementation=args.attn_implementation,
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, ValueError) as e:  # a missing checkpoint or prompt file; flex on CPU
        raise SystemExit(f"pdlightning generate: {e}") from None
    out = None
    if args.output:  # written beside, then renamed over --output: a failed run leaves an earlier file whole
        target = Path(args.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        out = partial.open("w")
    colour = sys.stdout.isatty()

    shown = 0  # prompts of the batches printed so far
    # planned strategies stream each round's spans as it completes (one prompt at a time: a batch would interleave)
    stream = args.show_plan and hasattr(strategy, "on_spans") and strategy.batch_size == 1
    if stream:

        def on_spans(row: int, entries: list[Any], spans: list[str]) -> None:
            if not streamed:
                print(f"> {prompts[shown]}", flush=True)
            streamed.append(row)
            for k, (entry, span) in enumerate(zip(entries, spans, strict=False)):
                c = COLOURS[k % len(COLOURS)] if colour else ""
                print(f"  {c}... [{entry.topic or k}] {span.strip()}{RESET if colour else ''}", flush=True)

        strategy.on_spans = on_spans
    streamed: list[int] = []

    def on_batch(done: list[Any]) -> None:
        nonlocal shown
        for g in done:
            if not streamed:
                print(f"> {g.prompt}")
            if args.show_plan:
                print(show(g, colour, spans=not streamed))
            else:  # an empty answer says why (e.g. a planned decoder on a model that never learnt to plan)
                print(g.text or f"(no answer; {', '.join(g.repairs) or _why_empty(g)})")
            print()
            streamed.clear()
            shown += 1
            if out is not None:
                out.write(json.dumps(g.to_dict()) + "\n")
                out.flush()

    from pdlightning.decoding.base import PromptError

    try:
        strategy.generate(lm, prompts, torch.Generator().manual_seed(args.seed), on_batch=on_batch,
                          system=systems)
    except PromptError as e:  # checked before the first pass: nothing was decoded
        if out is not None:
            out.close()
            partial.unlink()
        raise SystemExit(f"pdlightning generate: {e}") from None
    if out is not None:
        out.close()
        partial.replace(target)
        print(f"wrote {len(prompts)} results to {target}")
    return 0
