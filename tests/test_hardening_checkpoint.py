"""Issue 27, items 3, 4, 5, 8, 9: one job per run directory (the lock), verified resume with
fallback, atomic checkpoint swaps with unique temp names, a full disk as a named error, and no
code run from hostile pickles or YAML.

Most tests drive moedit.train.checkpoint / rundir / logging directly; the CLI tests run
`moedit train|sample|export|upcycle` in a subprocess. Tests marked `needs_lock_wiring` need the
trainer to take the run-directory lock (Trainer.setup: `RunDirLock.acquire`); they are skipped
until moedit/train/trainer.py does.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moedit.engines.base import DistEnv
from moedit.engines.local import LocalEngine
from moedit.errors import MoeditError
from moedit.train import checkpoint as ckpt_mod
from moedit.train import rundir as rundir_mod
from moedit.train.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    verify_checkpoint,
)
from moedit.fileio import DiskFullError
from moedit.train.rundir import RunDirBusy, RunDirLock

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


def _trainer_takes_lock() -> bool:
    try:
        import moedit.train.trainer as trainer

        return "RunDirLock" in inspect.getsource(trainer)
    except Exception:
        return False


needs_lock_wiring = pytest.mark.skipif(
    not _trainer_takes_lock(),
    reason="needs trainer wiring (issue 27 item 3): Trainer.setup must take RunDirLock.acquire(run_dir) on rank 0",
)


# --- helpers -----------------------------------------------------------------------------------


def engine() -> LocalEngine:
    return LocalEngine(DistEnv(), torch.device("cpu"))


def writer(root: Path, keep_last: int = 5) -> CheckpointWriter:
    return CheckpointWriter(root, engine(), keep_last=keep_last, keep_every=0)


def save(w: CheckpointWriter, step: int, value: float = 0.0, name: str | None = None) -> Path:
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, value + step)
    return w.save(step, model, model, {"step": step, "skipped_steps": 0}, {"data": {"epoch": 0, "pos": step}},
                  "model: {flavor: x}\n", name=name)


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `path`: (contents, mtime_ns)."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def moedit(*args, cwd=None, env=None, timeout=600):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "moedit.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def one_error_line(proc, command: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"moedit {command}: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def tiny_config(tmp_path: Path, digits_dir: Path, **train) -> Path:
    cfg = {
        "model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 2,
                  "num_classes": 10, "learn_sigma": False},
        "diffusion": {"objective": "flow", "sample_steps": 2},
        "data": {"path": str(digits_dir), "num_workers": 0, "shuffle_buffer": 64},
        "train": {"steps": 8, "global_batch_size": 8, "num_sample_images": 0, "sample_every": 0,
                  "run_dir": str(tmp_path / "run"), **train},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
        "checkpoint": {"every": 4, "keep_last": 3},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hostile_pickle(path: Path, marker: Path) -> None:
    """A torch file that would create `marker` if it were unpickled without weights_only."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 4, "skipped_steps": 0, "payload": Payload()}, path)


def strip_checksums(ckpt: Path) -> None:
    """Make `ckpt` look like a checkpoint written before meta.json recorded files."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.pop("files", None)
    meta.pop("checksum", None)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def rehash(ckpt: Path) -> None:
    """Update meta.json's records as someone who also rewrote meta.json would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = ckpt_mod.checksum_files(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))


# --- item 3: one training job per run directory ----------------------------------------------------


