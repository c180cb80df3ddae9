"""End to end: the real `moedit launch` / `moedit sweep` commands running real `moedit train`
runs of a tiny model on synthetic data, locally with torchrun and on a real SLURM cluster
(start one with `bash launch/local_cluster.sh start`). The SLURM tests skip cleanly when
`sinfo` is not on PATH or the cluster is down.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# The smallest config `moedit launch` accepts: it validates the config before starting anything.
VALID_CONFIG = "model:\n  flavor: tiny-diffmoe\n  learn_sigma: false\ntrain:\n  run_dir: run\n"


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (no SLURM)"
    try:
        # `scontrol ping` answers at once; sinfo would retry a dead controller for ~10 s
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        if "UP" not in ping.stdout:
            return "local SLURM cluster down: run `bash launch/local_cluster.sh start`"
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    # the tests expect the cluster of launch/local_cluster.sh: node localhost in partition debug
    if proc.returncode != 0 or not re.search(r"^localhost\|debug\*\|(idle|mixed|alloc)", proc.stdout, re.M):
        return "local SLURM cluster down: run `bash launch/local_cluster.sh start`"
    return None


_PROBLEM = _cluster_problem()
needs_slurm = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The training config and overrides that make a run take a few seconds on CPU."""
    pytest.importorskip("moedit.train.cli")
    if not QUICKSTART.is_file():
        pytest.skip(f"{QUICKSTART} not written yet")
    data = tmp_path_factory.mktemp("data") / "synthetic"
    # 4 shards so that each of 2 data-parallel ranks gets its own
    subprocess.run([sys.executable, "-m", "moedit.cli", "prepare", "--source", "synthetic", "--output", str(data),
                    "--num-samples", "128", "--num-classes", "10", "--latent-shape", "1,8,8",
                    "--shard-size", "32", "--no-progress"], check=True, capture_output=True, timeout=120)
    overrides = ["model.flavor=tiny-diffmoe", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                 f"data.path={data}", "data.num_workers=0",
                 "train.global_batch_size=8", "train.num_sample_images=0", "logging.log_every=1",
                 "logging.heatmaps_every=1000000", "checkpoint.every=1000000"]
    return {"config": str(QUICKSTART), "overrides": overrides, "workdir": tmp_path_factory.mktemp("work")}


@pytest.fixture
def jobs():
    """Job ids submitted by a test; whatever is still queued at the end is cancelled."""
    ids: list[str] = []
    yield ids
    leftover = [i for i in ids if i]
    if leftover:
        subprocess.run(["scancel", *leftover], capture_output=True, timeout=30)


def moedit(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "moedit.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"moedit {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def submitted_id(output: str) -> str:
    match = re.search(r"(?:job|job array) (\d+)", output)
    assert match, output
    return match.group(1)


def wait_gone(job_ids: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if not proc.stdout.strip():
            return
        time.sleep(0.3)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout} s")


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@needs_slurm
def test_two_process_job_rendezvous_and_checkpoint(setup, jobs):
    run = setup["workdir"] / "two_ranks"
    out = moedit(["launch", "slurm", setup["config"], *setup["overrides"], "train.steps=3", "--run-dir", str(run),
                  "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "5", "--signal-seconds", "60"],
                 setup["workdir"])
    jobs.append(job := submitted_id(out))
    wait_gone([job])
    log = (run / "slurm" / f"moedit-two_ranks-{job}.out").read_text()
    assert job_field(job, "JobState") == "COMPLETED", log
    assert "world_size=2" in log and "engine=ddp" in log
    assert (run / "DONE").is_file()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000003" and (run / "checkpoints" / latest / "model.safetensors").is_file()
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["world_size"] for r in rows} == {2}


@needs_slurm
def test_sweep_array_status_and_resubmit_failed(setup, jobs):
    sweep_dir = setup["workdir"] / "sweep"
    sweep_file = setup["workdir"] / "seeds.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "seeds", "config": setup["config"],
        "fixed": {key: yaml.safe_load(value) for key, value in
                  (o.split("=", 1) for o in setup["overrides"] + ["train.steps=2"])},
        "grid": {"train.seed": [0, 1, 2]}, "max_concurrent": 3,
        "slurm": {"cpus_per_task": 1, "time": "5", "signal_seconds": 60},
    }))
    # Force run seed=1 to fail: its checkpoints path is a file, so the trainer cannot use it.
    blocked = sweep_dir / "runs" / "seed=1" / "checkpoints"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way\n")
    jobs.append(array := submitted_id(moedit(["sweep", "submit", str(sweep_file), "--sweep-dir", str(sweep_dir)],
                                             setup["workdir"])))
    assert "#SBATCH --array=0-2%3" in (sweep_dir / "slurm" / "submit-0.sbatch").read_text()
    wait_gone([array])

    states = json.loads(moedit(["sweep", "status", str(sweep_dir), "--json"], setup["workdir"]))
    assert [(s["name"], s["state"]) for s in states] == [("seed=0", "completed"), ("seed=1", "failed"),
                                                         ("seed=2", "completed")]
    assert states[1]["detail"].startswith("FAILED")
    done_lines = {i: len(metrics(sweep_dir / "runs" / f"seed={i}")) for i in (0, 2)}

    blocked.unlink()
    out = moedit(["sweep", "resubmit", str(sweep_dir), "--failed"], setup["workdir"])
    assert out.strip().endswith("seed=1") and "1 failed run(s)" in out
    jobs.append(second := submitted_id(out))
    assert "#SBATCH --array=1%3" in (sweep_dir / "slurm" / "submit-1.sbatch").read_text()
    wait_gone([second])

    text = moedit(["sweep", "status", str(sweep_dir)], setup["workdir"])
    assert text.splitlines()[0] == "sweep seeds: 3 runs: 3 completed"
    record = json.loads((sweep_dir / "manifest.json").read_text())
    assert [r["job_id"] for r in record["runs"]] == [f"{array}_0", f"{second}_1", f"{array}_2"]
    assert [r["state"] for r in record["runs"]] == ["completed"] * 3
    # the completed runs were not run again
    assert {i: len(metrics(sweep_dir / "runs" / f"seed={i}")) for i in (0, 2)} == done_lines == {0: 2, 2: 2}
    seeds = {i: metrics(sweep_dir / "runs" / f"seed={i}")[0]["loss"] for i in range(3)}
    assert len(set(seeds.values())) == 3  # each run got its own seed override


