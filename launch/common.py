"""Pieces shared by `moedit launch` and `moedit sweep`: overrides, run dirs, SLURM flags."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import types
from pathlib import Path

import yaml

from moedit.errors import MoeditError
from moedit.launch.slurm import SlurmOptions

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def split_override(text: str) -> tuple[str, str]:
    """'train.steps=10' -> ('train.steps', '10'), with a clear error for anything else."""
    key, sep, value = text.partition("=")
    if not sep or not _KEY_RE.match(key):
        raise MoeditError(f"override {text!r}: expected dotted.key=value, e.g. train.steps=1000")
    return key, value


def check_config(path: str) -> str:
    config = Path(path)
    if not config.is_file():
        raise MoeditError(f"config {path}: no such file")
    return str(config.resolve())


def validate_training_config(config: str, overrides: list[str]):
    """The config `moedit train CONFIG overrides...` would run, loaded and validated here, before
    any worker or job starts; a bad key or value is the same one-line error `moedit train` gives.

    The config sections are plain dataclasses, but their packages' __init__ import torch (seconds
    on a busy machine): unless torch is loaded already, the config modules are imported on their
    own (light_config_modules) and the result is only read, never passed to training code."""
    if "moedit.train.config" in sys.modules or "torch" in sys.modules:
        from moedit.train.config import load_config

        return load_config(config, list(overrides))
    with light_config_modules() as train_config:
        return train_config.load_config(config, list(overrides))


# Config modules (torch-free) by package; `moedit.models` also re-exports the flavor registry.
_LIGHT_MODULES = {
    "moedit.models": ("config", "flavors"),
    "moedit.diffusion": ("config",),
    "moedit.engines": ("config",),
    "moedit.data": ("config",),
}


@contextlib.contextmanager
def light_config_modules():
    """moedit.train.config, imported with stand-ins for the packages above that load only their
    config modules (never torch). Every moedit module imported here is removed from sys.modules
    again on exit, so later imports get the real packages."""
    import moedit

    before = set(sys.modules)
    stubs = []
    for name, submodules in _LIGHT_MODULES.items():
        if name in sys.modules:
            continue
        stub = types.ModuleType(name)
        stub.__path__ = [os.path.join(os.path.dirname(moedit.__file__), name.rsplit(".", 1)[1])]

        def lookup(attr, _name=name, _subs=submodules):
            for sub in _subs:
                module = importlib.import_module(f"{_name}.{sub}")
                if hasattr(module, attr):
                    return getattr(module, attr)
            raise AttributeError(f"module {_name!r} (config only) has no attribute {attr!r}")

        stub.__getattr__ = lookup
        sys.modules[name] = stub
        stubs.append(name)
    try:
        yield importlib.import_module("moedit.train.config")
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("moedit."):  # third-party modules (yaml, ...) stay: they are the same either way
                del sys.modules[name]
        for name in stubs:
            sys.modules.pop(name, None)
        for name in list(vars(moedit)):
            if f"moedit.{name}" not in sys.modules and isinstance(getattr(moedit, name), types.ModuleType):
                delattr(moedit, name)
        if "moedit.train" in sys.modules and "moedit.train.config" not in sys.modules:
            vars(sys.modules["moedit.train"]).pop("config", None)


def latest_checkpoint_meta(run_dir: str | Path) -> tuple[Path, dict] | None:
    """(checkpoint directory, meta.json) of the newest complete checkpoint of a run directory,
    read without torch (moedit.train.checkpoint decides the same way on resume)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    best = None
    for child in root.iterdir():
        match = re.fullmatch(r"step_(\d+)", child.name)
        if not match or not (child / "meta.json").is_file():
            continue
        try:
            meta = json.loads((child / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("complete") and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), child, meta)
    return None if best is None else (best[1], best[2])


def check_resume_world_size(cfg, world_size: int, flag: str, keep: str) -> None:
    """A run resumes only with the world size it was saved with (the data position is per rank):
    refuse before starting processes, and say what to pass instead. `keep` is the advice that keeps
    the saved size, with {saved} for the number."""
    resume = cfg.train.resume
    if resume == "never":
        return
    if resume == "auto":
        found = latest_checkpoint_meta(cfg.train.run_dir)
    else:
        meta_path = Path(resume) / "meta.json"
        try:
            found = (Path(resume), json.loads(meta_path.read_text())) if meta_path.is_file() else None
        except (OSError, ValueError):
            found = None
    if found is None:
        return
    ckpt, meta = found
    saved = int(meta.get("world_size", 1))
    if saved == world_size:
        return
    run_dir = str(cfg.train.run_dir).rstrip("/")
    raise MoeditError(
        f"train.run_dir = {run_dir} holds checkpoint {ckpt.name} of a {saved}-process run, and train.resume = "
        f"{resume} would resume it with {world_size} processes ({flag}); resuming needs the same number. "
        f"Pass {keep.format(saved=saved)} to continue that run, or start a new one with "
        f"train.run_dir={run_dir}-{world_size}proc (or train.resume=never to start over in {run_dir})")


