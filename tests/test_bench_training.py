"""benchmarks/bench_training.py compares like with like: every arm trains on the
same examples in the same batches, and the recipe arm mixes in ``planned_ar``
rows at the fraction it is given while the planned arm has none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pdlightning.data.datamodule import PlannedDataModule, Stage

_spec = importlib.util.spec_from_file_location(
    "bench_training", Path(__file__).parents[1] / "benchmarks" / "bench_training.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def dm(tmp_path_factory: pytest.TempPathFactory) -> PlannedDataModule:
    dm = PlannedDataModule(cache_dir=str(tmp_path_factory.mktemp("cache")), batch_size=8,
                           stages=[Stage("planned", None)],
                           vocab_size=512, bundled_sizes={"train": 400, "validation": 8, "test": 8})
    dm.setup()
    return dm


def test_arms_share_examples_and_only_the_recipe_arm_has_planned_ar_rows(dm: PlannedDataModule):
    arms = bench.arm_batches(dm, steps=12, batch_size=8, ar_fraction=0.5)
    assert sorted(arms) == ["causal", "planned", "recipe"]
    assert all(len(b) == 12 for b in arms.values())
    for c, p, r in zip(arms["causal"], arms["planned"], arms["recipe"], strict=True):
        assert c.mode == "autoregressive" and p.mode == r.mode == "planned"
        # the same prompts in the same rows, so the same examples
        for b in (p, r):
            assert torch.equal(b.prompt_lengths, c.prompt_lengths)
            n = int(c.prompt_lengths.max())
            keep = torch.arange(n)[None] < c.prompt_lengths[:, None]
            assert torch.equal(b.input_ids[:, :n][keep], c.input_ids[:, :n][keep])
        assert c.answer_tokens == p.answer_tokens == r.answer_tokens == int(c.lengths.sum())
        assert torch.equal(p.lengths, r.lengths)  # one layout; only the rows' objective differs
        assert (p.lengths > c.lengths).all()  # plan, tags and pads
        assert not p.causal_rows.any()
    causal_rows = torch.cat([b.causal_rows for b in arms["recipe"]])
    assert 0.3 < causal_rows.float().mean().item() < 0.7  # 96 rows, each planned_ar with probability 0.5
    none = bench.arm_batches(dm, steps=12, batch_size=8, ar_fraction=0.0)
    assert not torch.cat([b.causal_rows for b in none["recipe"]]).any()
