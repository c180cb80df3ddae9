"""The trainer through the real CLI: resume after SIGKILL, DDP parity, outputs, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, digits_dir: Path, **sections) -> Path:
    cfg = {
        "model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 2,
                  "num_classes": 10, "learn_sigma": False},
        "diffusion": {"objective": "flow", "sample_steps": 4},
        "data": {"path": str(digits_dir), "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3},
        "train": {"steps": 12, "global_batch_size": 16, "ema_decay": 0.9, "num_sample_images": 4},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "lines"},
        "checkpoint": {"every": 4, "keep_last": 3},
    }
    return write_config(tmp_path / "cfg.yaml", cfg, sections)


def moedit(*args, env=None, check=True, **kw):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "moedit.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"moedit {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_sigkill_then_auto_resume_matches_uninterrupted_run(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    full = tmp_path / "full"
    moedit("train", cfg, f"train.run_dir={full}")
    reference = losses(full)
    assert sorted(reference) == list(range(1, 13))

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "moedit.cli", "train", str(cfg), f"train.run_dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000004" / "meta.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "DONE").exists(), "the run finished before it could be killed"
    # A checkpoint torn mid-write (no meta.json) and a leftover temp dir must be ignored.
    torn = run / "checkpoints" / "step_0000011"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)
    (run / "checkpoints" / ".tmp_step_0000012").mkdir()
    out = moedit("train", cfg, f"train.run_dir={run}", "train.resume=auto")
    assert "resumed from" in out.stdout and "step_0000011" not in out.stdout
    assert losses(run) == reference  # exact: same floats, every step once
    assert (run / "DONE").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_accumulation(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, data={"split": "sample"}, train={"steps": 6},
                      checkpoint={"every": 100})
    single = tmp_path / "single"
    moedit("train", cfg, f"train.run_dir={single}", "train.micro_batch_size=8")
    ddp = tmp_path / "ddp"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "moedit.cli", "train", str(cfg), f"train.run_dir={ddp}"],
            env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "engine=ddp world_size=2" in outputs[0]
    one, two = losses(single), losses(ddp)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    # DiffMoE thresholds are averaged over ranks after every step: the trainer logs their largest
    # difference between ranks, which must be exactly zero.
    rows = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["dp/threshold_max_diff"] for r in rows] == [0.0] * 6
    # And both runs trained the same weights.
    from safetensors.torch import load_file

    w1 = load_file(str(single / "checkpoints" / "step_0000006" / "model.safetensors"))
    w2 = load_file(str(ddp / "checkpoints" / "step_0000006" / "model.safetensors"))
    for name, tensor in w1.items():
        if "threshold" in name:
            continue  # with accumulation they take two EMA updates per step, not one averaged (docs/training.md)
        assert (w2[name] - tensor).abs().max() <= 1e-4 * (1 + tensor.abs().max()), name


def test_quickstart_config_through_cli_writes_all_outputs(tmp_path, digits_dir):
    run = tmp_path / "qs"
    first = moedit("train", ROOT / "configs" / "quickstart.yaml", f"train.run_dir={run}", f"data.path={digits_dir}",
                   "train.steps=60", "train.sample_every=0", "train.num_sample_images=10", "logging.log_every=10",
                   "diffusion.sample_steps=5", "model.depth=2", "checkpoint.every=30")
    assert (run / "checkpoints" / "step_0000060" / "ema.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000060"
    assert (run / "samples" / "step_0000060.png").stat().st_size > 100
    assert list((run / "tb").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    routing = [json.loads(line) for line in (run / "routing.jsonl").read_text().splitlines()]
    assert len(routing) == 6 and routing[-1]["stats"]["layers"]
    info = json.loads((run / "model_info.json").read_text())
    assert info["total_params"] == info["instantiated_params"]
    assert "run directory" in first.stdout and "samples" in first.stdout
    # The loss falls by a clear margin within 60 steps (flow MSE starts near 2 = E|x - noise|^2 for unit data).
    assert rows[-1]["loss/mse"] < 0.7 * rows[0]["loss/mse"]

    # EMA weights exported to one safetensors file sample exactly like the run directory itself.
    from moedit.train.checkpoint import export_safetensors

    exported = export_safetensors(run / "checkpoints" / "step_0000060", tmp_path / "export" / "qs.safetensors")
    grids = []
    for source, name in ((run, "a.png"), (exported, "b.png")):
        moedit("sample", source, "--num-samples", "4", "--steps", "3", "--seed", "1", "--device", "cpu",
               "--out", tmp_path / name)
        grids.append((tmp_path / name).read_bytes())
    assert grids[0] == grids[1]


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "config file not found"),
    (["{cfg}", "optim.lrr=1"], "did you mean 'lr'"),
    (["{cfg}", "train.steps=abc"], "train.steps = 'abc': expected an integer"),
    (["{cfg}", "data.path=/nonexistent/shards"], "/nonexistent/shards"),
    (["{cfg}", "train.run_dir=/proc/forbidden"], "not writable"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, digits_dir, args, message):
    cfg = tiny_config(tmp_path, digits_dir)
    args = [a.replace("{cfg}", str(cfg)) for a in args]
    if not any("run_dir" in a for a in args):
        args.append(f"train.run_dir={tmp_path / 'r'}")
    proc = moedit("train", *args, check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_checkpoint_final_false_keeps_only_periodic_checkpoints(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 6, "num_sample_images": 0},
                      checkpoint={"every": 4, "final": False})
    run = tmp_path / "run"
    out = moedit("train", cfg, f"train.run_dir={run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_0000004"]
    assert (run / "DONE").read_text() == "step 6\n" and sorted(losses(run)) == list(range(1, 7))
    assert "(latest: step_0000004)" in out.stdout
    bare = moedit("train", cfg, f"train.run_dir={tmp_path / 'bare'}", "train.steps=2")
    assert "checkpoints     none" in bare.stdout
    assert not list((tmp_path / "bare" / "checkpoints").glob("step_*"))
