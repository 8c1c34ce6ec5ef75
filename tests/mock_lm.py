"""A mock backbone with scripted logits, for decoding tests of every strategy.

:class:`ScriptedBackbone` has the call signature of a transformers causal LM
(``input_ids, attention_mask, position_ids, past_key_values, use_cache``) and
returns ``.logits`` and ``.past_key_values`` (a real ``DynamicCache`` whose one
layer stores each column's ``(id, position)``, so crops and column surgery
behave as on a real model). Its prediction for a query depends only on the
query's position and on the ``(id, position)`` pairs it may attend to, never
on physical columns: left padding, holes, cache layout and batching cannot
change it, while a wrong mask or a stale cache does.

The rule, for a query at position ``q`` scoring position ``t = q + shift``
(``shift`` = 1 shifted, 0 aligned): let ``start`` be one past the latest
visible *anchor* (``<|assistant|>``; 0 without one) and ``j = t - start``.

* ``script[j]`` when ``0 <= j < len(script)`` and it is not None: a scripted
  response, e.g. a plan ``<topic>a 1</topic>``, its spans, then the end token.
  A masked position therefore predicts its scripted token.
* ``after`` past the end of the script (when not None).
* Otherwise a *context word*: ``words[h % len(words)]`` with ``h`` hashed from
  every visible ``(id, position)`` and ``t``.
* With ``plan_stream``, a next-token query (``t`` not visible to it) whose
  target is ``<async>`` gets the script's next terminator instead, so a planned
  decoder's plan stream ends where its spans are inserted.

The target gets probability ``confidence[j % len(confidence)]`` exactly; the
rest is spread evenly over the vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen2Config

from pdlightning.decoding.lm import LanguageModel
from pdlightning.layout import entry_ids, span_ids
from pdlightning.tags import PlanEntry, TagSpec
from pdlightning.tokenizer import build_tokenizer

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "red blue green big small one two three",
    "name age city summary 1 2 3 4 5",
] * 10
WORD_TEXT = "cat dog mat park sat ran red blue green big small"


@functools.cache
def mock_tokenizer(length_unit: int = 2) -> tuple[PreTrainedTokenizerFast, TagSpec]:
    """A small BPE tokenizer with the control tokens (built once per length unit)."""
    return build_tokenizer(TEXTS, TagSpec(length_unit=length_unit), vocab_size=300)


def word_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of plain word tokens (the context words)."""
    ids = tokenizer.encode(WORD_TEXT, add_special_tokens=False)
    return sorted({t for t in ids if tokenizer.decode([t]).strip()})


def encode(text: str, length_unit: int = 2) -> list[int]:
    """Ids of ``text`` with the mock tokenizer."""
    tok, _ = mock_tokenizer(length_unit)
    return list(tok.encode(text, add_special_tokens=False))


def planned_script(
    spans: Sequence[tuple[str, str]], topic_heads: bool = True, length_unit: int = 2
) -> list[int]:
    """A one-round planned response: the plan, one span per entry, then the end token.

    Args:
        spans: ``(topic, content)`` per span; the planned length covers the
            content, padded with pad tokens to whole units.
        topic_heads: Open each span with its topic words.
        length_unit: Tokens per planned unit (of the mock tokenizer's spec).

    Returns:
        The response ids in the planned layout.
    """
    tok, spec = mock_tokenizer(length_unit)
    plan: list[int] = []
    body: list[int] = []
    for topic, content in spans:
        ids = encode(content, length_unit)
        units = spec.units(len(ids))
        plan += entry_ids(tok, spec, PlanEntry(topic, units))
        body += span_ids(
            tok, spec, ids, topic if topic_heads else None, units * length_unit - len(ids)
        )
    return [*plan, *body, spec.id("end")]


