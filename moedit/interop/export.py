"""`moedit export`: a moedit checkpoint -> diffusers, an official layout, or one safetensors file.

- `diffusers`: a `DiTTransformer2DModel` directory (config.json + diffusion_pytorch_model.safetensors)
  for dense DiTs; `DiTTransformer2DModel.from_pretrained(DIR)` loads it.
- `official`: a plain state dict (.pt, tensors only) in the facebookresearch/DiT, DiffMoE or
  DiT-MoE names, for the official sampling and evaluation code.
- `safetensors`: moedit's own weights file with its config as JSON beside it
  (`moedit.train.checkpoint.export_safetensors`), readable by `moedit sample` anywhere.

diffusers' DiT embeds the timestep with frequencies 10000^(-k/127), k < 128
(`downscale_freq_shift=1` is fixed in its CombinedTimestepLabelEmbeddings), where DiT and moedit
use 10000^(-k/128). Every weight maps exactly, so outputs agree at t = 0 and, after
`patch_diffusers_time_embedding(model)`, at every t; without the patch they differ for t > 0
(diffusers' own conversion of the published DiT weights has the same difference).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moedit.errors import MoeditError
from moedit.interop import layouts

FORMATS = ("diffusers", "official", "safetensors")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_weights(path: str | Path, use_ema: bool = True):
    """(state dict, resolved Config) from a run directory, checkpoint directory or exported file
    (damaged or foreign files are named errors: `moedit.train.checkpoint.load_weights`)."""
    from moedit.train.checkpoint import load_weights as _load

    return _load(path, use_ema)


def _independent(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def export_diffusers(path: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write a DiTTransformer2DModel directory for a dense moedit DiT."""
    from safetensors.torch import save_file

    from moedit.models.layers import sincos_2d

    state, cfg = load_weights(path, use_ema)
    model = cfg.model
    layouts.check_diffusers_compatible(model)
    grid = model.input_size // model.patch_size
    table = sincos_2d(model.hidden_size, grid, grid).unsqueeze(0)
    if not torch.allclose(state["pos_embed"].float(), table, atol=1e-6, rtol=0):
        raise MoeditError(f"{path}: pos_embed differs from the fixed sin-cos table; diffusers recomputes that "
                          "table, so the exported model would not be this one")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeditError(f"--out {out}: exists and is not an empty directory; choose a new path")
    out.mkdir(parents=True, exist_ok=True)
    save_file(_independent(layouts.to_diffusers(state, model)), str(out / DIFFUSERS_WEIGHTS),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(layouts.diffusers_config(model), indent=2))
    return out


def export_official(path: str | Path, out: str | Path, layout: str, use_ema: bool = True) -> Path:
    """Write a plain state dict (tensors only) in an official layout."""
    state, cfg = load_weights(path, use_ema)
    official = layouts.to_official(state, cfg.model, layout)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_independent(official), out)
    return out


def export_moedit_safetensors(path: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """moedit's weights as one safetensors file plus `<out>.json` with the resolved config."""
    from moedit.train.checkpoint import _find_weights, export_safetensors

    location, _ = _find_weights(Path(path))
    if location.is_file():
        raise MoeditError(f"{path}: already an exported safetensors file")
    return export_safetensors(location, Path(out), use_ema=use_ema)


def patch_diffusers_time_embedding(model) -> None:
    """Make a loaded diffusers DiTTransformer2DModel embed timesteps with DiT's frequencies
    (10000^(-k/128)) instead of diffusers' 10000^(-k/127); see the module docstring."""
    projections = [block.norm1.emb.time_proj for block in model.transformer_blocks]
    if not projections or not all(hasattr(p, "downscale_freq_shift") for p in projections):
        raise MoeditError("model: not a diffusers DiTTransformer2DModel with per-block timestep projections")
    for projection in projections:
        projection.downscale_freq_shift = 0
