"""Writes that fail with one named error when the disk is full, and leave no half file behind:
`write_text` (atomic: temp file + rename), `append_line` (one unbuffered write, cut back on
failure), `is_disk_full` and `disk_full_message` for other writers (checkpoints). Used by the run
directory's files and by `moedit.configtools.dump_yaml`. And the one read of a checkpoint's torch
files, `safe_torch_load` (plain containers only; a refused or damaged file is a `CheckpointError`
naming it), used by the trainer's checkpoints and by the engines' own files."""

from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from moedit.errors import MoeditError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(MoeditError):
    """No space (or quota) left while writing a file."""


class CheckpointError(MoeditError):
    """A checkpoint that cannot be written, or a file of one that is damaged, unreadable or refused."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (else its type's name)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def refused_global(exc: BaseException) -> str | None:
    """The pickled global that torch's weights-only unpickler refused, named in its error, if any."""
    match = re.search(r"GLOBAL (\S+)", str(exc))
    return match.group(1) if match else None


def safe_torch_load(path: Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with named errors: a refused object (a hostile or foreign
    pickle; nothing of it runs) or a damaged file is a `CheckpointError` naming the file."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = refused_global(exc)
        if refused:
            raise CheckpointError(
                f"{path}: refused to unpickle: it holds {refused}, and moedit writes only tensors and plain "
                "containers there, so the file was altered or does not come from moedit (nothing of it was run). "
                "Remove this checkpoint, or resume from one you trust (train.resume=<its directory>)"
            ) from None
        detail = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "Weights only load failed" not in ln
                  and not ln.strip().startswith(("Please file", "Check the documentation"))]
        raise CheckpointError(f"{path}: unreadable ({detail[0] if detail else 'not a torch file'}); the file is "
                              "damaged: resume from an older checkpoint or remove this one") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: unreadable, the file is damaged ({first_line(exc)}); resume from an older "
                              "checkpoint or remove this one") from None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` reports no space or no quota left: an OSError's errno, or the message of a
    library that does not keep the errno (safetensors: "No space left on device (os error 28)")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text \
                or "os error 122" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(path: str | Path, what: str, where: str | Path | None = None) -> str:
    """`where`: the directory to name for `df` (default: the file's directory)."""
    path = Path(path)
    return (f"no space left on the device (or quota exceeded) while writing {what} {path}; free space there "
            f"(df -h {where or path.parent}) or set train.run_dir to a directory on another disk, then rerun the "
            "same command (training resumes from the last complete checkpoint)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_text(path: str | Path, text: str, what: str = "file") -> None:
    """Write `path` atomically (temp file + rename); a full disk becomes `DiskFullError` naming
    `path`, and the temp file is removed. The old file, if any, stays whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, what)) from None
        raise MoeditError(f"cannot write {what} {path} ({exc.strerror}); check the directory's permissions "
                          "or set train.run_dir to another directory") from None


def append_line(path: str | Path, line: str, what: str = "log") -> None:
    """Append one line in one unbuffered write; on a full disk the file is cut back to its previous
    size (no half line is left) and `DiskFullError` names it."""
    path = Path(path)
    data = (line if line.endswith("\n") else line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, what)) from None
        raise
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, data)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(disk_full_message(path, what)) from None
            raise
    finally:
        os.close(fd)
