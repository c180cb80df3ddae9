"""Sweep files, the manifest and run states, without a cluster (SLURM calls are faked)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moedit.errors import MoeditError
from moedit.launch import manifest, slurm, sweep_cli
from moedit.launch.slurm import Partition
from moedit.launch.sweep import expand, format_value, load_sweep

BASE = {"name": "s", "config": "c.yaml"}


def _names(data: dict) -> list[str]:
    return [run.name for run in expand({**BASE, **data})]


def test_grid_is_a_product_in_file_order_and_zip_varies_fastest():
    runs = expand({**BASE, "fixed": {"train": {"steps": 5}, "optim.warmup_steps": 0},
                   "grid": {"optim.lr": [0.1, 0.2], "model.flavor": ["a", "b", "c"]},
                   "zip": {"model.depth": [2, 4], "model.num_heads": [1, 2]}})
    assert len(runs) == 2 * 3 * 2
    points = [(r.overrides["optim.lr"], r.overrides["model.flavor"], r.overrides["model.depth"],
               r.overrides["model.num_heads"]) for r in runs]
    assert points[:4] == [(0.1, "a", 2, 1), (0.1, "a", 4, 2), (0.1, "b", 2, 1), (0.1, "b", 4, 2)]
    assert points[-1] == (0.2, "c", 4, 2)
    assert all(r.overrides["train.steps"] == 5 and r.overrides["optim.warmup_steps"] == 0 for r in runs)
    assert [r.index for r in runs] == list(range(12))
    assert runs[0].args() == ["train.steps=5", "optim.warmup_steps=0", "optim.lr=0.1", "model.flavor=a",
                              "model.depth=2", "model.num_heads=1"]


def test_names_from_template_and_default():
    assert _names({"grid": {"optim.lr": [1e-4, 3e-4]}, "name_template": "{sweep}-{index:02d}-lr{optim.lr:g}"}) == \
        ["s-00-lr0.0001", "s-01-lr0.0003"]
    assert _names({"grid": {"optim.lr": [1e-4], "model.flavor": ["S/2 E16"]}}) == ["lr=0.0001_flavor=S_2_E16"]
    # equal leaf names fall back to the full key
    assert _names({"zip": {"a.depth": [1], "b.depth": [2]}}) == ["a.depth=1_b.depth=2"]


def test_expansion_is_idempotent(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "grid": {"optim.lr": [1e-4, 3e-4], "train.seed": [0, 1]},
                                    "zip": {"model.depth": [2, 4]}}))
    first, second = load_sweep(str(path)), load_sweep(str(path))
    assert [(r.name, r.args()) for r in first.runs] == [(r.name, r.args()) for r in second.runs]
    assert len({r.name for r in first.runs}) == 8
    one, two = manifest.new_manifest(first), manifest.new_manifest(second)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


@pytest.mark.parametrize("data, message", [
    ({}, "empty sweep: no grid or zip"),
    ({"grid": {"optim.lr": []}}, "empty sweep: optim.lr has an empty list"),
    ({"zip": {"a.b": [1, 2], "a.c": [1]}}, "zip lists differ in length: a.b has 2, a.c has 1"),
    ({"grid": {"a.b": [1]}, "fixed": {"a.b": 2}}, "key a.b appears in more than one"),
    ({"grid": {"a.b": 1}}, "a.b = 1: expected a list"),
    ({"grid": {"a b": [1]}}, "not a dotted config key"),
    ({"grid": {"a.b": [1, 2]}, "name_template": "fixed"}, "gives runs 0 and 1 the same name 'fixed'"),
    ({"grid": {"a.b": [1]}, "name_template": "{a.c}"}, "placeholder {a.c} is not a key"),
])
def test_bad_sweeps_are_rejected(data, message):
    with pytest.raises(MoeditError, match=message):
        expand({**BASE, **data}, source="sweep.yaml")


def test_unknown_top_level_key_names_the_closest(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "grids": {"a.b": [1]}}))
    with pytest.raises(MoeditError, match="unknown key 'grids' \\(did you mean 'grid'\\?\\)"):
        load_sweep(str(path))


@pytest.mark.parametrize("value", [3e-5, 1e-4, 0.5, 7, True, None, "1", "S-E16", 'x"; touch /tmp/p; "', [1, 2], "yes"])
def test_override_values_round_trip_through_yaml(value):
    text = format_value(value)
    assert "\n" not in text
    assert yaml.safe_load(text) == value


def test_array_spec_compresses_ranges():
    assert manifest.array_spec([5, 0, 1, 2, 7, 8], 2) == "0-2,5,7-8%2"
    assert manifest.array_spec([3], None) == "3"


def _sweep_dir(tmp_path: Path, runs: int = 3) -> tuple[str, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "grid": {"train.seed": list(range(runs))}, "max_concurrent": 2}))
    sweep = load_sweep(str(path), str(tmp_path / "sweep"))
    return sweep.sweep_dir, manifest.new_manifest(sweep)


def test_state_comes_from_queue_then_markers(tmp_path, monkeypatch):
    sweep_dir, record = _sweep_dir(tmp_path, runs=5)
    for i, run in enumerate(record["runs"][:4]):
        run["job_id"] = f"77_{i}"
        Path(run["run_dir"]).mkdir(parents=True)
    Path(record["runs"][2]["run_dir"], "DONE").write_text("step 5\n")
    Path(record["runs"][3]["run_dir"], "PREEMPTED").write_text("signal 10\n")
    monkeypatch.setattr(slurm, "queue_states", lambda ids: {"77_0": "RUNNING", "77_1": "PENDING"})
    monkeypatch.setattr(slurm, "finished_job_info", lambda job: {"JobState": "FAILED", "ExitCode": "1:0"})
    states = manifest.run_states(record)
    assert [s["state"] for s in states] == ["running", "pending", "completed", "failed", "unsubmitted"]
    assert states[3]["detail"] == "FAILED exit 1:0, checkpointed on a signal but not requeued"
    assert manifest.summary(states) == "5 runs: 1 completed, 1 running, 1 pending, 1 failed, 1 unsubmitted"


def test_array_script_selects_the_run_of_the_task(tmp_path):
    sweep_dir, record = _sweep_dir(tmp_path)
    script = manifest.render_array(sweep_dir, record, [0, 1, 2], slurm.SlurmOptions(job_name="moedit-s"))
    assert "#SBATCH --array=0-2%2" in script
    assert f"#SBATCH --output={sweep_dir}/logs/%x-%A_%a.out" in script
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    (stubs / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_OUT": str(tmp_path / "args"), "SLURM_JOB_ID": "90",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_ARRAY_TASK_ID": "1"}
    subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[-3:] == ["train.seed=1", "train.resume=auto", f"train.run_dir={sweep_dir}/runs/seed=1"]
    bad = subprocess.run(["bash", "-c", script], env={**env, "SLURM_ARRAY_TASK_ID": "9"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no run for array index 9" in bad.stderr


def test_resubmit_failed_submits_only_failed_runs(tmp_path, monkeypatch, capsys):
    sweep_dir, record = _sweep_dir(tmp_path)
    submitted: list[str] = []
    monkeypatch.setattr(slurm, "require_slurm", lambda command="sbatch": command)
    monkeypatch.setattr(slurm, "query_partitions", lambda: {"debug": Partition("debug", 1, 4, 0, True)})

    def fake_submit(path: str) -> str:
        submitted.append(Path(path).read_text())
        return str(100 + len(submitted))

    monkeypatch.setattr(slurm, "submit", fake_submit)
    manifest.submit_array(sweep_dir, record, [0, 1, 2], slurm.SlurmOptions())
    assert [r["job_id"] for r in record["runs"]] == ["101_0", "101_1", "101_2"]
    for run in record["runs"]:
        Path(run["run_dir"]).mkdir(parents=True)
    for i in (0, 2):
        Path(record["runs"][i]["run_dir"], "DONE").touch()
    monkeypatch.setattr(slurm, "queue_states", lambda ids: {})
    monkeypatch.setattr(slurm, "finished_job_info", lambda job: {})
    args = argparse.Namespace(sweep_dir=sweep_dir, failed=True, dry_run=False,
                              **{name: None for name in sweep_cli.common.SLURM_FLAGS})
    assert sweep_cli.resubmit(args) == 0
    assert "#SBATCH --array=1%2" in submitted[-1]
    saved = manifest.load_manifest(sweep_dir)
    assert [r["job_id"] for r in saved["runs"]] == ["101_0", "102_1", "101_2"]
    assert [len(r["submissions"]) for r in saved["runs"]] == [1, 2, 1]
    Path(saved["runs"][1]["run_dir"], "DONE").touch()
    assert sweep_cli.resubmit(args) == 0
    assert len(submitted) == 2 and "no failed runs (3 runs: 3 completed)" in capsys.readouterr().out


def test_a_sweep_dir_holding_another_sweep_is_refused(tmp_path):
    sweep_dir, record = _sweep_dir(tmp_path)
    manifest.save_manifest(sweep_dir, record)
    assert manifest.merge_existing(sweep_dir, json.loads(json.dumps(record))) == record
    _, other = _sweep_dir(tmp_path / "other", runs=4)
    with pytest.raises(MoeditError, match="already holds a different sweep \\(differs at run 3\\)"):
        manifest.merge_existing(sweep_dir, other)


def test_cli_empty_sweep_is_a_one_line_error(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump({**BASE, "grid": {"optim.lr": []}}))
    result = subprocess.run([sys.executable, "-m", "moedit.cli", "sweep", "submit", str(path), "--dry-run"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env={**os.environ, "PATH": "/nonexistent"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"moedit sweep: error: {path}: empty sweep: optim.lr has an empty list of values"]
