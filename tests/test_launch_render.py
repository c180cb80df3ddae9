"""sbatch rendering and `moedit launch` input checks, without a cluster.

The rendered script is executed by bash with stub `srun`/`scontrol` commands, so
quoting, rendezvous variables and the requeue decision are checked by running
them, not by reading the text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moedit.errors import MoeditError
from moedit.launch import common, local
from moedit.launch.render import JobSpec, RunEntry, render_sbatch
from moedit.launch.slurm import (
    SlurmOptions,
    check_against_cluster,
    gpus_in_gres,
    parse_sinfo_nodes,
    parse_time_limit,
)

INJECTION = 'x"; touch {pwned}; "'
# The smallest config `moedit launch` accepts: it validates the config before starting anything.
VALID_CONFIG = "model:\n  flavor: tiny-diffmoe\n  learn_sigma: false\ntrain:\n  run_dir: run\n"

SRUN_STUB = r"""#!/bin/bash
# Records its arguments (NUL-separated) and the rendezvous environment, then plays the trainer.
printf '%s\0' "$@" > "$STUB_DIR/srun.args"
echo "$MASTER_ADDR $MASTER_PORT $OMP_NUM_THREADS $NCCL_DEBUG" > "$STUB_DIR/srun.env"
run_dir=${@: -1}; run_dir=${run_dir#train.run_dir=}
case "$STUB_ACTION" in
  done) touch "$run_dir/DONE"; exit 0 ;;
  preempt) touch "$run_dir/PREEMPTED"; exit 1 ;;
  *) exit 7 ;;
