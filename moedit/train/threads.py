"""How many CPU threads a training process gives torch.

torch's default is one intra-op thread per core of the machine. On a shared machine that is the
worst choice: with OpenMP's spinning wait policy, two threads on a 2-core machine beside one busy
process made the quickstart 9.6x slower (275 -> 28.6 img/s), where one thread lost half (140.7),
a fair share. So `moedit train` starts with

    threads = max(1, min(cores it may run on / its processes on this node,
                         cores of the machine - the load other processes put on it))

where "cores it may run on" is the process's CPU affinity (cgroups, taskset, SLURM's binding),
capped by SLURM_CPUS_PER_TASK, shared among the node's processes (LOCAL_WORLD_SIZE), and the load
is the 1-minute load average at start. A thread count the user chose is never overridden:
OMP_NUM_THREADS (also what torchrun and `moedit launch slurm` set) or MOEDIT_NUM_THREADS. The
choice is printed. OMP_WAIT_POLICY is left alone: PASSIVE made a lone run 18% slower (226 img/s),
and it must be set before torch is imported to have any effect.
"""

from __future__ import annotations

import os
from typing import Mapping


def choose_threads(environ: Mapping[str, str], affinity: int, machine_cores: int,
                   load: float) -> tuple[int, str]:
    """(threads, why) for one training process; `affinity` = CPUs this process may run on."""
    for key in ("MOEDIT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = environ.get(key, "").strip()
        if value:
            try:
                threads = int(value)
            except ValueError:
                continue
            if threads >= 1:
                return threads, f"{key}={threads} (yours)"
    cores, why = affinity, f"{affinity} CPUs in this process's affinity"
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cores:
        cores, why = int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    local = environ.get("LOCAL_WORLD_SIZE", "1")
    procs = int(local) if local.isdigit() and int(local) > 0 else 1
    share = max(1, cores // procs)
    if procs > 1:
        why += f" / {procs} processes on this node"
    free = machine_cores - round(load)
    if free < share:
        share, why = max(1, free), why + f", {load:.1f} cores busy with other work (load average)"
    return share, why


def set_threads(environ: Mapping[str, str] | None = None) -> str:
    """Apply `choose_threads` to torch in this process; returns the line to print."""
    import torch

    environ = os.environ if environ is None else environ
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    threads, why = choose_threads(environ, affinity, os.cpu_count() or affinity, load)
    torch.set_num_threads(threads)
    return (f"moedit train: {threads} CPU thread{'s' if threads > 1 else ''} for torch ({why}); "
            "set OMP_NUM_THREADS to choose")