class ScriptedBackbone(torch.nn.Module):
    """Backbone whose logits follow a script (see the module docstring).

    Args:
        vocab_size: Logits width.
        script: Target ids from the response start (None = context word).
        words: Ids the context words are drawn from.
        shift: 1 (shifted convention) or 0 (aligned).
        confidence: Probability of the target, cycled over ``j``.
        after: Target past the script (None = context word).
        anchor_id: Token whose next position starts the response (None = position 0).
        plan_stream: ``(span_open id, terminator ids)`` to end plan streams where
            spans start; None = off.
    """

    def __init__(
        self,
        vocab_size: int,
        script: Sequence[int | None] = (),
        words: Sequence[int] = (0,),
        shift: int = 1,
        confidence: float | Sequence[float] = 0.99,
        after: int | None = None,
        anchor_id: int | None = None,
        plan_stream: tuple[int, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.script = torch.tensor([-1 if s is None else s for s in script], dtype=torch.long)
        self.words = torch.tensor(list(words), dtype=torch.long)
        self.shift = shift
        conf = [confidence] if isinstance(confidence, (int, float)) else list(confidence)
        if not all(1 / vocab_size < c <= 1 for c in conf):
            raise ValueError("confidence must be in (1/vocab_size, 1]")
        self.confidence = torch.tensor(conf, dtype=torch.float)
        self.after = after
        self.anchor_id = -1 if anchor_id is None else anchor_id
        self.next_terminator = None
        if plan_stream is not None:
            self.span_open, terms = plan_stream[0], set(plan_stream[1])
            nxt, following = [], after if after is not None else -1
            for s in reversed([-1 if s is None else s for s in script]):
                following = s if s in terms else following
                nxt.append(following)
            self.next_terminator = torch.tensor(nxt[::-1], dtype=torch.long)
        self.config = Qwen2Config(
            num_hidden_layers=1,
            hidden_size=8,
            num_attention_heads=1,
            num_key_value_heads=1,
            vocab_size=vocab_size,
        )
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        **_: Any,
    ) -> SimpleNamespace:
        """Scripted logits ``[B, K, V]`` and the cache extended with the fed columns."""
        self.calls += 1
        cache = past_key_values
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            feats = torch.stack([input_ids, position_ids], -1).float()[:, None]
            keys, _ = cache.update(feats, feats, 0)
            kid, kpos = keys[:, 0, :, 0].long(), keys[:, 0, :, 1].long()
        else:
            kid, kpos = input_ids, position_ids
        vis = attention_mask[:, 0].bool()
        if vis.shape[-1] != kid.shape[1]:
            raise ValueError(f"mask has {vis.shape[-1]} columns for {kid.shape[1]} keys")
        logits = self._logits(vis, position_ids + self.shift, kid[:, None, :], kpos[:, None, :])
        return SimpleNamespace(logits=logits, past_key_values=cache if use_cache else None)

    def _logits(
        self, vis: torch.Tensor, t: torch.Tensor, kid: torch.Tensor, kpos: torch.Tensor
    ) -> torch.Tensor:
        anchor = torch.where(vis & (kid == self.anchor_id), kpos, -1).amax(-1)
        j = t - anchor - 1  # [B, K]
        n = len(self.script)
        in_script = (j >= 0) & (j < n)
        jj = j.clamp(0, max(n - 1, 0))
        target = torch.where(in_script, self.script[jj] if n else -1, -1)
        if self.after is not None:
            target = torch.where(j >= n, self.after, target)
        if self.next_terminator is not None:
            sees_t = (vis & (kpos == t[..., None])).any(-1)
            swap = in_script & ~sees_t & (target == self.span_open)
            target = torch.where(swap, self.next_terminator[jj], target)
        h = (vis * (kid * (kpos + 1))).sum(-1) + 7 * t
        target = torch.where(target >= 0, target, self.words[h % len(self.words)])
        p = self.confidence[j.clamp(min=0) % len(self.confidence)]
        boost = torch.where(
            p >= 1, torch.full_like(p, 50.0), torch.log(p * (self.vocab_size - 1) / (1 - p).clamp_min(1e-9))
        )
        logits = torch.zeros(*t.shape, self.vocab_size)
        logits.scatter_(-1, target[..., None], boost[..., None])
        return logits


def make_mock_lm(
    script: Sequence[int | None] | None = None,
    *,
    confidence: float | Sequence[float] = 0.99,
    logits: str = "shifted",
    after: int | str | None = "end",
    plan_stream: bool = False,
    length_unit: int = 2,
) -> LanguageModel:
    """A :class:`LanguageModel` around a :class:`ScriptedBackbone` and the mock tokenizer.

    Args:
        script: Response ids from the start of the response (None entries =
            context words); default: a one-round planned response.
        confidence: Probability of each target (cycled over response positions).
        logits: ``"shifted"`` or ``"aligned"``.
        after: Target past the script: a control name, an id, or None (context words).
        plan_stream: End plan streams where the spans start (planned decoders).
        length_unit: Tokens per planned unit.

    Returns:
        The language model; ``lm.backbone`` is the :class:`ScriptedBackbone`.
    """
    tok, spec = mock_tokenizer(length_unit)
    if script is None:
        script = planned_script([("cat", "the cat"), ("dog", "a dog ran")])
    after_id = spec.id(after) if isinstance(after, str) else after
    backbone = ScriptedBackbone(
        len(tok),
        script,
        words=word_ids(tok),
        shift=1 if logits == "shifted" else 0,
        confidence=confidence,
        after=after_id,
        anchor_id=tok.convert_tokens_to_ids("<|assistant|>"),
        plan_stream=(spec.id("span_open"), (spec.id("sync"), spec.id("end"))) if plan_stream else None,
    )
    return LanguageModel(backbone, tok, spec, logits=logits)  # type: ignore[arg-type]

