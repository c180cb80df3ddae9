"""The run directory: one training job at a time (`RUN/.lock`); its writes that fail with a named
error when the disk is full are moedit.fileio's.

The lock
--------
`RunDirLock.acquire(run_dir)` opens `RUN/.lock` and takes an exclusive `fcntl.flock` on it, without
waiting. The kernel holds the lock for the open file, not for the file's existence: it is released
when the process exits however it exits (normal end, exception, SIGKILL, OOM kill, node reboot), so
a job restarted after a crash, or a SLURM job requeued after preemption, simply takes it again.
The file itself stays; it records who holds the lock (host, pid, SLURM job id, start time), and
a second job that finds the lock taken fails with `RunDirBusy`, which names them. Never delete the
file to get past the error: that does not release the lock of a running job and lets a third
job in beside it.

Only rank 0 takes the lock (the other ranks of a job share its run directory by design).

Filesystems: on local filesystems and on NFS (Linux emulates `flock` with NFS byte-range locks)
two jobs on any hosts exclude each other. On NFS a lock held by a host that died is released only
when the server's lease runs out (NFSv4: about 90 s), so a requeued job of the same SLURM job id
waits up to `MOEDIT_RUN_LOCK_WAIT_S` (default 120) seconds for it; other jobs fail at once.
Lustre mounted with `localflock`, and some FUSE filesystems, lock only within one host: two jobs on
different hosts are then not excluded. Where the filesystem refuses locks altogether (ENOLCK,
EOPNOTSUPP, e.g. Lustre with `noflock`), training proceeds with a warning.
Processes forked by the holder (data-loader workers) inherit the open file and keep the lock
until they exit too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moedit.errors import MoeditError
from moedit.fileio import DISK_FULL_ERRNOS, DiskFullError, disk_full_message

LOCK_NAME = ".lock"
_NO_LOCKS_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(MoeditError):
    """Another training job holds the run directory's lock."""


# --- the lock ------------------------------------------------------------------------------------


def _holder_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv[:4])[:200],
    }
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        info["slurm_job_id"] = f"{array}_{task}" if array and task else job
        info["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return info


def read_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """What `RUN/.lock` says about its holder (None if it says nothing readable). Only meaningful
    while the lock is held: the holder rewrites it when it takes the lock and empties it on release."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text()
        info = json.loads(text)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not recorded itself in the lock file yet)"
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    text = "another training job (" + ", ".join(parts) + ")"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        text += f"; pid {pid} has exited, but a process it started (a data-loader worker?) still has the lock open"
    return text


class RunDirLock:
    """An exclusive lock on one run directory, held while this object is open. See the module doc."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        """False after release, or where the filesystem refused locks (see `acquire`)."""
        return self._fd is not None

    @classmethod
    def acquire(cls, run_dir: str | Path, wait_s: float | None = None) -> "RunDirLock":
        """Take `RUN/.lock` (creating the directory) or raise `RunDirBusy` naming the holder.

        wait_s: how long to wait for a held lock. Default: 0, except for a requeued SLURM job whose
        own earlier run holds it (same job id), which waits `MOEDIT_RUN_LOCK_WAIT_S` (120) seconds
        for a lock a dead host still holds on NFS."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MoeditError(f"train.run_dir = {run_dir}: cannot create the lock file {path} ({exc.strerror}); "
                              "choose a directory you can write") from None
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in _NO_LOCKS_ERRNOS:
                    os.close(fd)
                    print(f"moedit: warning: {path}: the filesystem does not support locks ({exc.strerror}); "
                          "make sure no other training job uses this run directory", file=sys.stderr, flush=True)
                    return cls(path, None)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            holder = read_holder(run_dir)
            if deadline is None:
                deadline = time.monotonic() + _wait_for(holder, wait_s)
                if time.monotonic() < deadline:
                    print(f"moedit: {run_dir} is still locked by {_describe(holder)}, an earlier run of this job; "
                          f"waiting up to {deadline - time.monotonic():.0f} s for the lock", file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunDirBusy(
                    f"train.run_dir = {run_dir} is in use by {_describe(holder)}: one run directory takes one training "
                    "job at a time. Wait for that job to end or stop it, or set train.run_dir to another directory. "
                    f"(The lock is released when its holder exits; deleting {path} does not release it.)"
                )
            time.sleep(1.0)
        info = json.dumps(_holder_info()) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(disk_full_message(path, "the run directory's lock file")) from None
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Empty the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            # Unlock explicitly: forked children (data-loader workers) share this open file, and
            # closing only our descriptor would leave the lock held until they exit.
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped without release() (exceptions in setup)
        try:
            self.release()
        except Exception:
            pass


def _wait_for(holder: dict[str, Any] | None, wait_s: float | None) -> float:
    if wait_s is not None:
        return max(0.0, wait_s)
    mine = _holder_info().get("slurm_job_id")
    if mine and holder and holder.get("slurm_job_id") == mine and holder.get("pid") != os.getpid():
        return float(os.environ.get("MOEDIT_RUN_LOCK_WAIT_S", "120"))
    return 0.0
