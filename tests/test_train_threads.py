"""CPU threads of a training process (issue 27, item 13): a fair share of a shared machine, and
never a count the user chose."""

from __future__ import annotations

import pytest

from moedit.train.threads import choose_threads
from test_train_e2e import moedit, tiny_config


@pytest.mark.parametrize("environ, affinity, cores, load, expected", [
    ({}, 2, 2, 0.0, 2),                                   # idle machine: all of it
    ({}, 2, 2, 1.0, 1),                                   # one busy neighbour: half (measured 140.7 vs 28.6 img/s)
    ({}, 2, 2, 5.0, 1),                                   # never below one
    ({}, 64, 64, 0.2, 64),
    ({"LOCAL_WORLD_SIZE": "8"}, 64, 64, 0.0, 8),          # 8 ranks on the node share it
    ({"SLURM_CPUS_PER_TASK": "16"}, 64, 64, 0.0, 16),     # the job's allocation, not the node
    ({"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "4"}, 64, 64, 0.0, 4),
    ({}, 4, 64, 0.0, 4),                                  # affinity (cgroup, taskset) bounds it
    ({"OMP_NUM_THREADS": "3"}, 2, 2, 1.0, 3),             # the user's choice stands
    ({"MOEDIT_NUM_THREADS": "5", "OMP_NUM_THREADS": "1"}, 2, 2, 0.0, 5),
    ({"OMP_NUM_THREADS": "junk"}, 2, 2, 0.0, 2),
])
def test_choose_threads(environ, affinity, cores, load, expected):
    threads, why = choose_threads(environ, affinity, cores, load)
    assert threads == expected, why


def test_the_choice_is_printed_and_the_users_is_kept(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 1, "num_sample_images": 0})
    out = moedit("train", cfg, f"train.run_dir={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"}).stdout
    assert "moedit train: 1 CPU thread for torch (OMP_NUM_THREADS=1 (yours)); set OMP_NUM_THREADS to choose" in out


def _stat(cpu0: list[int], cpu1: list[int]) -> str:
    """A /proc/stat text with two CPUs (their eight counters, then guest and guest_nice)."""
    rows = [f"cpu{i} " + " ".join(map(str, [*counters, 0, 0])) for i, counters in enumerate((cpu0, cpu1))]
    return "\n".join(["cpu  0 0 0 0 0 0 0 0 0 0", *rows, "intr 1 2 3"]) + "\n"


def test_busy_cores_from_proc_stat():
    """user nice system idle iowait irq softirq steal: one CPU fully busy (half user, half system),
    the other a quarter busy (iowait counts as idle), over 100 ticks each; this process used 0.25
    of a core of that."""
    from moedit.train.threads import busy_cores, cpu_jiffies

    before = _stat([100, 0, 50, 1000, 0, 0, 0, 0], [10, 0, 0, 500, 7, 0, 0, 0])
    after = _stat([150, 0, 100, 1000, 0, 0, 0, 0], [20, 5, 0, 570, 12, 5, 0, 5])
    b, a = cpu_jiffies(before, {0, 1}), cpu_jiffies(after, {0, 1})
    assert b == (160, 1667) and a == (285, 1867)
    assert busy_cores(b, a, 2) == pytest.approx(1.25)
    assert busy_cores(b, a, 2, own_cores=0.25) == pytest.approx(1.0)
    assert cpu_jiffies(after, {1}) == (35, 617)
    assert cpu_jiffies(after, {0, 2}) is None  # a CPU /proc/stat does not list: fall back to the load average


def test_a_busy_neighbour_is_measured():
    """A spinning neighbour keeps about one core busy, and the measurement at start sees it."""
    import os
    import subprocess
    import sys

    from moedit.train.threads import measure_busy_cores

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat (Linux)")
    cpus = set(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = measure_busy_cores(cpus, window=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.7, busy
