"""torchrun on this machine, with the environment the SLURM jobs get."""

from __future__ import annotations

import os

from moedit.launch.render import BASE_ENV


def torchrun_command(python: str, nproc: int, config: str, args: list[str]) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", "moedit.cli", "train", config, *args]


def local_env(nproc: int, extra: dict[str, str], base: dict[str, str] | None = None,
              cpu_count: int | None = None) -> dict[str, str]:
    """The caller's environment plus moedit's fixed settings; `extra` (--env) wins."""
    env = dict(os.environ if base is None else base)
    env.update(BASE_ENV)
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    # Same split as the SLURM script: the machine's CPUs shared among the processes.
    env["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))
    env.update(extra)
    return env
