"""The sweep directory: manifest, array submission and run states.

    SWEEP_DIR/
      manifest.json                  runs (name, overrides, run_dir, job_id, submissions, state)
      slurm/submit-N.sbatch          the script of the N-th submission (a job array)
      logs/<job>-<array>_<task>.out  SLURM stdout/stderr of each array task
      runs/<name>/                   each run's directory (written by moedit train)

A run's state comes from the queue first (pending/running), then from its run
directory (DONE -> completed); a submitted run that has left the queue without
DONE is cancelled when SLURM (or the job's log) says it was cancelled (scancel), else failed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from moedit.errors import MoeditError
from moedit.launch import slurm
from moedit.launch.common import training_args
from moedit.launch.render import JobSpec, RunEntry, render_sbatch
from moedit.launch.slurm import SlurmOptions
from moedit.launch.sweep import Sweep

MANIFEST = "manifest.json"
STATES = ("completed", "running", "pending", "failed", "cancelled", "unsubmitted")
# squeue states of a job that holds (or is about to hold) resources
_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}


def new_manifest(sweep: Sweep) -> dict:
    return {
        "version": 1,
        "sweep": sweep.name,
        "config": sweep.config,
        "workdir": os.getcwd(),
        "python": sys.executable,
        "slurm": sweep.slurm,
        "max_concurrent": sweep.max_concurrent,
        "runs": [
            {"index": run.index, "name": run.name, "overrides": run.overrides, "args": run.args(),
             "run_dir": os.path.join(sweep.sweep_dir, "runs", run.name), "job_id": None,
             "submissions": [], "state": "unsubmitted"}
            for run in sweep.runs
        ],
        "arrays": [],
    }


def load_manifest(sweep_dir: str) -> dict:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise MoeditError(f"{sweep_dir}: no {MANIFEST}; is this a sweep directory made by `moedit sweep submit`?")
    with open(path) as f:
        return json.load(f)


def save_manifest(sweep_dir: str, manifest: dict) -> None:
    path = Path(sweep_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)  # readers never see half a manifest


def merge_existing(sweep_dir: str, manifest: dict) -> dict:
    """Reuse the manifest already in the sweep dir if it describes the same runs."""
    if not (Path(sweep_dir) / MANIFEST).is_file():
        return manifest
    old = load_manifest(sweep_dir)
    old_runs = [(r["name"], r["args"]) for r in old["runs"]]
    new_runs = [(r["name"], r["args"]) for r in manifest["runs"]]
    if old_runs != new_runs:
        same_prefix = min(len(old_runs), len(new_runs))
        first = next((i for i, (a, b) in enumerate(zip(old_runs, new_runs)) if a != b), same_prefix)
        raise MoeditError(f"{sweep_dir} already holds a different sweep (differs at run {first}); "
                          "use another --sweep-dir")
    return old


def array_spec(indices: list[int], max_concurrent: int | None) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (plus '%N' to run at most N at once)."""
    parts, start = [], None
    ordered = sorted(set(indices))
    for i, index in enumerate(ordered):
        if start is None:
            start = index
        if i + 1 == len(ordered) or ordered[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts) + (f"%{max_concurrent}" if max_concurrent else "")


def render_array(sweep_dir: str, manifest: dict, indices: list[int], options: SlurmOptions,
                 max_cpus: int | None = None) -> str:
    runs = [RunEntry(r["run_dir"], training_args(r["args"])) for r in manifest["runs"]]
    spec = JobSpec(config=manifest["config"], runs=runs, options=options,
                   log_dir=os.path.join(sweep_dir, "logs"), workdir=manifest["workdir"],
                   python=manifest["python"], array=array_spec(indices, manifest.get("max_concurrent")),
                   max_cpus=max_cpus)
    return render_sbatch(spec)


