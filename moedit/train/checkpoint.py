"""Checkpoints: atomic writes, retention, verified auto-resume, safe loading and export.

Layout of one checkpoint (a directory, renamed into place only when complete):

    checkpoints/step_0001000/
        model.safetensors   raw weights and buffers
        ema.safetensors     EMA weights and buffers
        state.pt            optimizer state, step, skipped-step count, engine entries (plain containers only)
        rank_00000.pt       per-rank data-loader state (+ engine entries: Megatron's data rank and EMA shards)
        megatron/, optim_*  Megatron's distributed checkpoint and per-rank optimizer (engine megatron only)
        config.yaml         the resolved config
        deepspeed/          DeepSpeed's own checkpoint (engine deepspeed only: sharded optimizer states)
        meta.json           {"step", "world_size", "engine", "engine_files", "complete": true,
                             "files": {relative path: {"size", "sha256"}} of every other file}; written last
    checkpoints/latest      name of the newest complete checkpoint

model.safetensors and ema.safetensors are the canonical single-device weights whatever the
engine, so `load_for_inference`, `export_safetensors` and `moedit sample` read every checkpoint.
No RNG or learning-rate state is saved because none is needed: the learning rate is a function of
the step, and every random draw of training comes from a generator seeded by (seed, step,
micro-batch) (moedit/train/trainer.py).

Writing (`CheckpointWriter.save`): every file goes into `.tmp_<name>.<pid>.<random>` (one name per
save, agreed by all ranks), rank 0 records sizes and SHA-256 of every file in meta.json, fsyncs, and
renames the directory into place. Replacing an existing checkpoint of the same name swaps the two
directories atomically (Linux renameat2 RENAME_EXCHANGE) where the filesystem can, else renames the
old one to `.trash_<name>.<token>` first (after pointing `latest` away from it). `.tmp_*` and
`.trash_*` directories are never resumed from; pruning removes them. A full disk or another write
error is one named error; the partial directory is removed and older checkpoints are untouched.

Resuming (`resolve_resume`): the newest checkpoint whose files match meta.json's sizes and checksums
(checkpoints written before checksums: whose safetensors and torch files open); damaged ones are
skipped with a warning naming them and why.

Nothing of moedit's is ever unpickled: tensors come from safetensors, the rest through
`torch.load(weights_only=True)` (`safe_torch_load`: a refused object is a named error, and nothing
of it runs). (DeepSpeed reads its own `deepspeed/` files itself.)
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from moedit.errors import MoeditError
from moedit.fileio import (
    CheckpointError,
    DiskFullError,
    disk_full_message,
    first_line,
    is_disk_full,
    safe_torch_load,
    write_text,
)

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp_"
TRASH_PREFIX = ".trash_"
CHECKSUM = "sha256"
_HASH_THREADS = 4


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _warn(text: str) -> None:
    print(f"moedit: warning: {text}", file=sys.stderr, flush=True)


def _atomic_write_text(path: Path, text: str) -> None:
    write_text(path, text, what="checkpoint pointer")


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def is_complete(ckpt: Path) -> bool:
    meta = ckpt / "meta.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return False
    if not isinstance(info, dict):
        return False
    needed = ["model.safetensors", "ema.safetensors", "state.pt"]
    needed += [f"rank_{r:05d}.pt" for r in range(int(info.get("world_size", 1)))]
    needed += list(info.get("engine_files", []))
    return bool(info.get("complete")) and all((ckpt / n).exists() for n in needed)


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `ckpt_root`, oldest first. Incomplete ones, and the `.tmp_*` /
    `.trash_*` directories of writes in progress or interrupted, are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


# --- checksums and verification ------------------------------------------------------------------


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of one file, read in 8 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL: files hash in parallel threads
            size += n
    return size, h.hexdigest()


def checksum_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `directory` except its meta.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / "meta.json")
    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(files)))) as pool:
        digests = list(pool.map(file_digest, files))
    return {p.relative_to(directory).as_posix(): {"size": size, CHECKSUM: digest}
            for p, (size, digest) in zip(files, digests)}


def verify_checkpoint(ckpt: Path, checksums: bool = True) -> str | None:
    """None if `ckpt` is intact, else what is wrong with it (naming the file).

    With "files" in meta.json: every listed file has its recorded size and (if `checksums`) its
    SHA-256. Checkpoints written before checksums: the safetensors files parse and the torch files
    are whole zip archives (what a truncated or overwritten file fails)."""
    if not is_complete(ckpt):
        return "meta.json or a file it lists is missing"
    meta = json.loads((ckpt / "meta.json").read_text())
    files = meta.get("files")
    if isinstance(files, dict) and files:
        for rel, record in files.items():
            try:
                size = (ckpt / rel).stat().st_size
            except OSError as exc:
                return f"{rel}: {exc.strerror.lower() if exc.strerror else 'unreadable'}"
            if size != record.get("size"):
                return f"{rel}: {size} bytes, {record.get('size')} recorded when it was written (truncated or overwritten)"
        if not checksums:
            return None
        names = [rel for rel, record in files.items() if CHECKSUM in record]

        def check(rel: str) -> str | None:
            try:
                _, digest = file_digest(ckpt / rel)
            except OSError as exc:
                return f"{rel}: unreadable ({exc.strerror})"
            if digest != files[rel][CHECKSUM]:
                return f"{rel}: {CHECKSUM} differs from the one recorded when it was written (the file changed on disk)"
            return None

        with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(names)))) as pool:
            problems = [p for p in pool.map(check, names) if p]
        return problems[0] if problems else None
    # written before checksums were recorded: structural checks
    from safetensors import safe_open

    for name in ("model.safetensors", "ema.safetensors"):
        try:
            with safe_open(str(ckpt / name), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError
            return f"{name}: not a readable safetensors file ({first_line(exc)})"
    torch_files = ["state.pt"] + [f"rank_{r:05d}.pt" for r in range(int(meta.get("world_size", 1)))]
    for name in torch_files:
        path = ckpt / name
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{name}: not a whole torch file ({first_line(exc)})"
    return None


def _choose_intact(root: Path, report: bool) -> Path | None:
    """The newest complete checkpoint under `root` that verifies; warns about newer damaged ones."""
    damaged: list[tuple[Path, str]] = []
    for _, ckpt in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if report:
                for bad, why in damaged:
                    _warn(f"checkpoint {bad} is damaged ({why}); resuming from the older {ckpt.name} instead")
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        listing = "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
        raise CheckpointError(
            f"every checkpoint in {root} is damaged ({listing}); there is nothing intact to resume from. "
            f"Move {root} away to train from scratch, or set train.resume to a checkpoint you have elsewhere"
        )
    return None


def _agreed(engine, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its CheckpointError) on every rank; plain fn() without engine."""
    if engine is None or engine.world_size == 1:
        return fn()
    outcome: tuple[str, Any] = ("", None)
    if engine.is_main:
        try:
            outcome = ("ok", fn())
        except CheckpointError as exc:
            outcome = ("error", str(exc))
    outcome = engine.broadcast_object(outcome)
    if outcome[0] == "error":
        raise CheckpointError(outcome[1])
    return outcome[1]


