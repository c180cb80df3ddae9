"""Render the sbatch script for one training run or for a job array of runs.

Every value that reaches the shell is passed through `shlex.quote`; values that
go into `#SBATCH` lines are validated by `SlurmOptions` (no whitespace or shell
characters), so a config value can never become a command.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from moedit.launch.slurm import SlurmOptions, check_directive_value, default_cpus_per_task

# Ports below the usual Linux ephemeral range (32768+), so a derived port rarely
# collides with a client socket; every node of a job derives the same port.
PORT_BASE = 10000
PORT_SPAN = 20000

# Environment every training process gets, on SLURM and locally.
BASE_ENV = {
    "PYTHONUNBUFFERED": "1",  # logs reach the SLURM output file as they happen
    "PYTHONFAULTHANDLER": "1",  # a hang or crash dumps every thread's stack
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective aborts instead of hanging
    "NCCL_DEBUG": "WARN",
}


@dataclass
class RunEntry:
    """One training run: where it writes and the overrides after the config path."""

    run_dir: str
    args: list[str]


@dataclass
class JobSpec:
    config: str
    """Absolute path of the training config."""
    runs: list[RunEntry]
    options: SlurmOptions
    log_dir: str
    """Directory of the SLURM stdout/stderr files (must exist before submission)."""
    workdir: str
    """Directory the job runs in (relative paths in the config resolve from here)."""
    python: str
    """Interpreter with moedit installed (the submitting one)."""
    array: str | None = None
    """`--array` value such as '0-2%2'; None for a single job."""
    loader_workers: int = 2
    """data.num_workers of the run(s): sizes the default --cpus-per-task."""
    max_cpus: int | None = None
    """CPUs of the partition's nodes (from sinfo) when known: caps the default --cpus-per-task."""


def render_sbatch(spec: JobSpec) -> str:
    if not spec.runs:
        raise ValueError("nothing to render: the job has no runs")
    if spec.array is None and len(spec.runs) != 1:
        raise ValueError(f"{len(spec.runs)} runs need a job array (spec.array)")
    lines = ["#!/bin/bash", "# Written by `moedit launch`. Values are shell-quoted; edit with care."]
    lines += [f"#SBATCH {directive}" for directive in _directives(spec)]
    if spec.options.cpus_per_task is None:
        opts = spec.options
        cpus = default_cpus_per_task(opts, spec.loader_workers, spec.max_cpus)
        lines.append(
            f"# --cpus-per-task={cpus}: moedit's default, as no --cpus-per-task was given: {opts.procs_per_node} "
            f"process(es) x max(4, 1 + data.num_workers) CPUs with data.num_workers = {spec.loader_workers}"
            + (f", capped at the node's {spec.max_cpus}" if spec.max_cpus else "")
            + "; pass --cpus-per-task to choose")
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(spec.workdir)}", ""]
    lines += _run_selection(spec)
    lines += _environment(spec.options)
    lines += _training(spec)
    lines += _epilogue(spec.options)
    return "\n".join(lines) + "\n"


def _directives(spec: JobSpec) -> list[str]:
    opts = spec.options
    check_directive_value("log directory", spec.log_dir)
    pattern = "%x-%A_%a" if spec.array is not None else "%x-%j"
    out = [
        f"--job-name={opts.job_name}",
        f"--nodes={opts.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the per-GPU processes
        f"--output={spec.log_dir}/{pattern}.out",
        f"--error={spec.log_dir}/{pattern}.err",
        "--open-mode=append",  # a requeued job appends to the same files
        "--requeue",
    ]
    if spec.array is not None:
        check_directive_value("array", spec.array)
        out.append(f"--array={spec.array}")
    if opts.gpus_per_node:
        out.append(f"--gpus-per-node={opts.gpus_per_node}")
    cpus = opts.cpus_per_task or default_cpus_per_task(opts, spec.loader_workers, spec.max_cpus)
    optional = {"cpus-per-task": cpus, "partition": opts.partition, "account": opts.account,
                "time": opts.time, "qos": opts.qos, "constraint": opts.constraint, "mem": opts.mem}
    out += [f"--{name}={value}" for name, value in optional.items() if value is not None]
    if opts.exclusive:
        out.append("--exclusive")
    if opts.signal_seconds:
        # Without "B:" SLURM signals the job steps (torchrun and its workers), not this script.
        out.append(f"--signal=USR1@{opts.signal_seconds}")
    out += list(opts.sbatch_args)
    return out


def _run_selection(spec: JobSpec) -> list[str]:
    def assign(run: RunEntry) -> str:
        args = " ".join(shlex.quote(arg) for arg in run.args)
        return f"RUN_DIR={shlex.quote(run.run_dir)}; TRAIN_ARGS=({args})"

    if spec.array is None:
        return [assign(spec.runs[0]), ""]
    lines = ['case "${SLURM_ARRAY_TASK_ID:?not an array task}" in']
    lines += [f"  {index}) {assign(run)} ;;" for index, run in enumerate(spec.runs)]
    lines += ['  *) echo "moedit: no run for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
    return lines


def _environment(opts: SlurmOptions) -> list[str]:
    nproc = opts.procs_per_node
    env = {**BASE_ENV, **opts.env}
    return [
        # sed reads all input, so a long node list cannot end the pipe with SIGPIPE under pipefail.
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f"MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        "export MASTER_ADDR MASTER_PORT",
        f"NPROC_PER_NODE={nproc}",
        # Split the task's CPUs between its processes so they do not oversubscribe cores.
        "export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE > 0 ? "
        "${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE : 1 ))",
        *[f"export {key}={shlex.quote(str(value))}" for key, value in env.items()],
        "",
    ]


def _training(spec: JobSpec) -> list[str]:
    python = shlex.quote(spec.python)
    config = shlex.quote(spec.config)
    return [
        'mkdir -p "$RUN_DIR"',
        'rm -f "$RUN_DIR/PREEMPTED"  # a marker left by the previous attempt',
        'echo "moedit: job $SLURM_JOB_ID attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"',
        "status=0",
        # torchrun must survive SIGUSR1 (its default action is to exit) so that only the
        # training processes act on it; the ignore is reset by their own handler.
        # srun is given the CPU count explicitly: some SLURM versions do not pass the
        # job's --cpus-per-task on to steps, which would pin every process to one core.
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \\",
        "  bash -c 'trap \"\" USR1; exec \"$@\"' moedit-node \\",
        f"  {python} -m torch.distributed.run \\",
        '  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" \\',
        '  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\',
        "  --max-restarts=0 \\",
        f'  -m moedit.cli train {config} "${{TRAIN_ARGS[@]}}" train.run_dir="$RUN_DIR" || status=$?',
        "",
    ]


def _epilogue(opts: SlurmOptions) -> list[str]:
    return [
        'if [ -f "$RUN_DIR/DONE" ]; then',
        '  echo "moedit: training finished"',
        "  exit 0",
        "fi",
        'if [ -f "$RUN_DIR/PREEMPTED" ]; then',
        f"  if [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {opts.max_requeues} ]; then",
        f'    echo "moedit: checkpointed on a signal; requeue $(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))'
        f' of {opts.max_requeues}"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "  fi",
        f'  echo "moedit: checkpointed on a signal but the {opts.max_requeues} requeues are used up" >&2',
        "  exit 3",
        "fi",
        'echo "moedit: training exited with status $status and no DONE marker" >&2',
        "exit $(( status == 0 ? 1 : status ))",
    ]