def test_second_lock_on_a_run_dir_is_a_named_error_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = tmp_path / "run"
    first = RunDirLock.acquire(run)
    holder = json.loads((run / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["slurm_job_id"] == "4242"
    monkeypatch.setenv("SLURM_JOB_ID", "5555")  # another job
    with pytest.raises(RunDirBusy) as info:
        RunDirLock.acquire(run)
    message = str(info.value)
    assert str(run) in message and f"pid {os.getpid()}" in message and "SLURM job 4242" in message
    assert socket.gethostname() in message and "train.run_dir" in message
    first.release()
    RunDirLock.acquire(run).release()  # free again after release


def test_lock_of_a_killed_job_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from moedit.train.rundir import RunDirLock; "
         f"lock = RunDirLock.acquire({str(run)!r}); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            RunDirLock.acquire(run)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    lock = RunDirLock.acquire(run)  # a restarted job takes the lock over
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_requeued_slurm_job_waits_for_its_own_earlier_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    env = {**os.environ, "SLURM_JOB_ID": "777"}
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from moedit.train.rundir import RunDirLock; "
         f"lock = RunDirLock.acquire({str(run)!r}); print('locked', flush=True); time.sleep(2); lock.release(); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        monkeypatch.setenv("MOEDIT_RUN_LOCK_WAIT_S", "30")
        start = time.monotonic()
        lock = RunDirLock.acquire(run)
        assert time.monotonic() - start < 30
        lock.release()
    finally:
        holder.kill()
        holder.wait()


@needs_lock_wiring
def test_second_moedit_train_on_a_locked_run_dir_fails_and_changes_no_file(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, steps=4)
    run = tmp_path / "run"
    first = moedit("train", cfg)
    assert first.returncode == 0, first.stderr
    # The first job is still running (its lock held here); a second start must not touch anything.
    lock = RunDirLock.acquire(run)
    before = tree(run)
    proc = moedit("train", cfg, "train.steps=8")
    line = one_error_line(proc, "train")
    assert "is in use by another training job" in line and f"pid {os.getpid()}" in line
    assert tree(run) == before
    lock.release()


# --- item 4: checksums and fallback on resume --------------------------------------------------------


def test_meta_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    ckpt = save(writer(tmp_path / "ckpts"), 4)
    meta = json.loads((ckpt / "meta.json").read_text())
    names = {p.name for p in ckpt.iterdir()} - {"meta.json"}
    assert set(meta["files"]) == names == {"model.safetensors", "ema.safetensors", "state.pt", "rank_00000.pt",
                                           "config.yaml"}
    for name, record in meta["files"].items():
        data = (ckpt / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(ckpt) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, capsys, damage):
    run = tmp_path / "run"
    w = writer(run / "checkpoints")
    save(w, 4)
    newest = save(w, 8)
    target = newest / ("model.safetensors" if damage == "truncate" else "state.pt")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        (newest / "rank_00000.pt").unlink()
    capsys.readouterr()
    chosen = resolve_resume("auto", run)
    assert chosen == run / "checkpoints" / "step_0000004"
    err = capsys.readouterr().err
    if damage == "delete":  # an incomplete checkpoint is not a candidate at all (as before)
        return
    assert "step_0000008" in err and "damaged" in err and target.name in err
    assert ("bytes" in err) if damage == "truncate" else ("sha256" in err)
    blob = load_checkpoint(chosen, 0)
    assert blob["state"]["step"] == 4


def test_checkpoint_without_checksums_still_loads_and_truncation_is_still_found(tmp_path, capsys):
    run = tmp_path / "run"
    w = writer(run / "checkpoints")
    old, newer = save(w, 4), save(w, 8)
    for c in (old, newer):
        strip_checksums(c)
    assert resolve_resume("auto", run) == newer
    assert load_checkpoint(newer, 0)["state"]["step"] == 8
    data = (newer / "state.pt").read_bytes()
    (newer / "state.pt").write_bytes(data[:-100])
    assert resolve_resume("auto", run) == old
    assert "step_0000008" in capsys.readouterr().err


def test_every_checkpoint_damaged_and_a_damaged_explicit_resume_are_named_errors(tmp_path):
    run = tmp_path / "run"
    only = save(writer(run / "checkpoints"), 4)
    (only / "ema.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged .*step_0000004: ema.safetensors"):
        resolve_resume("auto", run)
    with pytest.raises(CheckpointError, match="train.resume = .*damaged"):
        resolve_resume(str(only), run)


def test_truncated_newest_checkpoint_resumes_from_the_previous_through_the_cli(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    run = tmp_path / "run"
    assert moedit("train", cfg).returncode == 0
    model = run / "checkpoints" / "step_0000008" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    proc = moedit("train", cfg, "train.steps=10")
    assert proc.returncode == 0, proc.stderr
    assert "step_0000008" in proc.stderr and "damaged" in proc.stderr and "model.safetensors" in proc.stderr
    assert "resumed from" in proc.stdout and "step_0000004 at step 4" in proc.stdout
    # The re-written step 8 replaced the damaged one.
    assert verify_checkpoint(run / "checkpoints" / "step_0000008") is None


def test_resuming_a_run_of_another_model_is_a_named_error(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    assert moedit("train", cfg, "train.steps=2").returncode == 0
    proc = moedit("train", cfg, "train.steps=4", "model.hidden_size=64")  # same run directory
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "does not fit the model this config builds" in line and "step_0000002" in line, proc.stderr
    assert "train.resume=never" in line and "Traceback" not in proc.stderr


# --- item 5: atomic replacement, unique temp names -----------------------------------------------------


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def _latest_is_valid(root: Path) -> None:
    latest = (root / "latest").read_text().strip()
    assert (root / latest).is_dir() and verify_checkpoint(root / latest) is None, latest


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_checkpoint_never_leaves_it_missing(tmp_path, monkeypatch, exchange):
    root = tmp_path / "ckpts"
    w = writer(root)
    save(w, 4)
    save(w, 8, value=1.0)
    if not exchange:
        monkeypatch.setattr(ckpt_mod, "_exchange", lambda a, b: False)
    # A crash at every rename of the commit: the old step 8 or the new one is always findable,
    # and `latest` always names a complete checkpoint.
    real_rename = os.rename
    for crash_at in range(3):
        calls = []

        def rename(a, b, crash_at=crash_at):
            calls.append((a, b))
            if len(calls) > crash_at:
                raise Crash()
            return real_rename(a, b)

        monkeypatch.setattr(ckpt_mod.os, "rename", rename)
        try:
            save(w, 8, value=2.0)
        except Crash:
            pass
        monkeypatch.setattr(ckpt_mod.os, "rename", real_rename)
        _latest_is_valid(root)
        steps = [s for s, _ in list_checkpoints(root)]
        assert 4 in steps
        if exchange:  # with an atomic exchange step 8 exists at every moment
            assert 8 in steps
    # The next save completes, replaces step 8 and removes every leftover.
    final = save(w, 8, value=3.0)
    assert torch.equal(load_checkpoint(final, 0)["model"]["weight"], torch.full((3, 4), 11.0))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000008"]
    _latest_is_valid(root)


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    w = writer(root)
    old = save(w, 8, value=1.0)
    before = tree(old)
    monkeypatch.setattr(ckpt_mod, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".tmp_"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(a, b)

    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save(w, 8, value=2.0)
    assert tree(old) == before
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000008"]


def test_temp_directories_are_unique_and_leftovers_are_pruned(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    w = writer(root)
    real_save_file = ckpt_mod.save_file
    seen = []

    def crash(tensors, path, *a, **k):
        seen.append(Path(path).parent.name)
        raise Crash()

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    for _ in range(2):
        with pytest.raises(Crash):
            save(w, 4)
    # Two writers of one step never share a temp directory: pid and a random part.
    assert seen[0] != seen[1]
    for name in seen:
        assert name.startswith(f".tmp_step_0000004.{os.getpid()}.")
        assert (root / name / "rank_00000.pt").is_file()
    assert list_checkpoints(root) == [] and resolve_resume("auto", tmp_path) is None
    monkeypatch.setattr(ckpt_mod, "save_file", real_save_file)
    save(w, 4)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004"]


# --- item 8: a full disk --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["safetensors", "torch", "meta"])
def test_disk_full_while_checkpointing_is_named_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    root = tmp_path / "ckpts"
    w = writer(root)
    previous = save(w, 4)
    before = tree(root)
    if where == "safetensors":
        def fail(tensors, path, *a, **k):  # what safetensors raises on a full disk
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(ckpt_mod, "save_file", fail)
    elif where == "torch":
        real_open = open

        def tiny_disk(path, mode="r", *a, **k):  # the file system fills up after 100 bytes
            fh = real_open(path, mode, *a, **k)
            if "w" in mode and str(path).endswith(".pt"):
                class Full:
                    written = 0

                    def write(self, data):
                        self.written += len(data)
                        if self.written > 100:
                            raise OSError(errno.ENOSPC, "No space left on device")
                        return fh.write(data)

                    def __getattr__(self, name):
                        return getattr(fh, name)

                    def __enter__(self):
                        return self

                    def __exit__(self, *exc):
                        fh.close()

                return Full()
            return fh

        monkeypatch.setattr(ckpt_mod, "open", tiny_disk, raising=False)
    else:
        real_write_text = Path.write_text

        def full(self, text, *a, **k):
            if self.name == "meta.json":
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real_write_text(self, text, *a, **k)

        monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError) as info:
        save(w, 8)
    message = str(info.value)
    assert "no space left" in message and "step_0000008" in message and "train.run_dir" in message
    assert f"previous checkpoint {previous} is intact" in message
    assert tree(root) == before  # temp directory removed, nothing else touched
    assert verify_checkpoint(previous) is None and resolve_resume("auto", tmp_path / "x") is None


def test_disk_full_while_training_through_the_cli(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    run = tmp_path / "run"
    script = (
        "import errno, sys\n"
        "import moedit.train.checkpoint as c\n"
        "real = c.save_file\n"
        "def save_file(tensors, path, *a, **k):\n"
        "    if 'step_0000008' in str(path):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
        "    return real(tensors, path, *a, **k)\n"
        "c.save_file = save_file\n"
        "from moedit.cli import main\n"
        f"sys.exit(main(['train', {str(cfg)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    line = one_error_line(proc, "train")
    assert "no space left" in line and "step_0000008" in line and "free space" in line
    root = run / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert [p.name for _, p in list_checkpoints(root)] == ["step_0000004"]
    assert verify_checkpoint(root / "step_0000004") is None


def test_disk_full_while_logging_metrics_or_the_config(tmp_path, monkeypatch, digits_dir):
    from moedit.train.config import dump_config, load_config
    from moedit.train.logging import RunLogger

    run = tmp_path / "run"
    run.mkdir()
    logger = RunLogger(run, total_steps=10, start_step=0, tensorboard=False, progress="none")
    logger.log_metrics(1, {"loss": 1.0})
    metrics_before = (run / "metrics.jsonl").read_bytes()
    cfg = load_config(tiny_config(tmp_path, digits_dir))
    dump_config(cfg, run / "config.yaml")
    config_before = (run / "config.yaml").read_bytes()
    real_write = os.write

    def write(fd, data):  # writes half, then finds the disk full
        if len(data) > 8:
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir_mod.os, "write", write)
    with pytest.raises(DiskFullError, match=r"no space left .* metrics .*metrics\.jsonl.*train\.run_dir"):
        logger.log_metrics(2, {"loss": 0.5})
    with pytest.raises(DiskFullError, match=r"no space left .*config\.yaml"):
        dump_config(cfg, run / "config.yaml")
    monkeypatch.setattr(rundir_mod.os, "write", real_write)
    assert (run / "metrics.jsonl").read_bytes() == metrics_before  # no half line
    assert (run / "config.yaml").read_bytes() == config_before
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_half_written_metrics_line_does_not_break_resume(tmp_path):
    from moedit.train.logging import RunLogger

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    RunLogger(run, total_steps=10, start_step=2, tensorboard=False, progress="none").close()
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'


# --- item 9: hostile pickles and YAML, corrupt weights ----------------------------------------------------


@pytest.mark.parametrize("target", ["state.pt", "rank_00000.pt"])
@pytest.mark.parametrize("meta", ["no checksums", "checksums rewritten"])
def test_hostile_pickle_in_a_checkpoint_is_refused_by_name(tmp_path, target, meta):
    run = tmp_path / "run"
    ckpt = save(writer(run / "checkpoints"), 4)
    marker = tmp_path / "MARKER"
    hostile_pickle(ckpt / target, marker)
    strip_checksums(ckpt) if meta == "no checksums" else rehash(ckpt)
    assert resolve_resume("auto", run) == ckpt  # a whole file: nothing to fall back over
    with pytest.raises(CheckpointError, match=rf"{target}: refused to unpickle: it holds (posix|os)\.system"):
        load_checkpoint(ckpt, 0)
    assert not marker.exists()


def test_hostile_pickle_that_breaks_the_recorded_checksum_is_skipped_unread(tmp_path, capsys):
    run = tmp_path / "run"
    w = writer(run / "checkpoints")
    save(w, 4)
    newest = save(w, 8)
    marker = tmp_path / "MARKER"
    hostile_pickle(newest / "state.pt", marker)
    assert resolve_resume("auto", run).name == "step_0000004"
    assert "state.pt" in capsys.readouterr().err
    assert not marker.exists()


def test_hostile_state_pt_on_resume_through_the_cli(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, steps=4)
    run = tmp_path / "run"
    assert moedit("train", cfg).returncode == 0
    ckpt = run / "checkpoints" / "step_0000004"
    marker = tmp_path / "MARKER"
    hostile_pickle(ckpt / "state.pt", marker)
    rehash(ckpt)
    line = one_error_line(moedit("train", cfg, "train.steps=8"), "train")
    assert "state.pt: refused to unpickle" in line
    assert not marker.exists()


def test_hostile_yaml_override_and_config_file(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    marker = tmp_path / "MARKER"
    tag = HOSTILE_TAG.format(marker=marker)
    line = one_error_line(moedit("train", cfg, f"train.run_dir={tag}", cwd=tmp_path), "train")
    assert "override 'train.run_dir=" in line and "python/object/apply" in line
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(cfg.read_text() + f"extra: {tag}\n")
    line = one_error_line(moedit("train", hostile, cwd=tmp_path), "train")
    assert str(hostile) in line
    assert not marker.exists()


@pytest.fixture
def inference_checkpoint(tmp_path, digits_dir):
    """A real (untrained) tiny-diffmoe checkpoint that `moedit sample` / `export` read."""
    from moedit.models import build_model
    from moedit.train.config import config_to_dict, load_config

    cfg = load_config(tiny_config(tmp_path, digits_dir))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    w = CheckpointWriter(tmp_path / "run" / "checkpoints", engine(), keep_last=3, keep_every=0)
    return w.save(4, model, model, {"step": 4}, {"data": {}}, text)


@pytest.mark.parametrize("command", ["sample", "export", "upcycle"])
def test_hostile_yaml_in_a_checkpoint_config_is_refused(tmp_path, inference_checkpoint, command):
    marker = tmp_path / "MARKER"
    config = inference_checkpoint / "config.yaml"
    config.write_text(config.read_text() + f"extra: {HOSTILE_TAG.format(marker=marker)}\n")
    out = tmp_path / "out"
    args = {"sample": ["sample", inference_checkpoint, "--out", out / "s.png", "--num-samples", "2", "--steps", "1"],
            "export": ["export", inference_checkpoint, "--format", "safetensors", "--out", out / "w.safetensors"],
            "upcycle": ["upcycle", inference_checkpoint, "--out", out / "u", "--flavor", "tiny-diffmoe"]}[command]
    line = one_error_line(moedit(*args, cwd=tmp_path), command)
    assert str(config) in line
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("command", ["sample", "export", "upcycle"])
def test_corrupt_or_foreign_weights_file_is_a_named_error(tmp_path, inference_checkpoint, command):
    exported = tmp_path / "w.safetensors"
    assert moedit("export", inference_checkpoint, "--format", "safetensors", "--out", exported).returncode == 0
    if command == "upcycle":  # a checkpoint directory whose EMA file is foreign
        target = inference_checkpoint / "ema.safetensors"
        target.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
        source = inference_checkpoint
    else:  # a truncated exported file
        exported.write_bytes(exported.read_bytes()[:500])
        source = target = exported
    out = tmp_path / "out"
    args = {"sample": ["sample", source, "--out", out / "s.png", "--num-samples", "2", "--steps", "1"],
            "export": ["export", source, "--format", "official", "--layout", "diffmoe", "--out", out / "o.pt"],
            "upcycle": ["upcycle", source, "--out", out / "u", "--flavor", "tiny-diffmoe"]}[command]
    line = one_error_line(moedit(*args, cwd=tmp_path), command)
    assert str(target) in line and "not a readable safetensors" in line
    assert not out.exists()


def test_is_disk_full_recognises_what_libraries_raise():
    from moedit.fileio import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "x"))
    assert is_disk_full(OSError(errno.EDQUOT, "x"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("unexpected pos 640 vs 534"))
    with pytest.raises(MoeditError):  # every rundir error is a user error for the CLI
        raise DiskFullError("x")


def test_several_ranks_resume_from_rank_0s_choice(tmp_path, capsys, monkeypatch):
    """With the engine passed, rank 0 verifies and broadcasts; the other ranks neither hash nor warn
    and take rank 0's checkpoint (or its error) even where their own view differs."""
    run = tmp_path / "run"
    w = writer(run / "checkpoints")
    save(w, 4)
    newest = save(w, 8)

    class Rank(LocalEngine):
        def __init__(self, rank, from_rank_0=None):
            super().__init__(DistEnv(rank=rank, world_size=2), torch.device("cpu"))
            self.from_rank_0 = from_rank_0
            self.sent = None

        def broadcast_object(self, obj):
            self.sent = obj
            return obj if self.rank == 0 else self.from_rank_0

    (newest / "state.pt").write_bytes(b"damaged")
    rank0 = Rank(0)
    assert resolve_resume("auto", run, engine=rank0).name == "step_0000004"
    assert "step_0000008" in capsys.readouterr().err
    rank1 = Rank(1, from_rank_0=rank0.sent)
    monkeypatch.setattr(ckpt_mod, "verify_checkpoint", lambda *a, **k: pytest.fail("rank 1 verified"))
    assert resolve_resume("auto", run, engine=rank1).name == "step_0000004"
    assert capsys.readouterr().err == ""
    with pytest.raises(CheckpointError, match="every checkpoint"):
        resolve_resume("auto", run, engine=Rank(1, from_rank_0=("error", "every checkpoint in x is damaged")))


def test_release_unlocks_even_while_a_forked_child_holds_the_descriptor(tmp_path):
    run = tmp_path / "run"
    lock = RunDirLock.acquire(run)
    pid = os.fork()
    if pid == 0:  # a data-loader worker: inherits the open lock file, outlives the release
        time.sleep(5)
        os._exit(0)
    try:
        lock.release()
        RunDirLock.acquire(run).release()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
