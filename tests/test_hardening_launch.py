"""Issue 27, launching: items 10, 11, 16, 17, 18 and 23 (see docs/training.md, "What can go wrong").

Every check here runs without a cluster and without starting a training process: `moedit launch`
must refuse bad input before torchrun or sbatch sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moedit.launch import common, manifest, slurm, sweep_cli
from moedit.launch.render import JobSpec, RunEntry, render_sbatch
from moedit.launch.slurm import SlurmOptions

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _moedit(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedit.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------- item 10


def test_launch_local_bad_key_fails_fast_without_workers(tmp_path):
    started = time.perf_counter()
    proc = _moedit(["launch", "local", QUICKSTART, "--nproc", "2", "train.bogus=1", f"train.run_dir={tmp_path / 'r'}"],
                   tmp_path)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moedit launch: error: ") and "unknown key 'train.bogus'" in lines[0]
    assert "torch.distributed.run" not in proc.stderr and "Traceback" not in proc.stderr  # no worker started
    assert not (tmp_path / "r").exists()
    assert elapsed < 2.0, f"bad key took {elapsed:.2f} s"


def test_validation_does_not_import_torch():
    code = ("import sys; from moedit.launch import common; "
            f"cfg = common.validate_training_config({str(QUICKSTART)!r}, ['train.steps=7']); "
            "print(cfg.train.steps, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["7", "False"]


@pytest.mark.parametrize("target", ["local", "slurm"])
def test_dry_run_validates_the_config(tmp_path, target):
    bad = _moedit(["launch", target, QUICKSTART, "optim.lrr=1", "--dry-run"], tmp_path)
    assert bad.returncode == 2 and "did you mean 'lr'" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stdout == ""
    good = _moedit(["launch", target, QUICKSTART, "optim.lr=1e-4", "--dry-run"], tmp_path)
    assert good.returncode == 0, good.stderr


# ----------------------------------------------------------------------------------- item 17


def test_overrides_anywhere_on_the_line(tmp_path):
    proc = _moedit(["launch", "local", QUICKSTART, "--nproc", "2", "train.steps=30", "--dry-run", "optim.lr=3e-4"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(f"train {QUICKSTART} train.steps=30 optim.lr=3e-4")
    train = _moedit(["train", QUICKSTART, "--print-config", "train.steps=31", "model.depth=2"], tmp_path)
    assert train.returncode == 0, train.stderr
    assert "steps: 31" in train.stdout and "depth: 2" in train.stdout
    unknown = _moedit(["launch", "local", QUICKSTART, "--nprocs", "2", "train.steps=3"], tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == ["moedit launch local: error: unrecognized arguments: --nprocs 2"]


# ----------------------------------------------------------------------------------- item 16


def _fake_checkpoint(run_dir: Path, step: int, world_size: int) -> None:
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "world_size": world_size, "engine": "local",
                                                "engine_files": [], "complete": True}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")


def test_resuming_with_another_process_count_is_refused_before_spawning(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    _fake_checkpoint(run, 1000, world_size=1)
    proc = _moedit(["launch", "local", QUICKSTART, "--nproc", "2", f"train.run_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch.distributed.run" not in proc.stderr
    assert "checkpoint step_0001000 of a 1-process run" in lines[0]
    assert "--nproc 1" in lines[0] and f"train.run_dir={run}-2proc" in lines[0] and "train.resume=never" in lines[0]
    # the advice works: a fresh run directory or no resume passes the check
    for extra in (f"train.run_dir={run}-2proc", f"train.run_dir={run} train.resume=never"):
        ok = _moedit(["launch", "local", QUICKSTART, "--nproc", "2", *extra.split(), "--dry-run"], tmp_path)
        assert ok.returncode == 0, ok.stderr
    slurm_dry = _moedit(["launch", "slurm", QUICKSTART, "--run-dir", run, "--nodes", "1", "--gpus-per-node", "2",
                         "--dry-run"], tmp_path)
    assert slurm_dry.returncode == 2 and "1-process run" in slurm_dry.stderr


def test_readme_launch_line_names_its_own_run_dir():
    text = (REPO / "README.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("moedit launch local configs/quickstart.yaml"))
    assert "train.run_dir=" in line and "train.run_dir=runs/quickstart " not in line + " "


# ----------------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("arg, words", [
    ("--reservation=big; rm -rf ~", "cannot go into an #SBATCH line"),
    ("--comment=two words", "cannot go into an #SBATCH line"),
    ("--mail-user=$(id)", "cannot go into an #SBATCH line"),
    ("--reservation=", "empty"),
    ("reservation=big", "must be one long option"),
    ("--time=99:00:00", "use moedit's --time flag"),
    ("-p gpu", "must be one long option"),
    ("--output=/tmp/x", "moedit sets it itself"),
])
def test_sbatch_args_are_checked_like_sbatch_values(arg, words):
    with pytest.raises(ValueError, match="--sbatch-arg") as info:
        SlurmOptions(sbatch_args=[arg])
    assert words in str(info.value)


def test_good_sbatch_args_pass(tmp_path):
    options = SlurmOptions(sbatch_args=["--reservation=big", "--mail-type=END,FAIL", "--gres=gpu:a100:2",
                                        "--nodelist=node[1-4]", "--hint=nomultithread"])
    script = render_sbatch(JobSpec(config="/c.yaml", runs=[RunEntry(str(tmp_path), [])], options=options,
                                   log_dir=str(tmp_path / "logs"), workdir=str(tmp_path), python=sys.executable))
    assert "#SBATCH --reservation=big" in script and "#SBATCH --nodelist=node[1-4]" in script


def test_bad_sbatch_arg_on_the_command_line_is_one_line(tmp_path):
    proc = _moedit(["launch", "slurm", QUICKSTART, "--sbatch-arg=--comment=a b", "--dry-run"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("moedit launch: error: --sbatch-arg --comment = 'a b'")


# ----------------------------------------------------------------------------------- item 18


def test_default_cpus_per_task_is_chosen_said_and_reaches_srun(tmp_path):
    spec = JobSpec(config="/c.yaml", runs=[RunEntry(str(tmp_path / "run"), [])],
                   options=SlurmOptions(gpus_per_node=8), log_dir=str(tmp_path / "logs"), workdir=str(tmp_path),
                   python=sys.executable, loader_workers=5)
    script = render_sbatch(spec)
    assert "#SBATCH --cpus-per-task=48" in script  # 8 processes x (1 + 5 loader workers)
    assert "# --cpus-per-task=48: moedit's default" in script
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in script  # srun passes it on to the step
    capped = render_sbatch(JobSpec(**{**spec.__dict__, "max_cpus": 32}))
    assert "#SBATCH --cpus-per-task=32" in capped and "capped at the node's 32" in capped
    given = render_sbatch(JobSpec(**{**spec.__dict__, "options": SlurmOptions(gpus_per_node=8, cpus_per_task=96)}))
    assert "#SBATCH --cpus-per-task=96" in given and "moedit's default" not in given
    small = render_sbatch(JobSpec(**{**spec.__dict__, "options": SlurmOptions(), "loader_workers": 0}))
    assert "#SBATCH --cpus-per-task=4" in small  # at least 4 per process


def test_launch_slurm_without_cpus_says_what_it_chose(tmp_path):
    proc = _moedit(["launch", "slurm", QUICKSTART, "--gpus-per-node", "2", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --cpus-per-task=8" in proc.stdout  # quickstart: data.num_workers = 0 -> 4 per process
    assert "no --cpus-per-task given: asking for 8 CPUs per node" in proc.stderr


# ----------------------------------------------------------------------------------- item 23


def _submitted_record(tmp_path: Path, runs: int = 3) -> tuple[str, dict]:
    sweep_dir = str(tmp_path / "sweep")
    record = {"version": 1, "sweep": "s", "config": str(QUICKSTART), "workdir": str(tmp_path), "python": sys.executable,
              "slurm": {}, "max_concurrent": None, "arrays": [{"array_job_id": "55", "indices": list(range(runs)),
                                                               "options": {}, "script": "", "submitted": ""}],
              "runs": [{"index": i, "name": f"r{i}", "overrides": {}, "args": [], "job_id": f"55_{i}",
                        "run_dir": os.path.join(sweep_dir, "runs", f"r{i}"), "submissions": [], "state": "pending"}
                       for i in range(runs)]}
    manifest.save_manifest(sweep_dir, record)
    return sweep_dir, record


def test_scancelled_runs_are_cancelled_not_failed(tmp_path, monkeypatch):
    sweep_dir, record = _submitted_record(tmp_path, runs=4)
    infos = {"55_0": {"JobState": "CANCELLED", "ExitCode": "0:15"}, "55_1": {"JobState": "FAILED", "ExitCode": "1:0"},
             "55_2": {}, "55_3": {}}
    monkeypatch.setattr(slurm, "queue_states", lambda ids: {})
    monkeypatch.setattr(slurm, "finished_job_info", lambda job: infos[job])
    # run 2: SLURM forgot the job; its log says it was cancelled
    logs = Path(sweep_dir) / "logs"
    logs.mkdir()
    # (the lines slurmstepd writes, as seen on the local cluster); run 3 hit its time limit: failed
    (logs / "moedit-s-55_2.err").write_text(
        "step 3\nslurmstepd-localhost: error: *** JOB 57 ON localhost CANCELLED AT 2026-12-07T06:51:54 ***\n"
        "slurmstepd-localhost: error: *** STEP 57.0 ON localhost CANCELLED AT 2026-12-07T06:51:54 ***\n")
    (logs / "moedit-s-55_3.err").write_text(
        "slurmstepd: error: *** JOB 58 ON localhost CANCELLED AT 2026-12-07T06:51:54 DUE TO TIME LIMIT ***\n")
    states = manifest.update_states(sweep_dir, record)
    assert [s["state"] for s in states] == ["cancelled", "failed", "cancelled", "failed"]
    assert states[0]["detail"] == "CANCELLED exit 0:15"
    assert manifest.summary(states) == "4 runs: 2 failed, 2 cancelled"
    assert [r["state"] for r in manifest.load_manifest(sweep_dir)["runs"]] == ["cancelled", "failed", "cancelled",
                                                                                "failed"]
    submitted = []
    monkeypatch.setattr(slurm, "require_slurm", lambda command="sbatch": command)
    monkeypatch.setattr(slurm, "query_partitions", lambda: {"debug": slurm.Partition("debug", 1, 4, 0, True)})
    monkeypatch.setattr(slurm, "submit", lambda path: submitted.append(Path(path).read_text()) or "77")
    import argparse

    args = argparse.Namespace(sweep_dir=sweep_dir, failed=True, cancelled=False, dry_run=False,
                              **{name: None for name in common.SLURM_FLAGS})
    assert sweep_cli.resubmit(args) == 0
    assert "#SBATCH --array=1,3\n" in submitted[-1]  # --failed leaves the cancelled runs alone