def submit_array(sweep_dir: str, manifest: dict, indices: list[int], options: SlurmOptions) -> str:
    """Submit the given runs as one job array; records job ids in the manifest and saves it."""
    slurm.require_slurm("sbatch")
    partitions = slurm.query_partitions()
    slurm.check_against_cluster(options, partitions)
    part = slurm.partition_of(options, partitions)
    script = render_array(sweep_dir, manifest, indices, options,
                          max_cpus=part.max_cpus if part is not None and part.max_cpus > 0 else None)
    os.makedirs(os.path.join(sweep_dir, "logs"), exist_ok=True)
    script_path = Path(sweep_dir) / "slurm" / f"submit-{len(manifest['arrays'])}.sbatch"
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    array_id = slurm.submit(str(script_path))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["arrays"].append({"array_job_id": array_id, "indices": sorted(indices), "script": str(script_path),
                               "options": asdict(options), "submitted": stamp})
    for index in indices:
        run = manifest["runs"][index]
        run["job_id"] = f"{array_id}_{index}"
        run["submissions"].append({"job_id": run["job_id"], "submitted": stamp})
        run["state"] = "pending"
    save_manifest(sweep_dir, manifest)
    return array_id


def run_states(manifest: dict, log_dir: str | None = None) -> list[dict]:
    """[{name, state, job_id, detail}] for every run, in manifest order. `log_dir` (the sweep's
    logs/) tells a cancelled job from a failed one once SLURM has forgotten it."""
    job_ids = [r["job_id"] for r in manifest["runs"] if r["job_id"]]
    queued = slurm.queue_states(job_ids) if job_ids else {}
    out = []
    for run in manifest["runs"]:
        run_dir = Path(run["run_dir"])
        job_id = run["job_id"]
        state, detail = _state_of(run_dir, job_id, queued, log_dir)
        out.append({"index": run["index"], "name": run["name"], "state": state, "job_id": job_id, "detail": detail})
    return out


def _cancelled_in_log(log_dir: str | None, job_id: str) -> bool:
    """slurmstepd writes `*** JOB 12 ON node CANCELLED AT <time> ***` into a scancelled job's stderr."""
    if not log_dir:
        return False
    for path in Path(log_dir).glob(f"*-{job_id}.err"):
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 65536))
                tail = f.read().decode(errors="replace")
        except OSError:
            continue
        # `... CANCELLED AT <time> DUE TO TIME LIMIT ***` (or PREEMPTION, NODE FAILURE) was not scancel
        if re.search(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT \S+ \*\*\*", tail):
            return True
    return False


def _state_of(run_dir: Path, job_id: str | None, queued: dict[str, str],
              log_dir: str | None = None) -> tuple[str, str]:
    if (run_dir / "DONE").exists():
        return "completed", ""
    if job_id is None:
        return "unsubmitted", ""
    if job_id in queued:
        slurm_state = queued[job_id]
        return ("running" if slurm_state in _RUNNING else "pending"), slurm_state
    info = slurm.finished_job_info(job_id)
    detail = f"{info.get('JobState', 'gone from SLURM')} exit {info.get('ExitCode', '?')}" if info else "left the queue"
    if (run_dir / "PREEMPTED").exists():
        detail += ", checkpointed on a signal but not requeued"
    if info.get("JobState", "").startswith("CANCELLED") or (not info and _cancelled_in_log(log_dir, job_id)):
        return "cancelled", detail if info else "cancelled (job log), gone from SLURM"
    return "failed", detail


def update_states(sweep_dir: str, manifest: dict) -> list[dict]:
    states = run_states(manifest, os.path.join(sweep_dir, "logs"))
    for run, status in zip(manifest["runs"], states):
        run["state"] = status["state"]
    save_manifest(sweep_dir, manifest)
    return states


def summary(states: list[dict]) -> str:
    counts = {state: sum(s["state"] == state for s in states) for state in STATES}
    parts = [f"{n} {state}" for state, n in counts.items() if n]
    return f"{len(states)} runs: " + ", ".join(parts)
