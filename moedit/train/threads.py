"""How many CPU threads a training process gives torch.

torch's default is one intra-op thread per core of the machine. On a shared machine that is the
worst choice: with OpenMP's spinning wait policy, two threads on a 2-core machine beside one busy
process made the quickstart 9.6x slower (275 -> 28.6 img/s), where one thread lost half (140.7),
a fair share. So `moedit train` starts with

    threads = max(1, min(cores it may run on / its processes on this node,
                         cores it may run on - the load other processes put on them))

where "cores it may run on" is the process's CPU affinity (cgroups, taskset, SLURM's binding),
capped by SLURM_CPUS_PER_TASK for the share, shared among the node's processes (LOCAL_WORLD_SIZE),
and the load is the cores of its affinity that other processes keep busy, measured from /proc/stat
over a quarter of a second at start (elsewhere: the machine's cores less the 1-minute load
average). The load average lags by minutes: right after `pip install` or an earlier run on the
2-core machine it still said ~1 core busy on an idle machine, and the quickstart's first run then
took one thread where two were free. A thread count the user chose is never overridden:
OMP_NUM_THREADS (also what torchrun and `moedit launch slurm` set) or MOEDIT_NUM_THREADS. The
choice is printed. OMP_WAIT_POLICY is left alone: PASSIVE made a lone run 18% slower (226 img/s),
and it must be set before torch is imported to have any effect.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Mapping


def choose_threads(environ: Mapping[str, str], affinity: int, machine_cores: int,
                   load: float, load_source: str = "load average") -> tuple[int, str]:
    """(threads, why) for one training process; `affinity` = CPUs this process may run on, `load` =
    cores of `machine_cores` that other work keeps busy (`load_source` says how it was measured)."""
    chosen = users_choice(environ)
    if chosen is not None:
        return chosen
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
        share, why = max(1, free), why + f", {load:.1f} cores busy with other work ({load_source})"
    return share, why


def users_choice(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(threads, why) from MOEDIT_NUM_THREADS or OMP_NUM_THREADS (a whole number >= 1), else None."""
    for key in ("MOEDIT_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            threads = int(environ.get(key, "").strip())
        except ValueError:
            continue
        if threads >= 1:
            return threads, f"{key}={threads} (yours)"
    return None


def cpu_jiffies(proc_stat: str, cpus: Iterable[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot summed over the `cpuN` lines of a /proc/stat text for N
    in `cpus`; None if one of them is missing. Busy = user + nice + system + irq + softirq + steal;
    total adds idle and iowait (guest time is already counted in user)."""
    rows = {}
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            rows[int(name[3:])] = [int(v) for v in rest.split()[:8]]
    busy = total = 0
    for cpu in cpus:
        if cpu not in rows or len(rows[cpu]) < 8:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = rows[cpu]
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def busy_cores(before: tuple[int, int], after: tuple[int, int], cpus: int, own_cores: float = 0.0) -> float:
    """Cores kept busy by other work between two `cpu_jiffies` readings of `cpus` CPUs, this
    process's own use (`own_cores`, in cores) taken out."""
    elapsed = (after[1] - before[1]) / cpus  # ticks that passed on each CPU
    if elapsed <= 0:
        return 0.0
    return max(0.0, (after[0] - before[0]) / elapsed - own_cores)


def measure_busy_cores(cpus: set[int], window: float = 0.25) -> float | None:
    """Cores of `cpus` that other processes keep busy now (over `window` seconds, this process's own
    CPU time taken out); None without /proc/stat or when it lacks one of `cpus`."""
    try:
        with open("/proc/stat") as f:
            before = cpu_jiffies(f.read(), cpus)
        own, wall = sum(os.times()[:2]), time.monotonic()
        time.sleep(window)
        with open("/proc/stat") as f:
            after = cpu_jiffies(f.read(), cpus)
        own_cores = (sum(os.times()[:2]) - own) / max(time.monotonic() - wall, 1e-6)
    except OSError:
        return None
    if before is None or after is None:
        return None
    return busy_cores(before, after, len(cpus), own_cores)


def set_threads(environ: Mapping[str, str] | None = None) -> str:
    """Apply `choose_threads` to torch in this process; returns the line to print."""
    import torch

    environ = os.environ if environ is None else environ
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = set(range(os.cpu_count() or 1))
    busy = None if users_choice(environ) else measure_busy_cores(cpus)  # no quarter second when set
    if busy is not None:  # on the CPUs this process may run on
        threads, why = choose_threads(environ, len(cpus), len(cpus), busy, "measured over 0.25 s")
    else:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
        threads, why = choose_threads(environ, len(cpus), os.cpu_count() or len(cpus), load)
    torch.set_num_threads(threads)
    return (f"moedit train: {threads} CPU thread{'s' if threads > 1 else ''} for torch ({why}); "
            "set OMP_NUM_THREADS to choose")
