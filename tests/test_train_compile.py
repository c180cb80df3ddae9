"""train.compile: the blocks compiled in place train like the eager model, from one graph per kind
of block."""

from __future__ import annotations

import json

import torch
from test_train_failures import _final_state, make_trainer  # tests/test_train_failures.py
from torch._dynamo.utils import counters


def _losses(run_dir) -> list[float]:
    return [json.loads(r)["loss"] for r in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in r]


def test_compiled_blocks_train_like_eager_from_two_graphs(tmp_path, digits_dir):
    """Four blocks (two dense, two DiffMoE): dynamo traces one forward graph per kind of block and
    reuses it for the others, so the first step's compilation does not grow with the depth; three
    steps then end in the eager run's losses, weights, EMA, optimizer state and DiffMoE thresholds
    (to float32 rounding: inductor fuses the elementwise work in another order)."""
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compiled in (False, True):
        (tmp_path / str(compiled)).mkdir()
        trainer = make_trainer(tmp_path / str(compiled), digits_dir, "model.depth=4", "train.steps=3",
                               f"train.compile={str(compiled).lower()}")
        assert trainer.fit() == 0
        runs[compiled] = (_losses(tmp_path / str(compiled) / "run"), _final_state(trainer))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    (eager_losses, eager), (compiled_losses, state) = runs[False], runs[True]
    assert len(eager_losses) == 3
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert state.keys() == eager.keys()  # checkpoints keep the parameter names
    for key in eager:
        torch.testing.assert_close(state[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