def resolve_resume(resume: str, run_dir: Path, engine=None) -> Path | None:
    """The checkpoint `train.resume` points at, or None to start fresh.

    auto: the newest intact checkpoint of the run (damaged newer ones are skipped with a warning).
    A path: that checkpoint, which must be intact. With `engine` (several ranks), rank 0 verifies
    and every rank gets its choice; without, each process verifies for itself."""
    if resume == "never":
        return None
    report = engine is None or engine.is_main
    if resume == "auto":
        root = run_dir / "checkpoints"
        name = _agreed(engine, lambda: getattr(_choose_intact(root, report), "name", None))
        return root / name if name else None
    path = Path(resume)
    if not path.is_dir() or not is_complete(path):
        raise MoeditError(f"train.resume = {resume}: not a complete checkpoint directory")
    problem = _agreed(engine, lambda: verify_checkpoint(path))
    if problem:
        raise CheckpointError(f"train.resume = {resume}: the checkpoint is damaged ({problem}); "
                              "point train.resume at another checkpoint")
    return path


# --- safe reading ----------------------------------------------------------------------------------


def read_safetensors(path: Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """load_file with a named error for a damaged or non-safetensors file."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' SafetensorError, OSError, ...
        if isinstance(exc, OSError) and not path.exists():
            raise CheckpointError(f"{path}: no such {what}") from None
        raise CheckpointError(f"{path}: not a readable safetensors {what} ({first_line(exc)}); it is damaged or "
                              "not a weights file: use another checkpoint, or write it again") from None


def read_config_yaml(path: Path) -> dict[str, Any]:
    """A checkpoint's config.yaml as plain data (yaml.safe_load: a tag like !!python/object is a
    named error naming the file, never constructed)."""
    from moedit.configtools import load_yaml

    return load_yaml(path)


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object holding the config")
    return data


# --- writing -------------------------------------------------------------------------------------


class _RecordingWriter:
    """A file object for torch.save that keeps the OSError of a failed write: torch reports a full
    disk only as RuntimeError('unexpected pos ...'), without the errno."""

    def __init__(self, fh):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: Any, path: Path) -> None:
    """torch.save that raises the OSError (e.g. ENOSPC) of a failed write."""
    with open(path, "wb") as fh:
        sink = _RecordingWriter(fh)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


class CheckpointWriter:
    """Writes checkpoints collectively: every rank adds its own file, rank 0 commits."""

    def __init__(self, ckpt_root: Path, engine, keep_last: int, keep_every: int):
        self.root = ckpt_root
        self.engine = engine
        self.keep_last = keep_last
        self.keep_every = keep_every

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        ema: torch.nn.Module,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        config_text: str,
        name: str | None = None,
        engine_state: Callable[[Path], tuple[dict[str, Any], list[str]]] | None = None,
    ) -> Path:
        """Write one checkpoint; collective. `engine_state(directory)` runs on every rank inside the
        checkpoint being written and returns (entries added to state.pt, files it wrote there).

        A full disk (or another OSError) raises `DiskFullError` (`CheckpointError`) naming the file and
        what to do; the partial directory is removed and earlier checkpoints stay as they were."""
        name = name or step_dir_name(step)
        final = self.root / name
        # One temp name per save, never shared with another writer: rank 0's pid and a random part.
        token = self.engine.broadcast_object(f"{os.getpid()}.{secrets.token_hex(4)}")
        tmp = self.root / f"{TMP_PREFIX}{name}.{token}"
        current = tmp
        try:
            if self.engine.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
            self.engine.barrier()
            current = tmp / f"rank_{self.engine.rank:05d}.pt"
            torch_save(rank_state, current)
            current = tmp
            engine_entries, engine_files = engine_state(tmp) if engine_state is not None else ({}, [])
            self.engine.barrier()
            if self.engine.is_main:
                current = tmp / "model.safetensors"
                save_file(state_dict_for_save(model), str(current))
                current = tmp / "ema.safetensors"
                save_file(state_dict_for_save(ema), str(current))
                current = tmp / "state.pt"
                torch_save({**trainer_state, **engine_entries}, current)
                current = tmp / "config.yaml"
                current.write_text(config_text)
                meta = {"step": step, "world_size": self.engine.world_size, "engine": self.engine.name,
                        "engine_files": engine_files, "complete": True, "checksum": CHECKSUM,
                        "files": checksum_files(tmp)}
                current = tmp / "meta.json"
                current.write_text(json.dumps(meta))
                _fsync_tree(tmp)
                current = final
                self._commit(tmp, final, name, token)  # a checkpoint is visible only when whole
                if STEP_DIR.match(name):
                    current = self.root / "latest"
                    _atomic_write_text(current, name + "\n")
                    self._prune()
        except Exception as exc:
            if not isinstance(exc, (OSError, DiskFullError)) and not is_disk_full(exc):
                raise
            if self.engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(exc, current, name) from None
        self.engine.barrier()
        return final

    def _write_error(self, exc: Exception, path: Path, name: str) -> CheckpointError:
        previous = [p for _, p in list_checkpoints(self.root) if p.name != name]
        kept = (f"; the previous checkpoint {previous[-1]} is intact" if previous
                else "; no earlier checkpoint exists")
        if isinstance(exc, DiskFullError) or is_disk_full(exc):
            return _CheckpointDiskFull(disk_full_message(path, "checkpoint", where=self.root)
                                       + f"; the partial checkpoint was removed{kept}")
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        return CheckpointError(f"cannot write checkpoint file {path} ({detail}); the partial checkpoint was removed"
                               f"{kept}. Check that the run directory is writable, or set train.run_dir elsewhere")

    def _commit(self, tmp: Path, final: Path, name: str, token: str) -> None:
        if not final.exists():
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the replaced checkpoint
        else:
            # No atomic exchange here: move the old one aside first. `latest` must not name it meanwhile.
            latest = self.root / "latest"
            named = latest.is_file() and latest.read_text().strip() == name
            if named:
                others = [p for _, p in list_checkpoints(self.root) if p.name != name]
                if others:
                    _atomic_write_text(latest, others[-1].name + "\n")
                else:
                    latest.unlink()
            trash = self.root / f"{TRASH_PREFIX}{name}.{token}"
            os.rename(final, trash)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(trash, final)  # put the old one back before reporting the error
                if named:
                    _atomic_write_text(latest, name + "\n")
                raise
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_directory(self.root)

    def _prune(self) -> None:
        found = list_checkpoints(self.root)
        keep = {p for _, p in found[-self.keep_last :]}
        if self.keep_every:
            keep |= {p for s, p in found if s % self.keep_every == 0}
        for _, path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        # Leftovers of a crash mid-write or mid-swap. The run directory's lock (moedit.train.rundir)
        # makes this writer the only one, so none of them is in progress.
        for stale in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(f"{TRASH_PREFIX}*")]:
            shutil.rmtree(stale, ignore_errors=True)


class _CheckpointDiskFull(DiskFullError, CheckpointError):
    """A full disk while writing a checkpoint."""


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            _fsync_directory(f)
    _fsync_directory(path)


_fsync_dir = _fsync_tree  # the old name


def load_checkpoint(ckpt: Path, rank: int) -> dict[str, Any]:
    """Everything needed to resume, loaded without unpickling arbitrary objects. A damaged file or a
    refused object is a `CheckpointError` naming the file."""
    if not is_complete(ckpt):
        raise MoeditError(f"{ckpt}: not a complete checkpoint (meta.json or a file is missing)")
    meta = json.loads((ckpt / "meta.json").read_text())
    rank_file = ckpt / f"rank_{rank:05d}.pt"
    return {
        "meta": meta,
        "model": read_safetensors(ckpt / "model.safetensors", "checkpoint file"),
        "ema": read_safetensors(ckpt / "ema.safetensors", "checkpoint file"),
        "state": safe_torch_load(ckpt / "state.pt"),
        "rank": safe_torch_load(rank_file) if rank_file.is_file() else None,
    }


# --- inference and export ---------------------------------------------------------------------


def export_safetensors(ckpt: Path, out: Path, use_ema: bool = True) -> Path:
    """Weights (EMA by default) as one safetensors file with the resolved config beside it as JSON;
    training-only modules (the REPA projector) are left out of both."""
    from moedit.train.config import config_to_dict

    weights, cfg = load_weights(ckpt, use_ema)
    config = config_to_dict(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"moedit_config": json.dumps(config), "weights": "ema" if use_ema else "raw"})
    out.with_suffix(".json").write_text(json.dumps(config, indent=2))
    return out


def _find_weights(path: Path) -> tuple[Path, dict]:
    """(weights file's checkpoint or file, config dict) for a run dir, checkpoint dir or exported file.
    A run directory gives its newest checkpoint whose files have their recorded sizes."""
    if path.is_file() and path.suffix == ".safetensors":
        cfg_json = path.with_suffix(".json")
        if not cfg_json.is_file():
            raise MoeditError(f"{path}: exported weights need their config {cfg_json.name} beside them")
        return path, read_config_json(cfg_json)
    if path.is_dir() and (path / "meta.json").is_file():
        if not is_complete(path):
            raise MoeditError(f"{path}: incomplete checkpoint")
        return path, read_config_yaml(path / "config.yaml")
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = list_checkpoints(path / "checkpoints")
        if not found:
            raise MoeditError(f"{path}: run directory without a complete checkpoint")
        for _, ckpt in reversed(found):
            problem = verify_checkpoint(ckpt, checksums=False)
            if problem is None:
                if ckpt != found[-1][1]:
                    _warn(f"using {ckpt}: the newer checkpoints of {path} are damaged")
                return ckpt, read_config_yaml(ckpt / "config.yaml")
            _warn(f"checkpoint {ckpt} is damaged ({problem}); skipped")
        raise CheckpointError(f"{path}: every checkpoint of this run is damaged")
    raise MoeditError(f"{path}: not a run directory, checkpoint directory or exported .safetensors file")


def load_weights(path: str | Path, use_ema: bool = True,
                 training_only: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, resolved Config) of the inference model from a run directory, checkpoint directory
    or exported file: training-only weights (the REPA projector) stripped and `cfg.model` without
    them (`moedit.models.repa.strip_training_only`); damaged or foreign files are named errors.
    `training_only=True` keeps them as the checkpoint's canonical files hold them (the routing
    probe's REPA similarity; an exported file has none)."""
    from moedit.models.repa import strip_training_only
    from moedit.train.config import config_from_dict

    location, cfg_dict = _find_weights(Path(path))
    cfg = config_from_dict(cfg_dict)
    if location.is_file():
        weights = read_safetensors(location)
    else:
        weights = read_safetensors(location / ("ema.safetensors" if use_ema else "model.safetensors"), "checkpoint file")
    if not training_only:
        weights, cfg.model = strip_training_only(weights, cfg.model)
    return weights, cfg


def load_for_inference(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                       training_only: bool = False):
    """(model in eval mode, resolved Config) from a run dir, checkpoint dir or exported file;
    `training_only` as in load_weights."""
    from moedit.models import build_model

    weights, cfg = load_weights(path, use_ema, training_only)
    model = build_model(cfg.model)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes "
                              f"({first_line(exc)})") from None
    model.set_time_convention(cfg.diffusion.objective, cfg.diffusion.num_timesteps)
    return model.to(device).eval(), cfg
