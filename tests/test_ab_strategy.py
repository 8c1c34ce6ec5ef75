"""benchmarks/ab_strategy.py loads a strategy module as it was at a git ref beside the working tree's.

Loaded at HEAD, the old module must register its strategies under new names,
as classes of their own, and decode exactly as the working tree's (HEAD's
planned.py is the tree's in a clean checkout; a test run with it edited skips).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch
from mock_lm import make_mock_lm, planned_script

from pdlightning.decoding import base
from pdlightning.decoding.base import DecodingStrategy, strategy_class
from pdlightning.decoding.planned import PlannedDiffusion

ROOT = Path(__file__).parents[1]
MODULE = "pdlightning/decoding/planned.py"
_spec = importlib.util.spec_from_file_location("ab_strategy", ROOT / "benchmarks" / "ab_strategy.py")
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def _head_is_tree() -> bool:
    try:
        head = subprocess.run(["git", "show", f"HEAD:{MODULE}"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return head.stdout == (ROOT / MODULE).read_text()


@pytest.mark.skipif(not _head_is_tree(), reason="needs a git checkout whose planned.py is HEAD's")
def test_old_module_registers_its_own_classes_and_decodes_as_the_tree(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the _old names leave with the test
    ab.load_old("HEAD", MODULE)
    old = strategy_class("planned_old")
    assert issubclass(old, DecodingStrategy) and old is not PlannedDiffusion
    script = planned_script([("mat", "the cat sat"), ("park", "a dog ran")])
    for r in (1.0, 0.5):
        outs = []
        for cls in (PlannedDiffusion, old):
            lm = make_mock_lm(script, plan_stream=True, confidence=[0.99, 0.6, 0.8])
            (g,) = cls(max_new_tokens=200, step_ratio=r).generate(lm, ["the cat"], generator=torch.Generator().manual_seed(0))
            outs.append((g.token_ids, g.counters.critical_path))
        assert outs[0] == outs[1]
        assert outs[0][0]  # something was decoded