@needs_slurm
def test_usr1_checkpoints_requeues_and_resumes_exactly(setup, jobs):
    steps = 100
    args = [*setup["overrides"], f"train.steps={steps}", "--cpus-per-task", "1", "--time", "5"]
    interrupted, reference = setup["workdir"] / "requeued", setup["workdir"] / "reference"
    jobs.append(job := submitted_id(moedit(["launch", "slurm", setup["config"], *args, "--run-dir",
                                            str(interrupted), "--max-requeues", "2"], setup["workdir"])))
    jobs.append(ref := submitted_id(moedit(["launch", "slurm", setup["config"], *args, "--run-dir",
                                            str(reference)], setup["workdir"])))
    metrics_file = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, "training never logged 3 steps"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    wait_gone([job, ref], timeout=120)

    log = (interrupted / "slurm" / f"moedit-requeued-{job}.out").read_text()
    stopped = re.search(r"stopped by signal(?: \d+)? at step (\d+)", log)
    assert stopped and int(stopped.group(1)) < steps, log
    assert "requeue 1 of 2" in log and "attempt 2" in log and f"at step {stopped.group(1)}" in log
    assert job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "COMPLETED"
    resumed, uninterrupted = metrics(interrupted), metrics(reference)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))  # no gap, no repeat
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-6, abs=1e-7)
    assert (interrupted / "DONE").is_file() and not (interrupted / "PREEMPTED").exists()


@needs_slurm
@pytest.mark.parametrize("flags, message", [
    (["--partition", "nope"], "--partition nope: no such partition on this cluster (known: debug)"),
    (["--gpus-per-node", "1"], "--gpus-per-node 1: nodes of partition debug have at most 0 GPU(s)"),
    (["--nodes", "2"], "--nodes 2: partition debug has only 1 node(s)"),
], ids=["partition", "gpus", "nodes"])
def test_requests_the_cluster_cannot_meet_fail_before_submission(tmp_path, flags, message):
    config = tmp_path / "c.yaml"
    config.write_text(VALID_CONFIG)
    proc = subprocess.run([sys.executable, "-m", "moedit.cli", "launch", "slurm", str(config), *flags],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moedit launch: error: {message}"), proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_local_torchrun_two_processes(setup):
    run = setup["workdir"] / "local"
    proc = subprocess.run([sys.executable, "-m", "moedit.cli", "launch", "local", setup["config"], *setup["overrides"],
                           "train.steps=2", f"train.run_dir={run}", "--nproc", "2"],
                          cwd=setup["workdir"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world_size=2" in proc.stdout and (run / "DONE").is_file()
    assert [(r["step"], r["world_size"]) for r in metrics(run)] == [(1, 2), (2, 2)]
