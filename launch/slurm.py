"""Talking to SLURM: resource options, the cluster's shape, submission and job states.

Everything that runs a SLURM command lives here, so the rest of `moedit.launch`
is plain data in, text out (and testable without a cluster).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from moedit.errors import MoeditError

# Characters that would let a value escape its `#SBATCH` line (sbatch splits
# directive lines on whitespace and reads quotes itself) or its filename pattern.
_UNSAFE_DIRECTIVE = re.compile(r"[\s\"'\\`$;|&<>(){}]")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmOptions:
    """Resources and policies of one job (or of every task of a job array)."""

    nodes: int = 1
    """Nodes per run; one task per node runs torchrun."""
    gpus_per_node: int = 0
    """GPUs requested per node (`--gpus-per-node`); 0 = CPU job."""
    nproc_per_node: int | None = None
    """Training processes per node; defaults to gpus_per_node, or 1 for CPU jobs."""
    cpus_per_task: int | None = None
    """CPUs for the one task per node (shared by its nproc_per_node processes)."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Time limit in any SLURM form: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    """Memory per node, e.g. 64G (SLURM's `--mem`)."""
    exclusive: bool = False
    sbatch_args: list[str] = field(default_factory=list)
    """Extra `#SBATCH` directives passed through verbatim, e.g. `--reservation=abc`."""
    signal_seconds: int = 120
    """SLURM sends SIGUSR1 this long before the time limit so the trainer can checkpoint; 0 = off."""
    max_requeues: int = 10
    """How many times a job that checkpointed on a signal requeues itself."""
    job_name: str = "moedit"
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables exported in the job script (e.g. NCCL_SOCKET_IFNAME)."""

    def __post_init__(self) -> None:
        for name in ("partition", "account", "time", "qos", "constraint", "mem", "job_name"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):  # YAML gives `time: 30` as an int
                setattr(self, name, str(value))
        for name in ("nodes", "gpus_per_node", "signal_seconds", "max_requeues"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"slurm.{name} = {value!r}: must be a non-negative integer")
        if self.nodes < 1:
            raise ValueError(f"slurm.nodes = {self.nodes}: need at least one node")
        for name in ("nproc_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"slurm.{name} = {value!r}: must be a positive integer")
        if self.gpus_per_node and self.nproc_per_node and self.nproc_per_node > self.gpus_per_node:
            raise ValueError(
                f"slurm.nproc_per_node = {self.nproc_per_node} exceeds gpus_per_node = "
                f"{self.gpus_per_node}: use at most one process per GPU")
        for name in ("partition", "account", "time", "qos", "mem", "job_name"):
            value = getattr(self, name)
            if value is not None:
                check_directive_value(f"slurm.{name}", str(value))
        if self.constraint is not None:  # constraints legitimately use & and |, never whitespace
            if re.search(r"[\s\"'\\`$;<>]", self.constraint):
                raise ValueError(f"slurm.constraint = {self.constraint!r}: contains whitespace or shell characters")
        for arg in self.sbatch_args:
            check_sbatch_arg(arg)
        for key in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"--env {key!r}: not a valid environment variable name")
        if self.time is not None:
            limit = parse_time_limit(self.time)
            if self.signal_seconds and self.signal_seconds >= limit:
                raise ValueError(
                    f"slurm.signal_seconds = {self.signal_seconds} is not shorter than the time limit "
                    f"{self.time} ({limit} s): lower --signal-seconds or raise --time")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


DEFAULT_CPUS_PER_PROCESS = 4
"""Without --cpus-per-task, each training process gets max(this, 1 + data.num_workers) CPUs."""


def default_cpus_per_task(options: SlurmOptions, loader_workers: int = 2, max_cpus: int | None = None) -> int:
    """CPUs per node when --cpus-per-task is not given: per training process one core for its main
    thread plus one per data-loader worker, at least DEFAULT_CPUS_PER_PROCESS, capped at the node's
    CPUs when known. (SLURM's own default is often 1 CPU for the whole task: every rank and loader
    worker of the node would share one core.)"""
    cpus = options.procs_per_node * max(DEFAULT_CPUS_PER_PROCESS, 1 + max(0, loader_workers))
    return max(1, min(cpus, max_cpus)) if max_cpus else cpus


def check_directive_value(name: str, value: str) -> None:
    """Reject a value that could break out of its `#SBATCH` line."""
    if not value or _UNSAFE_DIRECTIVE.search(value):
        raise ValueError(
            f"{name} = {value!r}: empty or contains whitespace, quotes or shell characters, "
            "which cannot go into an #SBATCH line")


# `--sbatch-arg` must not smuggle in options that moedit sets itself: the script depends on them.
_MANAGED_OPTIONS = {
    "--job-name": "--job-name", "-J": "--job-name", "--nodes": "--nodes", "-N": "--nodes",
    "--ntasks-per-node": None, "--output": None, "-o": None, "--error": None, "-e": None,
    "--open-mode": None, "--requeue": None, "--no-requeue": None, "--array": None, "-a": None,
    "--gpus-per-node": "--gpus-per-node", "--cpus-per-task": "--cpus-per-task", "-c": "--cpus-per-task",
    "--partition": "--partition", "-p": "--partition", "--account": "--account", "-A": "--account",
    "--time": "--time", "-t": "--time", "--qos": "--qos", "-q": "--qos", "--constraint": "--constraint",
    "-C": "--constraint", "--mem": "--mem", "--exclusive": "--exclusive", "--signal": "--signal-seconds",
}
_OPTION_NAME = re.compile(r"^(--[A-Za-z][A-Za-z0-9-]*|-[A-Za-z])$")


def check_sbatch_arg(arg: str) -> None:
    """One extra `#SBATCH` option, `--name` or `--name=VALUE` (docs/launch.md): the value obeys the
    rule of every other #SBATCH value (no whitespace, quotes or shell characters), and an option that
    moedit writes itself is refused with the flag to use instead."""
    if not isinstance(arg, str):
        raise ValueError(f"--sbatch-arg {arg!r}: must be a string such as --reservation=NAME")
    name, sep, value = arg.partition("=")
    if not _OPTION_NAME.match(name):
        raise ValueError(f"--sbatch-arg {arg!r}: must be one long option such as --reservation=NAME "
                         "(write --sbatch-arg=--reservation=NAME)")
    if name in _MANAGED_OPTIONS:
        flag = _MANAGED_OPTIONS[name]
        instead = f"use moedit's {flag} flag" if flag else "moedit sets it itself"
        raise ValueError(f"--sbatch-arg {arg!r}: {name} is written by moedit launch; {instead}")
    if sep:
        check_directive_value(f"--sbatch-arg {name}", value)


def parse_time_limit(text: str) -> int:
    """SLURM time limit string -> seconds. 'MM' alone means minutes, as in sbatch."""
    match = _TIME_RE.match(text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60  # MM


# --------------------------------------------------------------------------- cluster shape


@dataclass
class Partition:
    name: str
    nodes: int
    max_cpus: int
    max_gpus: int
    is_default: bool


def parse_sinfo_nodes(text: str) -> dict[str, Partition]:
    """Parse `sinfo -h -N -o %P|%N|%c|%G` (one line per node and partition)."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 4:
            raise MoeditError(f"unexpected sinfo output line: {line!r}")
        raw_name, _node, cpus, gres = fields
        name = raw_name.rstrip("*")
        part = parts.setdefault(name, Partition(name, 0, 0, 0, raw_name.endswith("*")))
        part.nodes += 1
        part.max_cpus = max(part.max_cpus, int(cpus) if cpus.isdigit() else 0)
        part.max_gpus = max(part.max_gpus, gpus_in_gres(gres))
    return parts


def gpus_in_gres(gres: str) -> int:
    """GPUs in a GRES string such as 'gpu:8', 'gpu:a100:4(S:0-1),nic:1' or '(null)'."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres):
        item = re.sub(r"\(.*?\)", "", item).strip()
        fields = item.split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partition_of(options: SlurmOptions, partitions: dict[str, Partition]) -> Partition | None:
    """The partition a job with these options lands in (None: no default partition to tell)."""
    if options.partition is None:
        defaults = [p for p in partitions.values() if p.is_default]
        return defaults[0] if defaults else None
    if options.partition in partitions:
        return partitions[options.partition]
    known = ", ".join(sorted(partitions)) or "none"
    raise MoeditError(f"--partition {options.partition}: no such partition on this cluster (known: {known})")


def check_against_cluster(options: SlurmOptions, partitions: dict[str, Partition]) -> None:
    """Fail early, in one line, on requests the cluster can never satisfy."""
    part = partition_of(options, partitions)
    if part is None:
        return  # no default partition: sbatch itself will say what it wants
    if options.nodes > part.nodes:
        raise MoeditError(f"--nodes {options.nodes}: partition {part.name} has only {part.nodes} node(s)")
    if options.gpus_per_node > part.max_gpus:
        raise MoeditError(
            f"--gpus-per-node {options.gpus_per_node}: nodes of partition {part.name} have at most "
            f"{part.max_gpus} GPU(s) (sinfo GRES)")
    if options.cpus_per_task is not None and options.cpus_per_task > part.max_cpus:
        raise MoeditError(
            f"--cpus-per-task {options.cpus_per_task}: nodes of partition {part.name} have at most "
            f"{part.max_cpus} CPUs")


# --------------------------------------------------------------------------- commands


def require_slurm(command: str = "sbatch") -> str:
    path = shutil.which(command)
    if path is None:
        raise MoeditError(
            f"SLURM command '{command}' not found on PATH: run on a SLURM login node, "
            "or use `moedit launch local` / --dry-run")
    return path


def run_slurm(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    require_slurm(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        first = message[0] if message else f"exit code {proc.returncode}"
        raise MoeditError(f"{args[0]} failed: {first}")
    return proc


def query_partitions() -> dict[str, Partition]:
    return parse_sinfo_nodes(run_slurm(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G"]).stdout)


def submit(script_path: str, extra_args: list[str] | None = None) -> str:
    """sbatch a script file; returns the job id (for arrays: the array job id)."""
    proc = run_slurm(["sbatch", "--parsable", *(extra_args or []), script_path])
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints 'ID' or 'ID;cluster'
    if not job_id.isdigit():
        raise MoeditError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return job_id


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """States of jobs still known to squeue, keyed like '123' or '123_4' for array tasks."""
    if not job_ids:
        return {}
    unique = sorted({job_id.split("_")[0] for job_id in job_ids})
    proc = run_slurm(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(unique)], check=False)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise MoeditError(f"squeue failed: {proc.stderr.strip()}")
    states = {}
    for line in proc.stdout.splitlines():
        if "|" in line:
            job_id, state = line.strip().split("|", 1)
            states[job_id] = state
    return states


def finished_job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` fields of a job that left the queue ({} once SLURM forgot it)."""
    proc = run_slurm(["scontrol", "show", "job", "-o", job_id], check=False)
    if proc.returncode != 0:
        return {}
    fields = {}
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields
