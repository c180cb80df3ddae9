"""Diffusion objectives, samplers and classifier-free guidance for any model `(x_t, t, y) -> output`.

    diffusion = build_diffusion(cfg.diffusion)
    terms = diffusion.training_losses(model, x, y, generator)   # {"loss", "mse", ..., aux terms}
    images = diffusion.sample(model, noise, y, steps=50, sampler="heun", cfg_scale=1.5)

Nothing here knows about MoE: auxiliary losses come from `model.aux_losses()` and are weighted
in `moedit.diffusion.losses.total_loss`. See docs/diffusion.md.
"""

from __future__ import annotations

from moedit.diffusion.config import DDPM_SAMPLERS, FLOW_SAMPLERS, DiffusionConfig
from moedit.lazy import lazy_attributes

# torch-backed parts load on first use, so that `moedit.diffusion.config` (configs, `--help`) stays light
_LAZY = {"GaussianDiffusion": "moedit.diffusion.ddpm", "RectifiedFlow": "moedit.diffusion.flow",
         "total_loss": "moedit.diffusion.losses"}

__getattr__ = lazy_attributes(__name__, _LAZY)


def build_diffusion(cfg: DiffusionConfig) -> RectifiedFlow | GaussianDiffusion:
    """The objective named by `cfg.objective`, with `training_losses` and `sample`."""
    from moedit.diffusion.ddpm import GaussianDiffusion
    from moedit.diffusion.flow import RectifiedFlow

    if cfg.objective == "flow":
        return RectifiedFlow(cfg)
    if cfg.objective == "ddpm":
        return GaussianDiffusion(cfg)
    raise ValueError(f"diffusion.objective = {cfg.objective!r}: use 'flow' or 'ddpm'")


__all__ = ["DiffusionConfig", "FLOW_SAMPLERS", "DDPM_SAMPLERS", "GaussianDiffusion", "RectifiedFlow",
           "build_diffusion", "total_loss"]
