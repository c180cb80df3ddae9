"""Classifier-free guidance around any model callable `(x, t, y) -> output`.

Guided output on the first G channels (G = `guidance_channels`, default all data channels):

    out[:, :G] = uncond[:, :G] + scale * (cond[:, :G] - uncond[:, :G])

and the conditional output elsewhere (DiT guides 3 of 4 latent channels and takes the learned
variance from the conditional half). `batching="joint"` sends conditional and unconditional
inputs through the model as one batch of 2B (DiT); `"separate"` makes two calls of B, conditional
first (the official DiffMoE flow sampler). The results differ only for a model whose rows see each
other, such as an expert-choice router over the whole batch pool. The unconditional label is
`null_label` (the model's `num_classes`, the extra row of its label table). Scale 1 skips the
unconditional forward, so it equals the conditional model exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moedit.diffusion.config import check_cfg_batching

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def check_guidance_channels(guidance_channels: int | None, data_channels: int) -> int:
    """Number of guided channels; ValueError when it is not in [1, data_channels]."""
    if guidance_channels is None:
        return data_channels
    if not 1 <= guidance_channels <= data_channels:
        raise ValueError(f"guidance_channels = {guidance_channels}: the data has {data_channels} channels; "
                         f"use 1..{data_channels} or null (all)")
    return int(guidance_channels)


def guided(model: ModelFn, *, cfg_scale: float, null_label: int | None, guidance_channels: int,
           interval: tuple[float, float] | None, noise_level: Callable[[Tensor], Tensor],
           batching: str = "joint") -> ModelFn:
    """A callable with the model's signature that applies classifier-free guidance.

    `noise_level` maps the model's t to a noise level in [0, 1] (1 = pure noise); `interval`
    restricts guidance to samples whose noise level lies in [low, high]; `batching` is
    "joint" (one forward of 2B) or "separate" (two forwards of B).
    """
    check_cfg_batching(batching)
    if cfg_scale == 1.0:
        return model

    def forward(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if interval is None:
            inside = torch.ones_like(t, dtype=torch.bool)
        else:
            level = noise_level(t)
            inside = (level >= interval[0]) & (level <= interval[1])  # (B,)
        if not bool(inside.any()):
            return model(x, t, y)
        null = torch.full_like(y, null_label)
        if batching == "separate":
            cond = model(x, t, y)  # (B, C_out, H, W), then the unconditional pool on its own
            uncond = model(x, t, null)
        else:
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C_out, H, W)
            cond, uncond = out.chunk(2)
        g = guidance_channels
        mixed = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        mixed = torch.where(inside.view(-1, *[1] * (x.dim() - 1)), mixed, cond[:, :g])
        return torch.cat([mixed, cond[:, g:]], dim=1)

    return forward
