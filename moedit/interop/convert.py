"""`moedit convert`: a published checkpoint -> a moedit checkpoint directory.

The output is a checkpoint directory as the trainer writes it (model.safetensors,
ema.safetensors, state.pt, config.yaml, meta.json), so `moedit sample`, `load_for_inference`
and the routing analysis read it directly. It holds no optimizer or data-loader state: meta.json
records `world_size: 0` (no per-rank files) and `imported: true`.

Strict: the source must hold exactly the tensors the layout of the configured flavor has (names
and shapes, derived from moedit's model on the meta device), else one error lists every
missing, unexpected and mis-shaped tensor.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moedit.errors import MoeditError
from moedit.interop import layouts
from moedit.interop.source_config import check_architecture, sampling_defaults, saved_architecture
from moedit.interop.sources import read_checkpoint, read_diffusers_dir, select_weights
from moedit.models import ModelConfig, get_flavor
from moedit.models.flavors import describe
from moedit.models.convert import convert_official_state_dict

SOURCES = layouts.LAYOUTS + ("diffusers",)
DEFAULT_OBJECTIVE = {"dit": "ddpm", "diffmoe": "flow", "ditmoe": "ddpm", "diffusers": "ddpm"}
SHAPE_HINT = ("choose the --flavor the checkpoint was trained as, or override fields "
              "(e.g. model.input_size=64, model.learn_sigma=false, moe.num_experts=8)")


# ----- config ----------------------------------------------------------------------------------

def build_config(flavor: str | None, config_path: str | None, overrides: list[str], default_objective: str,
                 layout: str | None = None):
    """The full resolved Config of the converted model: a config file (optional) or the flavor,
    then dotted overrides. A flow model's output is velocity only, so learn_sigma defaults to false.
    Sampling fields not set take the `layout` authors' published defaults (`sampling_defaults`)."""
    from moedit.configtools import apply_overrides, load_yaml
    from moedit.train.config import config_from_dict

    data: dict[str, Any] = load_yaml(config_path) if config_path else {}
    data.setdefault("model", {})
    if flavor:
        data["model"]["flavor"] = flavor
    if not data["model"].get("flavor"):
        raise MoeditError("name the model: --flavor NAME (see `moedit models`) or --config FILE with model.flavor")
    apply_overrides(data, list(overrides))
    diffusion = data.setdefault("diffusion", {}) or {}
    data["diffusion"] = diffusion
    diffusion.setdefault("objective", default_objective)
    if diffusion["objective"] == "flow":
        data["model"].setdefault("learn_sigma", False)
    defaulted = []
    if layout is not None:
        for key, value in sampling_defaults(layout, diffusion["objective"])[0].items():
            if key not in diffusion:
                diffusion[key] = value
                defaulted.append(key)
    cfg = config_from_dict(data)
    if "guidance_channels" in defaulted and (cfg.diffusion.guidance_channels or 0) > cfg.model.in_channels:
        cfg.diffusion.guidance_channels = None  # DiT's 3 of 4 channels: all channels of a smaller latent
    return cfg


def match_flavor(model: ModelConfig) -> str | None:
    """The registry flavor whose fields all equal `model`'s (name aside), if any."""
    import dataclasses

    from moedit.models import FLAVORS

    for name, cfg in FLAVORS.items():
        if dataclasses.replace(cfg, name=model.name) == model:
            return name
    return None


# ----- transforms for rectified-flow sources ---------------------------------------------------

