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

Text conditioning: the condition `y` is a mapping of keyword tensors, `{"text": (B, L, W),
"text_mask": (B, L)}` (optionally "drop_text" (B,) bool), and the model is called as
`model(x, t, **y)`. The unconditional pass is the same caption with `drop_text` all true, so the
model substitutes its learned null caption (`null_label` is not used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from moedit.diffusion.config import check_cfg_batching

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
"""(x, t, condition) -> output; the condition is class labels (B,), None, or a text mapping."""


def is_text_condition(y: Any) -> bool:
    return isinstance(y, Mapping)


def call_model(model: Callable, x: Tensor, t: Tensor, y: Any) -> Tensor:
    """The model on one condition: `model(x, t, y)` for labels, `model(x, t, **y)` for a text mapping."""
    return model(x, t, **y) if is_text_condition(y) else model(x, t, y)


def _text_pair(y: Mapping, batch: int, device: torch.device) -> tuple[dict, dict]:
    """(conditional, unconditional) text keyword sets: the unconditional one drops every caption."""
    cond = dict(y)
    cond.setdefault("drop_text", torch.zeros(batch, dtype=torch.bool, device=device))
    return cond, {**cond, "drop_text": torch.ones(batch, dtype=torch.bool, device=device)}


def _cat(a: Any, b: Any) -> Any:
    """Two conditions of B rows as one of 2B (tensors or text mappings; None stays None)."""
    if is_text_condition(a):
        return {k: None if a[k] is None else torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


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
        return lambda x, t, y: call_model(model, x, t, y)

    def forward(x: Tensor, t: Tensor, y: Any) -> Tensor:
        if interval is None:
            inside = torch.ones_like(t, dtype=torch.bool)
        else:
            level = noise_level(t)
            inside = (level >= interval[0]) & (level <= interval[1])  # (B,)
        if not bool(inside.any()):
            return call_model(model, x, t, y)
        if is_text_condition(y):
            y, null = _text_pair(y, x.shape[0], x.device)
        else:
            null = torch.full_like(y, null_label)
        if batching == "separate":
            cond = call_model(model, x, t, y)  # (B, C_out, H, W), then the unconditional pool on its own
            uncond = call_model(model, x, t, null)
        else:
            out = call_model(model, torch.cat([x, x]), torch.cat([t, t]), _cat(y, null))  # (2B, C_out, H, W)
            cond, uncond = out.chunk(2)
        g = guidance_channels
        mixed = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        mixed = torch.where(inside.view(-1, *[1] * (x.dim() - 1)), mixed, cond[:, :g])
        return torch.cat([mixed, cond[:, g:]], dim=1)

    return forward
