"""The trainer's steady-state step on CUDA, local and Megatron engines: no host sync anywhere in it
(forward, backward, the optimizer, the masked EMA and buffer restore of deferred checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("engine", ["local", "megatron"])
def test_deferred_step_has_no_host_sync(tmp_path, digits_dir, engine):
    if engine == "megatron":
        pytest.importorskip("megatron.core")
    from moedit.train.config import load_config
    from moedit.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        "model.depth=2", f"data.path={digits_dir}", "data.num_workers=0", f"train.run_dir={tmp_path / 'run'}",
        "train.steps=10", "train.global_batch_size=16", "train.device=cuda", "train.sample_every=0",
        "train.num_sample_images=0", "logging.tensorboard=false", "logging.progress=none", f"parallel.engine={engine}"])
    trainer = Trainer(cfg).setup()
    assert trainer._deferred
    try:
        for _ in range(3):  # lazy CUDA / cuBLAS / optimizer-state initialisation
            trainer.train_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        trainer._read_flags()
        assert trainer.skipped_steps == 0 and trainer.step == 4
    finally:
        trainer.close()
        trainer.engine.shutdown()  # Megatron: its process group
