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
