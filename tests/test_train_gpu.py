"""The trainer's steady-state step on CUDA, local and Megatron engines: no host sync anywhere in it
(forward, backward, the optimizer, the masked EMA and buffer restore of deferred checks), and the
whole step as a CUDA graph (train.cuda_graph) trains like the eager step."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _trainer(run_dir, digits_dir, engine, *overrides):
    """The quickstart's tiny DiffMoE at depth 2 on the digits, on CUDA, with `engine`."""
    if engine == "megatron":
        pytest.importorskip("megatron.core")
    from moedit.train.config import load_config
    from moedit.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        "model.depth=2", f"data.path={digits_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
        "train.steps=10", "train.global_batch_size=16", "train.device=cuda", "train.sample_every=0",
        "train.num_sample_images=0", "logging.tensorboard=false", "logging.progress=none",
        f"parallel.engine={engine}", *overrides])
    return Trainer(cfg).setup()


@contextlib.contextmanager
def _no_host_sync():
    """Any host sync inside is an error (after the device has drained what came before)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("engine", ["local", "megatron"])
def test_deferred_step_has_no_host_sync(tmp_path, digits_dir, engine):
    trainer = _trainer(tmp_path / "run", digits_dir, engine)
    assert trainer._deferred
    try:
        for _ in range(3):  # lazy CUDA / cuBLAS / optimizer-state initialisation
            trainer.train_step()
        with _no_host_sync():
            trainer.train_step()
        trainer._read_flags()
        assert trainer.skipped_steps == 0 and trainer.step == 4
    finally:
        trainer.close()
        trainer.engine.shutdown()  # Megatron: its process group


from test_train_step_graph import REPA  # noqa: E402 - the same REPA flavor as the CPU emulation test


@pytest.mark.parametrize("engine,flavor", [("local", "tiny-diffmoe"), ("local", "tiny-tc"), ("local", "tiny-ec"),
                                          ("local", REPA), ("megatron", "tiny-diffmoe")])
def test_cuda_graph_step_trains_like_eager_and_replays_without_sync(tmp_path, request, engine, flavor):
    """train.cuda_graph: two eager steps, one captured, three replayed with no host sync (one of them a
    NaN batch, discarded on the device). Against the eager run of the same config: the same skip
    count, summed losses to 1e-3, and the weights, EMA and moments within 1% of the distance the six
    steps moved them (a replay that reused stale inputs or the learning rate of the capture, during
    the warm-up, lands ~30% away). With every router, and with REPA (its features from the shards)."""
    from test_train_failures import poison_batch  # tests/test_train_failures.py

    digits_dir = request.getfixturevalue("repa_digits" if flavor == REPA else "digits_dir")
    runs = {}
    for graphed in (False, True):
        trainer = _trainer(tmp_path / str(graphed), digits_dir, engine, "train.on_nonfinite=skip",
                           f"train.cuda_graph={str(graphed).lower()}", *f"model.flavor={flavor}".split())
        try:
            start = _state(trainer)
            poison_batch(trainer, {4})
            for step in range(6):  # with the graph, steps 4-6 (3-5 here) are replays
                with _no_host_sync() if graphed and step >= 3 else contextlib.nullcontext():
                    trainer.train_step()
            trainer._read_flags()
            if graphed:
                assert trainer._step_graph.graph is not None and trainer._step_graph.eager_calls == 2
            runs[graphed] = (start, _state(trainer), trainer._interval_sum.cpu(), trainer.skipped_steps)
        finally:
            trainer.close()
            trainer.engine.shutdown()
    (start, eager, eager_sums, eager_skipped), (_, graph, graph_sums, graph_skipped) = runs[False], runs[True]
    assert eager_skipped == graph_skipped == 1
    torch.testing.assert_close(graph_sums, eager_sums, rtol=1e-3, atol=1e-6)
    for key in eager:  # the optimizer's moments start at zero (absent before the first step)
        moved = (eager[key].float() - start.get(key, torch.zeros_like(eager[key])).float()).norm()
        if moved > 0:
            assert (graph[key].float() - eager[key].float()).norm() <= 0.01 * moved, key


def _state(trainer) -> dict[str, torch.Tensor]:
    """Weights and buffers, the EMA and the optimizer's moments (Megatron's state dict has None entries)."""
    engine = trainer.engine
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    state.update({f"ema.{i}": e.detach().clone() for i, (e, _) in enumerate(engine._ema_pairs)})
    for i, moments in enumerate(engine.optimizer.state.values()):
        state.update({f"optim.{i}.{k}": v.clone() for k, v in moments.items()})
    return state
