"""train.cuda_graph: the trainer's bookkeeping around a step whose inputs and outputs are static
tensors (on CPU the replay is emulated: StepGraph(capture=False) calls the step on the static inputs
and copies its results into the same output tensors, as a graph's replay overwrites them), the
learning rate held in a tensor, and the named errors. The captured replay itself: tests/test_train_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_failures import _final_state, make_trainer, poison_batch  # tests/test_train_failures.py

from moedit.errors import MoeditError
from moedit.train.step_graph import StepGraph


def _rows(run_dir) -> list[dict]:
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if "per_s" not in k and "wait" not in k} for r in rows]


def _emulate_graph(trainer) -> StepGraph:
    trainer._step_graph = trainer._new_step_graph(capture=False)
    return trainer._step_graph


REPA = "tiny-diffmoe model.patch_size=1 train.repa.enabled=true train.repa.projector_hidden=32"


@pytest.mark.parametrize("poisoned,micro,flavor", [(set(), 0, "tiny-diffmoe"), ({1, 4}, 0, "tiny-diffmoe"),
                                                   ({4}, 4, "tiny-diffmoe"), ({4}, 0, "tiny-tc"), ({4}, 0, "tiny-ec"),
                                                   ({4}, 0, "tiny-ditmoe moe.aux_free_bias=true"), ({4}, 4, REPA)])
def test_static_step_trains_bitwise_as_the_eager_step(tmp_path, request, poisoned, micro, flavor):
    """Two warm-up steps, then four on the static inputs and outputs: the same weights, EMA, optimizer
    state, DiffMoE thresholds, logged rows and skip count as the eager deferred step, bit for bit,
    with NaN batches in a warm-up step and in a static one (whose flags must outlive the next step
    overwriting the static outputs), with two micro-batches a step (micro = 4 of 8), and with every
    router: DiffMoE, token choice, per-sample expert choice, and DiT-MoE's shared experts with
    aux-loss-free biases (buffers the forward updates and a discarded step restores); and with REPA,
    whose encoder features are one more static input and whose projector one more trained module."""
    digits_dir = request.getfixturevalue("repa_digits" if flavor == REPA else "digits_dir")
    runs = {}
    for graphed in (False, True):
        (tmp_path / str(graphed)).mkdir()
        trainer = make_trainer(tmp_path / str(graphed), digits_dir, "train.on_nonfinite=skip", "train.steps=6",
                               "logging.log_every=3", "checkpoint.every=1000", f"train.micro_batch_size={micro}",
                               *f"model.flavor={flavor}".split())
        assert trainer.accum_steps == (2 if micro else 1)
        graph = _emulate_graph(trainer) if graphed else trainer._rate_in_tensor()  # as the graph holds it
        poison_batch(trainer, poisoned)
        assert trainer.fit() == 0
        if graph is not None:
            assert (graph.calls, graph.eager_calls) == (6, 2)
            assert isinstance(trainer.engine.optimizer.param_groups[0]["lr"], torch.Tensor)
        runs[graphed] = (_final_state(trainer), trainer.skipped_steps, _rows(tmp_path / str(graphed) / "run"))
    (a, skipped_a, rows_a), (b, skipped_b, rows_b) = runs[True], runs[False]
    assert skipped_a == skipped_b == len(poisoned)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert rows_a == rows_b
    assert ("loss/repa" in rows_a[0]) == (flavor == REPA)


def test_static_step_resumes_bitwise_and_saves_the_rate_as_a_float(tmp_path, digits_dir):
    """A run on static tensors stopped at step 3 and resumed (two eager steps again, then the static
    ones) ends where an uninterrupted one does; its checkpoint holds the learning rate as a float, so
    a run without the graph resumes from it too."""
    (tmp_path / "whole").mkdir()
    whole = make_trainer(tmp_path / "whole", digits_dir, "train.steps=6", "optim.warmup_steps=4")
    _emulate_graph(whole)
    assert whole.fit() == 0
    (tmp_path / "split").mkdir()
    first = make_trainer(tmp_path / "split", digits_dir, "train.steps=3", "optim.warmup_steps=4")
    _emulate_graph(first)
    assert first.fit() == 0
    state = torch.load(tmp_path / "split" / "run" / "checkpoints" / "step_0000003" / "state.pt", weights_only=True)
    assert all(type(g["lr"]) is float for g in state["optimizer"]["param_groups"])
    second = make_trainer(tmp_path / "split", digits_dir, "train.steps=6", "optim.warmup_steps=4")
    assert second.step == 3
    _emulate_graph(second)
    assert second.fit() == 0
    a, b = _final_state(second), _final_state(whole)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_cuda_graph_needs_cuda(tmp_path, digits_dir):
    with pytest.raises(MoeditError, match=r"train.cuda_graph = true needs a CUDA device \(this run trains on cpu\)"):
        make_trainer(tmp_path, digits_dir, "train.cuda_graph=true")


def test_auto_leaves_the_step_eager_where_no_graph_can_run(tmp_path, digits_dir):
    """auto on CPU: no graph and no error, and model_info.json records that the step ran eagerly."""
    trainer = make_trainer(tmp_path, digits_dir, "train.cuda_graph=auto", "train.steps=1")
    assert trainer._step_graph is None and trainer.fit() == 0
    assert json.loads((tmp_path / "run" / "model_info.json").read_text())["cuda_graph"] is False


def _failing_capture(trainer, fallback: bool) -> StepGraph:
    """A StepGraph whose capture fails as CUDA reports an operation it cannot record."""
    graph = _emulate_graph(trainer)
    graph.capture, graph.fallback = True, fallback

    def capture():
        raise RuntimeError("operation not permitted when stream is capturing\nmore lines")

    graph._capture = capture
    return graph


def test_a_failed_capture_falls_back_to_eager_steps_under_auto(tmp_path, digits_dir, capsys):
    """auto: the step whose capture failed and every later one run eagerly, so the run ends where an
    eager run does, and the log says why once."""
    states = {}
    for failing in (False, True):
        (tmp_path / str(failing)).mkdir()
        trainer = make_trainer(tmp_path / str(failing), digits_dir, "train.steps=5", "logging.progress=lines")
        graph = _failing_capture(trainer, fallback=True) if failing else trainer._rate_in_tensor()
        assert trainer.fit() == 0
        states[failing] = _final_state(trainer)
    assert graph.failed == "operation not permitted when stream is capturing" and graph.eager_calls == 5
    out = capsys.readouterr().out
    assert out.count("capturing the step as a CUDA graph failed (operation not permitted") == 1
    assert "step 3: warning:" in out and "training on with eager steps" in out
    a, b = states[True], states[False]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_failed_capture_is_a_named_error_when_asked_for(tmp_path, digits_dir):
    trainer = make_trainer(tmp_path, digits_dir, "train.steps=5")
    _failing_capture(trainer, fallback=False)
    with pytest.raises(MoeditError, match=r"train.cuda_graph = true: capturing the step as a CUDA graph failed: "
                                          r"operation not permitted when stream is capturing; set train.cuda_graph"):
        trainer.fit()
