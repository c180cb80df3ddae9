"""Reading foreign checkpoints without running their code.

Official training scripts save `{"model", "ema", "opt", "args"}` where `args` is a pickled
`argparse.Namespace`; facebookresearch/DiT releases a plain state dict. Both load through
`torch.load(weights_only=True)`, which rebuilds only tensors, plain containers and the config
types allowlisted in `SAFE_CONFIG_TYPES`. Any other object in the pickle (which could run code
when unpickled) is refused unless the caller passes `trust_pickle=True`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from moedit.errors import MoeditError
from moedit.fileio import first_line, refused_global

SAFE_CONFIG_TYPES: list[type] = [argparse.Namespace]
"""Benign config objects the official training scripts pickle next to the weights."""

WEIGHT_CHOICES = ("both", "ema", "raw")


def _refusal_detail(exc: Exception) -> str:
    """What torch refused: the pickled global it names, else its first line."""
    refused = refused_global(exc)
    return f"it holds {refused}" if refused else first_line(exc)


def load_torch_file(path: Path, trust_pickle: bool = False) -> Any:
    """Unpickle a .pt/.pth/.bin file safely: tensors, containers and SAFE_CONFIG_TYPES only."""
    try:
        with torch.serialization.safe_globals(SAFE_CONFIG_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise MoeditError(
                f"{path}: refused to unpickle an object that is not a tensor, plain container or allowlisted "
                f"config type ({_refusal_detail(exc)}). Unpickling can run arbitrary code: if you trust where "
                "this file comes from, pass --trust-pickle") from None
        warnings.warn(f"{path}: loading with full unpickling (--trust-pickle); this runs any code the file holds",
                      stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dicts(path: str | Path, trust_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{"raw": state, "ema": state} (either may be absent) from a .pt/.pth/.bin/.safetensors file.

    A file holding one flat state dict is returned as {"weights": state}.
    """
    return read_checkpoint(path, trust_pickle)[0]


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], Any]:
    """(the state dicts as `read_state_dicts` returns them, the training `args` saved beside them or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"weights": load_file(str(path))}, None
    obj = load_torch_file(path, trust_pickle)
    if not isinstance(obj, dict):
        raise MoeditError(f"{path}: holds a {type(obj).__name__}, expected a state dict or a dict with 'model'/'ema'")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"weights": dict(obj)}, None
    found = {name: obj[key] for key, name in (("model", "raw"), ("ema", "ema")) if isinstance(obj.get(key), dict)}
    if not found:
        keys = ", ".join(map(str, list(obj)[:10]))
        raise MoeditError(f"{path}: neither a flat state dict nor a training checkpoint with 'model'/'ema' "
                          f"(top-level keys: {keys})")
    for name, state in found.items():
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise MoeditError(f"{path}: '{name}' entries that are not tensors: {', '.join(bad[:5])}")
    return found, obj.get("args")


def select_weights(states: dict[str, dict], choice: str, where: str) -> tuple[dict, dict, str]:
    """(raw, ema, description) for `--weights both|ema|raw`.

    both: the training checkpoint's raw weights go to model.safetensors and its EMA weights to
    ema.safetensors; a flat state dict fills both. ema / raw: that one set fills both files.
    """
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"--weights {choice}: use one of {', '.join(WEIGHT_CHOICES)}")
    if "weights" in states:
        return states["weights"], states["weights"], "the file's only state dict (model and ema identical)"
    key = {"both": None, "ema": "ema", "raw": "raw"}[choice]
    if key is not None:
        if key not in states:
            raise MoeditError(f"{where}: --weights {choice}, but the checkpoint has no '{'model' if key == 'raw' else 'ema'}' "
                              f"entry (it has: {', '.join(sorted(states))})")
        return states[key], states[key], f"'{'model' if key == 'raw' else 'ema'}' in both files"
    raw = states.get("raw", states.get("ema"))
    ema = states.get("ema", states.get("raw"))
    return raw, ema, "raw -> model.safetensors, EMA -> ema.safetensors" if len(states) == 2 else "the only state dict"


def read_diffusers_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, weights) of a diffusers model directory."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers model directory (no config.json)")
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise MoeditError(f"{path}: expected one .safetensors weights file, found {len(files)} "
                          "(sharded or .bin diffusers checkpoints are not supported)")
    return json.loads(config_file.read_text()), load_file(str(files[0]))