def resolve_run_dir(config: str, overrides: list[str], explicit: str | None) -> str:
    """The run directory: --run-dir, else a train.run_dir override, else the config's value."""
    if explicit:
        return os.path.abspath(explicit)
    for text in reversed(overrides):
        key, value = split_override(text)
        if key == "train.run_dir":
            return os.path.abspath(value)
    with open(config) as f:
        data = yaml.safe_load(f) or {}
    train = data.get("train") if isinstance(data, dict) else None
    run_dir = train.get("run_dir") if isinstance(train, dict) else None
    if not run_dir:
        raise MoeditError(f"config {config}: no train.run_dir; pass --run-dir DIR or train.run_dir=DIR")
    return os.path.abspath(run_dir)


def training_args(overrides: list[str]) -> list[str]:
    """Overrides for one launched run: train.run_dir is set by the job script, resume is automatic
    (a requeued job must pick up its checkpoint) unless the user chose otherwise."""
    keys = [split_override(text)[0] for text in overrides]
    args = [text for text, key in zip(overrides, keys) if key != "train.run_dir"]
    if "train.resume" not in keys:
        args.append("train.resume=auto")
    return args


def job_name_for(run_dir: str) -> str:
    return "moedit-" + (re.sub(r"[^A-Za-z0-9._-]", "_", Path(run_dir).name) or "run")


# --------------------------------------------------------------------------- SLURM flags

# flag dest -> SlurmOptions field (same name); every default is None so that values from
# a sweep file can fill what the command line left out.
SLURM_FLAGS = ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_task", "partition", "account",
               "time", "qos", "constraint", "mem", "exclusive", "sbatch_args", "signal_seconds",
               "max_requeues", "job_name", "env")


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLURM resources")
    group.add_argument("--nodes", type=int, help="nodes per run (default 1)")
    group.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 0: CPU job)")
    group.add_argument("--nproc-per-node", type=int, help="training processes per node (default: GPUs, or 1)")
    group.add_argument("--cpus-per-task", type=int, help="CPUs of the one task per node")
    group.add_argument("--partition")
    group.add_argument("--account")
    group.add_argument("--time", help="time limit, e.g. 04:00:00 or 2-00:00:00")
    group.add_argument("--qos")
    group.add_argument("--constraint")
    group.add_argument("--mem", help="memory per node, e.g. 64G")
    group.add_argument("--exclusive", action="store_true", default=None)
    group.add_argument("--sbatch-arg", dest="sbatch_args", action="append", metavar="OPTION",
                       help="extra #SBATCH option, repeatable; write --sbatch-arg=--reservation=x")
    group.add_argument("--signal-seconds", type=int,
                       help="send SIGUSR1 this long before the time limit (default 120; 0 = off)")
    group.add_argument("--max-requeues", type=int, help="requeues after a signal checkpoint (default 10)")
    group.add_argument("--job-name")
    group.add_argument("--env", action="append", metavar="KEY=VALUE",
                       help="extra environment variable for the job, repeatable")


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoeditError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def slurm_options(args: argparse.Namespace, defaults: dict | None = None) -> SlurmOptions:
    """Command-line flags over `defaults` (a sweep file's `slurm:` section) over built-ins."""
    values = dict(defaults or {})
    unknown = sorted(set(values) - set(SLURM_FLAGS))
    if unknown:
        raise MoeditError(f"slurm.{unknown[0]}: unknown option (known: {', '.join(SLURM_FLAGS)})")
    for name in SLURM_FLAGS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = parse_env(given) if name == "env" else given
    if isinstance(values.get("sbatch_args"), str):  # a single option written without a list
        values["sbatch_args"] = [values["sbatch_args"]]
    if "env" in values and isinstance(values["env"], dict):
        values["env"] = {str(k): str(v) for k, v in values["env"].items()}
    try:
        return SlurmOptions(**values)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise MoeditError(f"slurm options: {exc}") from exc