def drop_variance_channels(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Keep the first C of 2C output channels (in place). Official flow code trains 2C outputs and
    uses only the first C (`chunk(2, dim=1)`); output rows are ordered (p, q, c), c fastest."""
    C = cfg.in_channels
    for kind in ("weight", "bias"):
        value = state[f"final_layer.linear.{kind}"]  # (p*p*2C, ...) -> (p*p*C, ...)
        keep = (torch.arange(value.shape[0]) % (2 * C)) < C
        state[f"final_layer.linear.{kind}"] = value[keep].contiguous()


def reverse_flow_time(state: dict[str, torch.Tensor], frequency_size: int = 256, max_period: float = 10000.0) -> None:
    """Turn a model of DiT-MoE's flow convention (t = 0 data, predicts noise - data) into moedit's
    (t = 0 noise, predicts data - noise), in place and exactly up to float rounding.

    The timestep features are [cos(w t), sin(w t)]; those of 1 - t are a fixed linear map M of
    those of t (angle-difference identities), so folding M into the first timestep-MLP layer makes
    the model see 1 - t. Negating the output layer flips the velocity's sign.
    """
    half = frequency_size // 2
    # the same float32 frequencies as TimestepEmbedder.sinusoid, then float64 for the fold
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin = torch.diag(freqs.cos()), torch.diag(freqs.sin())
    M = torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)  # (256, 256): emb(1-t) = M emb(t)
    w = state["t_embedder.mlp.0.weight"]
    state["t_embedder.mlp.0.weight"] = (w.double() @ M).to(w.dtype)
    for kind in ("weight", "bias"):
        state[f"final_layer.linear.{kind}"] = -state[f"final_layer.linear.{kind}"]


# ----- mapping ---------------------------------------------------------------------------------

def official_to_moedit(state: dict[str, torch.Tensor], layout: str, cfg: ModelConfig, objective: str,
                       where: str) -> tuple[dict[str, torch.Tensor], float | None]:
    """Strictly check and map one official state dict; returns (moedit state, DiffMoE ema_decay or None)."""
    C, p = cfg.in_channels, cfg.patch_size
    source_cfg = cfg
    rows = state.get("final_layer.linear.weight", torch.empty(0)).shape[:1]
    if objective == "flow" and not cfg.learn_sigma and tuple(rows) == (p * p * 2 * C,):
        import dataclasses

        source_cfg = dataclasses.replace(cfg, learn_sigma=True)  # a 2C-output flow model: variance half unused
    layouts.check_layout({k: tuple(v.shape) for k, v in state.items()}, layouts.official_shapes(source_cfg, layout),
                         f"{where}: not the {layout} layout of {cfg.name}", SHAPE_HINT)
    decay = None
    state = dict(state)
    for key in [k for k in state if k.endswith(".mlp.ema_decay")]:
        decay = float(state.pop(key).reshape(-1)[0])
    out = convert_official_state_dict(state)
    if source_cfg is not cfg:
        drop_variance_channels(out, cfg)
    if layout == "ditmoe" and objective == "flow":
        reverse_flow_time(out)
    return out, decay


def diffusers_to_moedit(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in layouts.to_diffusers(layouts.meta_state(cfg), cfg).items()}
    layouts.check_layout({k: tuple(v.shape) for k, v in state.items()}, expected,
                         f"{where}: not a DiTTransformer2DModel of {cfg.name}")
    return layouts.from_diffusers(state, cfg)


def _canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 (moedit's parameter dtype), contiguous tensors with independent storage (safetensors
    refuses shared storage); copies only where needed, as XL-sized sources are gigabytes."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.float() if value.is_floating_point() else value
        storage = value.untyped_storage().data_ptr()
        if storage in seen or not value.is_contiguous() or value.storage_offset() or \
                value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.contiguous().clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


# ----- output ----------------------------------------------------------------------------------

def write_checkpoint(out: str | Path, cfg, model_state: dict, ema_state: dict, source: dict[str, Any]) -> Path:
    """A complete moedit checkpoint directory (written aside, renamed into place when whole)."""
    from safetensors.torch import save_file

    from moedit.train.config import dump_config

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeditError(f"--out {out}: exists and is not an empty directory; choose a new path")
    expected = {k: tuple(v.shape) for k, v in layouts.meta_state(cfg.model).items()}
    for name, state in (("model", model_state), ("ema", ema_state)):
        layouts.check_layout({k: tuple(v.shape) for k, v in state.items()}, expected,
                             f"internal: {name} weights do not fit {cfg.flavor}")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_canonical(model_state), str(tmp / "model.safetensors"))
    save_file(_canonical(ema_state), str(tmp / "ema.safetensors"))
    # No optimizer or data-loader state exists for imported weights (see docs/interop.md).
    torch.save({"optimizer": None, "step": 0, "skipped_steps": 0}, tmp / "state.pt")
    dump_config(cfg, tmp / "config.yaml")
    meta = {"step": 0, "world_size": 0, "complete": True, "imported": True, "source": source}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def convert_checkpoint(source: str | Path, layout: str, out: str | Path, *, flavor: str | None = None,
                       config: str | None = None, overrides: list[str] | None = None, weights: str = "both",
                       trust_pickle: bool = False) -> Path:
    """Convert an official (`dit`, `diffmoe`, `ditmoe`) or diffusers checkpoint into a moedit
    checkpoint directory `out`. Returns `out`."""
    import dataclasses

    from moedit.train.config import validate

    if layout not in SOURCES:
        raise ValueError(f"--from {layout}: use one of {', '.join(SOURCES)}")
    overrides = list(overrides or [])
    if layout == "diffusers":
        dconfig, state = read_diffusers_dir(source)
        if flavor is None and config is None:
            flavor = match_flavor(layouts.diffusers_model_config(dconfig, get_flavor("DiT-XL/2")))
            if flavor is None:
                raise MoeditError(f"{source}: no registry flavor has this DiT's shape; pass --flavor (any dense "
                                  "flavor: the diffusers config.json sets the fields)")
        states = {"weights": state}
        saved, saved_objective, checked = {}, None, "config.json (heads included)"
    else:
        states, args = read_checkpoint(source, trust_pickle)
        saved, saved_objective, checked = saved_architecture(args, source)
    raw, ema, picked = select_weights(states, weights, str(source))
    cfg = build_config(flavor, config, overrides, saved_objective or DEFAULT_OBJECTIVE[layout], layout)
    if layout == "diffusers":
        cfg.model = layouts.diffusers_model_config(dconfig, cfg.model)
        validate(cfg)
        layouts.check_diffusers_compatible(cfg.model)
    else:
        check_architecture(cfg.model, cfg.flavor, saved, checked, str(source))
        checked = f"agrees with {checked}" if saved else f"from the flavor ({checked}: not checked)"

    mapped, decays = {}, []
    for name, state in {"model": raw, "ema": ema}.items():
        if name == "ema" and ema is raw:
            mapped["ema"] = mapped["model"]
            continue
        where = f"{source} ({'model' if name == 'model' else 'ema'} weights)" if raw is not ema else str(source)
        if layout == "diffusers":
            mapped[name] = diffusers_to_moedit(state, cfg.model, where)
        else:
            mapped[name], decay = official_to_moedit(state, layout, cfg.model, cfg.diffusion.objective, where)
            decays.append(decay)
    if decays and decays[-1] is not None and abs(decays[-1] - cfg.model.moe.threshold_decay) > 1e-6:
        # DiffMoE's ema_decay buffer is the threshold EMA decay: keep the checkpoint's value
        cfg.model.moe = dataclasses.replace(cfg.model.moe, threshold_decay=round(decays[-1], 6))
    _, sampling_from = sampling_defaults(layout, cfg.diffusion.objective)
    info = {"tool": "moedit convert", "from": layout, "path": str(source), "weights": picked,
            "objective": cfg.diffusion.objective, "architecture": describe(cfg.model), "architecture_check": checked,
            "sampling_defaults_from": sampling_from}
    return write_checkpoint(out, cfg, mapped["model"], mapped["ema"], info)