esac
"""
SCONTROL_STUB = r"""#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node7\nnode8\n'; exit 0; fi
printf '%s\n' "$*" >> "$STUB_DIR/scontrol.calls"
"""


def _spec(tmp_path: Path, args: list[str], **options) -> JobSpec:
    return JobSpec(config=str(tmp_path / "cfg.yaml"), runs=[RunEntry(str(tmp_path / "run"), args)],
                   options=SlurmOptions(**options), log_dir=str(tmp_path / "logs"), workdir=str(tmp_path),
                   python=sys.executable)


def _run_script(tmp_path: Path, script: str, action: str, restart_count: int = 0, job_id: int = 4242,
                extra_env: dict | None = None) -> subprocess.CompletedProcess:
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir(exist_ok=True)
    for name, body in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stub_dir / name).write_text(body)
        (stub_dir / name).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {"PATH": f"{stub_dir}:/usr/bin:/bin", "STUB_DIR": str(stub_dir), "STUB_ACTION": action,
           "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_RESTART_COUNT": str(restart_count), **(extra_env or {})}
    return subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)


def _srun_args(tmp_path: Path) -> list[str]:
    return (tmp_path / "stubs" / "srun.args").read_text().split("\0")[:-1]


def test_injected_config_value_reaches_trainer_as_one_inert_argument(tmp_path):
    pwned = tmp_path / "pwned"
    value = INJECTION.format(pwned=pwned)
    overrides = [f"model.name={value}", "optim.lr=$(touch " + str(pwned) + ")", "data.path=`id`"]
    script = render_sbatch(_spec(tmp_path, overrides, nodes=2, gpus_per_node=4, cpus_per_task=8))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    result = _run_script(tmp_path, script, "done")
    assert result.returncode == 0, result.stderr
    assert not pwned.exists()
    args = _srun_args(tmp_path)
    train = args.index("train")
    # moedit.cli train CONFIG <overrides exactly as given> train.run_dir=RUN
    assert args[train + 1] == str(tmp_path / "cfg.yaml")
    assert args[train + 2: train + 5] == overrides
    assert args[-1] == f"train.run_dir={tmp_path / 'run'}"


def test_rendezvous_from_first_host_and_port_from_job_id(tmp_path):
    script = render_sbatch(_spec(tmp_path, [], nodes=2, gpus_per_node=4, cpus_per_task=8))
    _run_script(tmp_path, script, "done", job_id=123457)
    args = _srun_args(tmp_path)
    port = 10000 + 123457 % 20000
    assert f"--rdzv-endpoint=node7:{port}" in args
    assert "--rdzv-backend=c10d" in args and "--rdzv-id=123457" in args
    assert "--nproc-per-node=4" in args and "--nnodes=2" in args
    assert args[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=8"]
    # 8 CPUs of the task shared by 4 processes; NCCL settings exported
    assert (tmp_path / "stubs" / "srun.env").read_text().split() == ["node7", str(port), "2", "WARN"]


def test_preempted_run_requeues_until_the_limit(tmp_path):
    script = render_sbatch(_spec(tmp_path, [], max_requeues=2))
    calls = tmp_path / "stubs" / "scontrol.calls"
    result = _run_script(tmp_path, script, "preempt", restart_count=1)
    assert result.returncode == 0
    assert calls.read_text().splitlines() == ["requeue 4242"]
    calls.unlink()
    result = _run_script(tmp_path, script, "preempt", restart_count=2)
    assert result.returncode == 3 and not calls.exists()
    assert "requeues are used up" in result.stderr


def test_failed_training_fails_the_job_without_requeue(tmp_path):
    script = render_sbatch(_spec(tmp_path, []))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "PREEMPTED").write_text("stale marker of an earlier attempt\n")
    result = _run_script(tmp_path, script, "fail")
    assert result.returncode == 7
    assert not (tmp_path / "stubs" / "scontrol.calls").exists()
    assert not (tmp_path / "run" / "PREEMPTED").exists()


def test_directives_carry_every_option(tmp_path):
    script = render_sbatch(_spec(
        tmp_path, [], nodes=3, gpus_per_node=8, cpus_per_task=64, partition="gpu", account="proj1",
        time="1-12:00:00", qos="high", constraint="h100&ib", mem="512G", exclusive=True,
        sbatch_args=["--reservation=big", "--mail-type=END"], signal_seconds=300, job_name="dit"))
    directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    expected = ["--job-name=dit", "--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                "--partition=gpu", "--account=proj1", "--time=1-12:00:00", "--qos=high", "--constraint=h100&ib",
                "--mem=512G", "--exclusive", "--signal=USR1@300", "--reservation=big", "--mail-type=END",
                "--requeue", "--open-mode=append"]
    assert sorted(set(expected) - set(directives)) == []
    assert f"--output={tmp_path / 'logs'}/%x-%j.out" in directives
    assert sum(d.startswith("--signal") for d in directives) == 1


@pytest.mark.parametrize("options, message", [
    (dict(partition="gpu\n#SBATCH --uid=0"), "slurm.partition"),
    (dict(account="a b"), "slurm.account"),
    (dict(qos="x;reboot"), "slurm.qos"),
    (dict(sbatch_args=["--comment=a\nrm -rf /"]), "--sbatch-arg"),
    (dict(sbatch_args=["reservation=x"]), "--sbatch-arg"),
    (dict(env={"BAD-NAME": "1"}), "--env"),
    (dict(time="01:00:00", signal_seconds=3600), "signal_seconds"),
    (dict(gpus_per_node=2, nproc_per_node=4), "nproc_per_node"),
    (dict(nodes=0), "slurm.nodes"),
])
def test_unsafe_or_inconsistent_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**options)


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("30:15", 1815), ("02:00:00", 7200), ("1-00", 86400), ("1-02:30", 95400), ("2-00:00:01", 172801),
])
def test_time_limit_forms(text, seconds):
    assert parse_time_limit(text) == seconds


def test_numeric_time_from_yaml_is_minutes():
    assert SlurmOptions(time=3, signal_seconds=179).time == "3"
    with pytest.raises(ValueError, match="not shorter than the time limit 3 \\(180 s\\)"):
        SlurmOptions(time=3, signal_seconds=180)


def test_gres_and_sinfo_parsing():
    assert gpus_in_gres("(null)") == 0
    assert gpus_in_gres("gpu:8") == 8
    assert gpus_in_gres("gpu:h100:4(S:0-1),nic:2") == 4
    assert gpus_in_gres("gpu:a100:2,gpu:v100:1") == 3
    parts = parse_sinfo_nodes("cpu*|n1|64|(null)\ncpu*|n2|32|(null)\ngpu|g1|96|gpu:h100:8(S:0-1)\n")
    cpu = parts["cpu"]
    assert (cpu.nodes, cpu.max_cpus, cpu.max_gpus, cpu.is_default) == (2, 64, 0, True)
    assert (parts["gpu"].nodes, parts["gpu"].max_gpus, parts["gpu"].is_default) == (1, 8, False)


@pytest.mark.parametrize("options, message", [
    (dict(partition="nope"), "--partition nope: no such partition on this cluster \\(known: cpu, gpu\\)"),
    (dict(gpus_per_node=1), "--gpus-per-node 1: nodes of partition cpu have at most 0 GPU"),
    (dict(partition="gpu", gpus_per_node=9), "--gpus-per-node 9: nodes of partition gpu have at most 8"),
    (dict(partition="gpu", nodes=2, gpus_per_node=8), "--nodes 2: partition gpu has only 1 node"),
    (dict(cpus_per_task=65), "--cpus-per-task 65"),
])
def test_cluster_checks(options, message):
    parts = parse_sinfo_nodes("cpu*|n1|64|(null)\ncpu*|n2|32|(null)\ngpu|g1|96|gpu:h100:8(S:0-1)\n")
    with pytest.raises(MoeditError, match=message):
        check_against_cluster(SlurmOptions(**options), parts)
    check_against_cluster(SlurmOptions(partition="gpu", gpus_per_node=8), parts)  # fits: no error


def test_training_args_force_auto_resume_and_drop_run_dir():
    assert common.training_args(["a.b=1", "train.run_dir=/x"]) == ["a.b=1", "train.resume=auto"]
    assert common.training_args(["train.resume=never"]) == ["train.resume=never"]
    with pytest.raises(MoeditError, match="override 'steps'"):
        common.training_args(["steps"])


def test_run_dir_resolution_order(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  run_dir: from_config\n")
    assert common.resolve_run_dir(str(config), [], "explicit") == os.path.abspath("explicit")
    assert common.resolve_run_dir(str(config), ["train.run_dir=over"], None) == os.path.abspath("over")
    assert common.resolve_run_dir(str(config), [], None) == os.path.abspath("from_config")
    config.write_text("model: {flavor: tiny-dense}\n")
    with pytest.raises(MoeditError, match="no train.run_dir"):
        common.resolve_run_dir(str(config), [], None)


def test_local_command_and_environment():
    command = local.torchrun_command("/py", 3, "/c.yaml", ["a=1"])
    assert command == ["/py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=3",
                       "-m", "moedit.cli", "train", "/c.yaml", "a=1"]
    env = local.local_env(3, {"NCCL_DEBUG": "INFO"}, base={"OMP_NUM_THREADS": "99", "HOME": "/h"}, cpu_count=8)
    assert (env["OMP_NUM_THREADS"], env["NCCL_DEBUG"], env["HOME"], env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]) == \
        ("2", "INFO", "/h", "1")


def _cli(args: list[str], path: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, "-m", "moedit.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_without_slurm_gives_one_line_error_and_dry_run_still_renders(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(VALID_CONFIG)
    empty = tmp_path / "empty_path"
    empty.mkdir()
    result = _cli(["launch", "slurm", str(config), "train.steps=3"], str(empty), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "moedit launch: error: SLURM command 'sbatch' not found on PATH: run on a SLURM login node, "
        "or use `moedit launch local` / --dry-run"]
    dry = _cli(["launch", "slurm", str(config), "train.steps=3", "--dry-run", "--time", "10"], str(empty), tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --time=10" in dry.stdout
    assert subprocess.run(["bash", "-n"], input=dry.stdout, text=True).returncode == 0
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
