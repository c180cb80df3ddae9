"""Checkpoints: atomic writes, retention, auto-resume, safe loading and export.

Layout of one checkpoint (a directory, renamed into place only when complete):

    checkpoints/step_0001000/
        model.safetensors   raw weights and buffers
        ema.safetensors     EMA weights and buffers
        state.pt            optimizer, LR schedule, step, counters (plain containers only)
        rank_00000.pt       per-rank data-loader and RNG state
        config.yaml         the resolved config
        deepspeed/          DeepSpeed's own checkpoint (engine deepspeed only: sharded optimizer states)
        meta.json           {"step", "world_size", "engine", "engine_files", "complete": true}; written last
    checkpoints/latest      name of the newest complete checkpoint

model.safetensors and ema.safetensors are the canonical single-device weights whatever the
engine, so `load_for_inference`, `export_safetensors` and `moedit sample` read every checkpoint.

Nothing of moedit's is ever unpickled: tensors come from safetensors, the rest through
`torch.load(weights_only=True)`. (DeepSpeed reads its own `deepspeed/` files itself.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from moedit.errors import MoeditError

STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def is_complete(ckpt: Path) -> bool:
    meta = ckpt / "meta.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    needed = ["model.safetensors", "ema.safetensors", "state.pt"]
    needed += [f"rank_{r:05d}.pt" for r in range(int(info.get("world_size", 1)))]
    needed += list(info.get("engine_files", []))
    return bool(info.get("complete")) and all((ckpt / n).exists() for n in needed)


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `ckpt_root`, oldest first. Incomplete ones are ignored."""
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
        checkpoint being written and returns (entries added to state.pt, files it wrote there)."""
        name = name or step_dir_name(step)
        final = self.root / name
        tmp = self.root / f".tmp_{name}"
        if self.engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.engine.barrier()
        torch.save(rank_state, tmp / f"rank_{self.engine.rank:05d}.pt")
        engine_entries, engine_files = engine_state(tmp) if engine_state is not None else ({}, [])
        self.engine.barrier()
        if self.engine.is_main:
            save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
            save_file(state_dict_for_save(ema), str(tmp / "ema.safetensors"))
            torch.save({**trainer_state, **engine_entries}, tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_text)
            meta = {"step": step, "world_size": self.engine.world_size, "engine": self.engine.name,
                    "engine_files": engine_files, "complete": True}
            (tmp / "meta.json").write_text(json.dumps(meta))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit point: a checkpoint is visible only when whole
            if STEP_DIR.match(name):
                _atomic_write_text(self.root / "latest", name + "\n")
                self._prune()
        self.engine.barrier()
        return final

    def _prune(self) -> None:
        found = list_checkpoints(self.root)
        keep = {p for _, p in found[-self.keep_last :]}
        if self.keep_every:
            keep |= {p for s, p in found if s % self.keep_every == 0}
        for _, path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp_*"):  # leftovers of a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def load_checkpoint(ckpt: Path, rank: int) -> dict[str, Any]:
    """Everything needed to resume, loaded without unpickling arbitrary objects."""
    if not is_complete(ckpt):
        raise MoeditError(f"{ckpt}: not a complete checkpoint (meta.json or a file is missing)")
    meta = json.loads((ckpt / "meta.json").read_text())
    rank_file = ckpt / f"rank_{rank:05d}.pt"
    return {
        "meta": meta,
        "model": load_file(str(ckpt / "model.safetensors")),
        "ema": load_file(str(ckpt / "ema.safetensors")),
        "state": torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True),
        "rank": torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else None,
    }


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `train.resume` points at, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if not path.is_dir() or not is_complete(path):
        raise MoeditError(f"train.resume = {resume}: not a complete checkpoint directory")
    return path


# --- inference and export ---------------------------------------------------------------------


def export_safetensors(ckpt: Path, out: Path, use_ema: bool = True) -> Path:
    """Weights (EMA by default) as one safetensors file with the resolved config beside it as JSON."""
    import yaml

    weights = load_file(str(ckpt / ("ema.safetensors" if use_ema else "model.safetensors")))
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"moedit_config": json.dumps(config), "weights": "ema" if use_ema else "raw"})
    out.with_suffix(".json").write_text(json.dumps(config, indent=2))
    return out


def _find_weights(path: Path) -> tuple[Path, dict]:
    """(weights file's checkpoint or file, config dict) for a run dir, checkpoint dir or exported file."""
    import yaml

    if path.is_file() and path.suffix == ".safetensors":
        cfg_json = path.with_suffix(".json")
        if not cfg_json.is_file():
            raise MoeditError(f"{path}: exported weights need their config {cfg_json.name} beside them")
        return path, json.loads(cfg_json.read_text())
    if path.is_dir() and (path / "meta.json").is_file():
        if not is_complete(path):
            raise MoeditError(f"{path}: incomplete checkpoint")
        return path, yaml.safe_load((path / "config.yaml").read_text())
    if path.is_dir() and (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise MoeditError(f"{path}: run directory without a complete checkpoint")
        return ckpt, yaml.safe_load((ckpt / "config.yaml").read_text())
    raise MoeditError(f"{path}: not a run directory, checkpoint directory or exported .safetensors file")


def load_for_inference(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, resolved Config) from a run dir, checkpoint dir or exported file."""
    from moedit.models import build_model
    from moedit.train.config import config_from_dict

    location, cfg_dict = _find_weights(Path(path))
    cfg = config_from_dict(cfg_dict)
    if location.is_file():
        weights = load_file(str(location))
    else:
        weights = load_file(str(location / ("ema.safetensors" if use_ema else "model.safetensors")))
    model = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    model.set_time_convention(cfg.diffusion.objective, cfg.diffusion.num_timesteps)
    return model.to(device).eval(), cfg
