"""Megatron's distributed optimizer over bf16 parameters in `moedit train` on one GPU (issue 6):
a run resumed from its step-2 checkpoint ends bit-identical to the uninterrupted run, and the
checkpoint records the optimizer and holds float32 canonical weights.

Run on the device machine: pytest -m gpu tests/megatron/test_megatron_gpu_optimizer.py
(2 GPUs, expert parallel, resharding: scripts/megatron_gpu_check.sh with PHASE=train)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, data_dir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "moedit.cli", "train", str(REPO / "configs" / "megatron_diffmoe_s_e16_synthetic.yaml"),
           f"train.run_dir={run_dir}", f"data.path={data_dir}", f"train.steps={steps}", "parallel.expert=1",
           "parallel.megatron_optimizer=distributed", "checkpoint.every=2", "checkpoint.keep_last=5",
           "logging.log_every=1", "logging.progress=none", "optim.warmup_steps=2", "data.num_workers=0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=300)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    data = tmp_path / "synthetic-4x16x16"
    full = tmp_path / "full"
    _train(full, data, 4)
    state = torch.load(full / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert (state["megatron_optimizer"], state["param_dtype"], state["optimizer_state"]) == \
        ("distributed", "bfloat16", True)
    assert not list((full / "checkpoints" / "step_0000002").glob("optim_*.pt"))  # the state is in megatron/

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    _train(resumed, data, 4)
    assert _losses(resumed) == {s: v for s, v in _losses(full).items() if s > 2}
    for name in ("model", "ema"):
        a = load_file(str(full / "checkpoints" / "step_0000004" / f"{name}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step_0000004" / f"{name}.safetensors"))
        assert {v.dtype for v in a.values()} == {torch.float32}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
