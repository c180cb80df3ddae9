"""Running a command as its own process group (benchmarks/train.py, scripts/megatron_gpu_parity.py):
the group is stopped on timeout or when the caller is signalled, so no torchrun worker outlives its
row. A plain module beside the benchmarks (device machines run them from a checkout, uninstalled)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None, cwd: str | Path | None = None) -> int:
    """Run `cmd` in its own process group, output into `log`. On timeout, or when this script gets
    SIGTERM/SIGINT (from `timeout`, say), the whole group is stopped, torchrun's workers included.
    Returns the exit status (124 on timeout)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def stop_group() -> None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    return
                except ProcessLookupError:
                    return
                except subprocess.TimeoutExpired:
                    continue

        def on_signal(signum, frame):
            stop_group()
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group()
            out.write(f"\n== timed out after {timeout:.0f} s\n")
            return 124
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
