"""Image grids: `moedit sample` and the trainer's periodic sample grids write them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, min_tile: int = 64) -> np.ndarray:
    """(B, 1 or 3, H, W) floats in [0, 1] -> (rows, cols, 3) uint8, `nrow` images per row, on white.

    Images smaller than `min_tile` pixels are enlarged by an integer factor (nearest neighbour),
    so an 8x8 digit shows as 64x64 blocks rather than a speck."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images have shape {tuple(images.shape)}: expected (B, 1 or 3, H, W) in [0, 1]")
    if images.shape[0] == 0:
        raise ValueError("no images to put in a grid")
    if nrow < 1:
        raise ValueError(f"nrow = {nrow}: must be >= 1")
    factor = max(1, min_tile // max(images.shape[-2:]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    b, c, h, w = images.shape
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if c == 1:
        pixels = pixels.expand(b, 3, h, w)
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i in range(b):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i].permute(1, 2, 0).numpy()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2,
              min_tile: int = 64) -> np.ndarray:
    """Write `images` (B, 1 or 3, H, W) in [0, 1] as a PNG grid; returns the grid (HWC uint8)."""
    grid = make_grid(images, nrow=nrow, padding=padding, min_tile=min_tile)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return grid
