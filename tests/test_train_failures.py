"""Non-finite losses stop (with a debug checkpoint) or skip; the LR schedule; checkpoint retention."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from moedit.train.checkpoint import list_checkpoints
from moedit.train.config import load_config
from moedit.train.trainer import NonFiniteLoss, Trainer


def make_trainer(tmp_path, digits_dir, *overrides) -> Trainer:
    cfg = {
        "model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 2,
                  "num_classes": 10, "learn_sigma": False},
        "data": {"path": str(digits_dir), "num_workers": 0},
        "train": {"run_dir": str(tmp_path / "run"), "steps": 6, "global_batch_size": 8, "num_sample_images": 0},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Trainer(load_config(path, list(overrides))).setup()


def poison(trainer: Trainer, at_steps: set[int]) -> None:
    """Make the 'mse' term NaN at the given steps (0-based: `trainer.step` before the step)."""
    original = trainer.diffusion.loss_from_output

    def loss_from_output(out, *args):
        terms = original(out, *args)
        if trainer.step in at_steps:
            terms["mse"] = terms["mse"] * float("nan")
        return terms

    trainer.diffusion.loss_from_output = loss_from_output


def poison_batch(trainer: Trainer, at_steps: set[int]) -> None:
    """Make the latents of the batch at the given steps (0-based) NaN: the forward itself sees NaN."""
    original = trainer._next_batch

    def next_batch():
        x, *rest = original()  # (x, y) or (x, y, fields)
        return (x * float("nan"), *rest) if trainer.step in at_steps else (x, *rest)

    trainer._next_batch = next_batch


def test_nonfinite_loss_stops_naming_step_and_term_after_debug_checkpoint(tmp_path, digits_dir):
    trainer = make_trainer(tmp_path, digits_dir)
    poison(trainer, {2})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # The third step (0-based 2) is "step 3", as the progress log counts.
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 \(first bad term: 'mse'\)"):
        trainer.fit()
    debug = tmp_path / "run" / "checkpoints" / "debug_step_0000003"
    assert (debug / "meta.json").is_file()
    # The debug checkpoint is never picked up by auto-resume.
    assert [p.name for _, p in list_checkpoints(tmp_path / "run" / "checkpoints")] == []
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def _buffers(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_buffers()}


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_batch_leaves_thresholds_and_statistics_as_before_the_step(policy, tmp_path, digits_dir):
    """A NaN batch updates the DiffMoE thresholds and routing statistics inside the forward; the
    trainer must restore them when the step is skipped, and the debug checkpoint must hold the
    state before the bad step."""
    from safetensors.torch import load_file

    trainer = make_trainer(tmp_path, digits_dir, f"train.on_nonfinite={policy}", "train.steps=4")
    assert trainer.model.threshold_buffers()
    poison_batch(trainer, {2})
    seen = {}
    step_fn = trainer.train_step

    def recording_step():
        seen[trainer.step] = _buffers(trainer)
        return step_fn()

    trainer.train_step = recording_step
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match="step 3"):
            trainer.fit()
        state = load_file(tmp_path / "run" / "checkpoints" / "debug_step_0000003" / "model.safetensors")
        thresholds = {k: v for k, v in state.items() if k.endswith("expert_threshold")}
        assert thresholds and all(torch.equal(v, seen[2][k]) for k, v in thresholds.items())
        return
    assert trainer.fit() == 0 and trainer.skipped_steps == 1
    after_skip = seen[3]
    for name, value in seen[2].items():
        assert torch.equal(after_skip[name], value), name  # statistics included: the log skips the step too
    for name, value in _buffers(trainer).items():
        assert torch.isfinite(value.double()).all(), name
    ema = load_file(tmp_path / "run" / "checkpoints" / "step_0000004" / "ema.safetensors")
    assert all(torch.isfinite(v.double()).all() for v in ema.values())


def test_skip_policy_skips_and_counts_without_touching_weights(tmp_path, digits_dir):
    trainer = make_trainer(tmp_path, digits_dir, "train.on_nonfinite=skip", "train.max_skipped_steps=3")
    poison(trainer, {1, 3})
    snapshots = {}
    step_fn = trainer.train_step

    def recording_step():
        snapshots[trainer.step] = [p.detach().clone() for p in trainer.model.parameters()]
        return step_fn()

    trainer.train_step = recording_step
    assert trainer.fit() == 0
    assert trainer.skipped_steps == 2
    # A skipped step leaves the weights exactly as they were.
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(math.isfinite(p.abs().sum().item()) for p in trainer.model.parameters())


def test_lr_schedule_warmup_then_cosine(tmp_path, digits_dir):
    trainer = make_trainer(tmp_path, digits_dir, "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine",
                           "optim.min_lr_ratio=0.1", "train.steps=12")
    seen = []
    for step in range(12):
        trainer.step = step
        trainer._set_lr()
        seen.append(trainer.lr)
    assert seen[0] == pytest.approx(5e-4) and seen[1] == pytest.approx(1e-3)
    assert seen[2] == pytest.approx(1e-3)  # cosine starts at the peak
    progress = (11 - 2) / 10
    assert seen[11] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))


def test_retention_keeps_last_n_and_every_mth(tmp_path, digits_dir):
    trainer = make_trainer(tmp_path, digits_dir, "train.steps=9", "checkpoint.every=1", "checkpoint.keep_last=2",
                           "checkpoint.keep_every=4")
    assert trainer.fit() == 0
    steps = [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [4, 8, 9]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000009"


class _Exited(Exception):
    pass


@pytest.mark.parametrize("world_size", [1, 2])
def test_failed_rank_exits_without_tearing_down_the_group(world_size, tmp_path, digits_dir, monkeypatch, capsys):
    """A rank that raises in a multi-process run leaves at once (no process-group teardown, which
    waits on peers blocked in a collective); a single process tears down and re-raises as before."""
    import argparse
    import os

    import moedit.train.cli as train_cli
    import moedit.train.trainer as trainer_module

    calls = []

    class Engine:
        rank, is_main, name, device = world_size - 1, world_size == 1, "ddp", "cpu"

        def barrier(self):
            pass

        def shutdown(self):
            calls.append("shutdown")

    Engine.world_size = world_size

    class FailingTrainer:
        def __init__(self, cfg):
            self.engine = Engine()

        def setup(self):
            raise RuntimeError("boom in setup")

        def close(self):
            calls.append("close")

    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(trainer_module, "Trainer", FailingTrainer)
    monkeypatch.setattr(os, "_exit", fake_exit)
    cfg = {"model": {"flavor": "tiny-dense", "learn_sigma": False, "in_channels": 1, "input_size": 8},
           "data": {"path": str(digits_dir)},
           "train": {"run_dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = argparse.Namespace(config=str(tmp_path / "c.yaml"), overrides=[], print_config=False)
    if world_size == 1:
        with pytest.raises(RuntimeError, match="boom in setup"):
            train_cli.main(args)
        assert calls == ["close", "shutdown"]
    else:
        with pytest.raises(_Exited) as exited:
            train_cli.main(args)
        assert exited.value.args == (1,) and calls == ["close"]  # the lock goes, the group is left alone
        err = capsys.readouterr().err
        assert "[rank 1 of 2]" in err and "RuntimeError: boom in setup" in err


def _final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"ema.{k}": v.detach().clone() for k, v in trainer.engine.ema.state_dict().items()})
    for i, group in enumerate(trainer.engine.optimizer.state.values()):
        state.update({f"optim.{i}.{k}": v.detach().clone() for k, v in group.items()})
    return state


@pytest.mark.parametrize("poisoned", [set(), {2}])
def test_deferred_checks_train_bitwise_as_checking_every_step(tmp_path, digits_dir, poisoned):
    """The sync-free step (flags read at log intervals, the discarded step masked on the device) and
    the step that reads its flags at once end in the same weights, EMA, optimizer state, buffers,
    logs and skip count, bit for bit, with and without a NaN batch."""
    runs = {}
    for deferred in (True, False):
        (tmp_path / str(deferred)).mkdir()
        trainer = make_trainer(tmp_path / str(deferred), digits_dir, "train.on_nonfinite=skip", "train.steps=6",
                               "logging.log_every=3", f"train.deferred_checks={str(deferred).lower()}")
        assert trainer._deferred is deferred  # fused AdamW on the CPU can discard a step on the device
        poison_batch(trainer, poisoned)
        assert trainer.fit() == 0
        rows = (tmp_path / str(deferred) / "run" / "metrics.jsonl").read_text().splitlines()
        runs[deferred] = (_final_state(trainer), trainer.skipped_steps,
                          [{k: v for k, v in json.loads(r).items() if "per_s" not in k and "wait" not in k}
                           for r in rows])
    (a, skipped_a, rows_a), (b, skipped_b, rows_b) = runs[True], runs[False]
    assert skipped_a == skipped_b == len(poisoned)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert rows_a == rows_b
