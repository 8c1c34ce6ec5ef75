"""The documentation's code runs: the strategy of docs/decoding-strategies.md
is a working decoder usable by class path, and agrees with the built-in AR."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from mock_lm import make_mock_lm, planned_script

from pdlightning.decoding import get_strategy
from pdlightning.eval.bench import BenchConfig

ROOT = Path(__file__).resolve().parents[1]


def doc_strategy_module() -> types.ModuleType:
    text = (ROOT / "docs/decoding-strategies.md").read_text()
    block = re.search(r"```python\n(import torch.*?class RecomputeEveryToken.*?)```", text, re.S).group(1)
    assert 15 <= len(block.strip().splitlines()) <= 30  # "about 20 lines"
    module = types.ModuleType("docs_strategies")
    exec(compile(block, "docs/decoding-strategies.md", "exec"), module.__dict__)
    sys.modules["docs_strategies"] = module
    return module


def test_the_documented_strategy_matches_the_built_in_autoregressive_decoder():
    doc_strategy_module()
    lm = make_mock_lm(planned_script([("cat", "the cat"), ("dog", "a dog")]), confidence=0.9)
    prompts = [[3, 4, 5], [6, 7]]
    mine = get_strategy("docs_strategies.RecomputeEveryToken", max_new_tokens=40)
    ref = get_strategy("autoregressive", max_new_tokens=40)
    a = mine.generate(lm, prompts, torch.Generator().manual_seed(0))
    b = ref.generate(lm, prompts, torch.Generator().manual_seed(0))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.critical_path for g in a] == [len(g.token_ids) for g in a]


def test_the_documented_bench_rows_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    text = (ROOT / "docs/decoding-strategies.md").read_text()
    block = re.search(r"```yaml\n(decoders:.*?)```", text, re.S).group(1)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("models: {autoregressive: {configs: [configs/ar_tiny.yaml]}}\n" + block)
    with pytest.raises(ValueError, match="decoder row 'recompute'.*mypackage"):
        BenchConfig.from_yaml(cfg)  # the user's package is not importable: said before any training
    # the documented class, installed where the documented row names it
    monkeypatch.setitem(sys.modules, "mypackage", types.ModuleType("mypackage"))
    monkeypatch.setitem(sys.modules, "mypackage.strategies", doc_strategy_module())
    loaded = BenchConfig.from_yaml(cfg)
    assert [d.decoder for d in loaded.decoders] == ["autoregressive", "mypackage.strategies.RecomputeEveryToken"]
