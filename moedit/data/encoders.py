"""Encoders (images -> stored latents) and decoders (model-space latents -> images in [0, 1])."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moedit.data.manifest import Manifest
from moedit.errors import MoeditError

ENCODERS = ("identity", "vae")
VAE_HELP = (
    "pass --vae DIR, a local directory in the diffusers AutoencoderKL layout (config.json and "
    "diffusion_pytorch_model.safetensors, e.g. the `vae` folder of a Stable Diffusion checkpoint "
    "or stabilityai/sd-vae-ft-ema saved with save_pretrained); moedit never downloads weights"
)


def center_crop_resize(image: Any, size: int) -> Any:
    """DiT's preprocessing: box-downsample while the image is >= 2x the target, bicubic resize so
    the short side is `size`, then center crop to size x size."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_array(image: Any, size: int | None, channels: int) -> np.ndarray:
    """An image as float32 (C, H, W) in [-1, 1], center-cropped and resized to `size`."""
    if isinstance(image, np.ndarray):  # already (C, H, W) in [-1, 1] (digits)
        array = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if size is not None and array.shape[-1] != size:
            array = torch.nn.functional.interpolate(array[None], size=(size, size), mode="bilinear",
                                                    align_corners=False, antialias=True)[0]
        if channels == 3 and array.shape[0] == 1:
            array = array.expand(3, -1, -1)
        return array.clamp(-1, 1).numpy()
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        image = center_crop_resize(image, size)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_vae(path: str | None, device: str = "cpu") -> Any:
    """diffusers AutoencoderKL from a local directory, or a MoeditError saying how to get one."""
    if not path:
        raise MoeditError(f"--encoder vae needs weights: {VAE_HELP}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MoeditError(f"no AutoencoderKL at {path} (config.json missing): {VAE_HELP}")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MoeditError("--encoder vae needs diffusers: pip install 'moedit[vae]'") from None
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    return vae.to(device).eval()


class IdentityEncoder:
    """Pixel space: stored latents are the images themselves in [-1, 1]."""

    def __init__(self, image_size: int | None, channels: int):
        self.image_size, self.channels = image_size, channels

    def encode(self, images: list[Any], flips: list[bool], seed: int) -> np.ndarray:
        arrays = [to_array(img, self.image_size, self.channels) for img in images]
        arrays = [a[:, :, ::-1] if flip else a for a, flip in zip(arrays, flips)]
        return np.stack(arrays).astype(np.float32)  # (B, C, H, W)

    def manifest_fields(self) -> dict[str, Any]:
        return {"encoder": {"type": "identity", "image_size": self.image_size, "image_channels": self.channels,
                            "pixel_range": [-1.0, 1.0]},
                "scaling_factor": 1.0, "shift_factor": 0.0}


class VAEEncoder:
    """diffusers AutoencoderKL: latents are the posterior mean or a seeded posterior sample."""

    def __init__(self, path: str | None, image_size: int, sample: bool, device: str = "cpu"):
        self.path, self.image_size, self.sample, self.device = path, image_size, sample, device
        self.vae = load_vae(path, device)

    @torch.no_grad()
    def encode(self, images: list[Any], flips: list[bool], seed: int) -> np.ndarray:
        arrays = [to_array(img, self.image_size, 3) for img in images]
        arrays = [a[:, :, ::-1] if flip else a for a, flip in zip(arrays, flips)]
        x = torch.from_numpy(np.stack(arrays).copy()).to(self.device)  # (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        if self.sample:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            latents = posterior.sample(generator=generator)
        else:
            latents = posterior.mean
        return latents.float().cpu().numpy()  # (B, C_latent, H/f, W/f), unscaled

    def manifest_fields(self) -> dict[str, Any]:
        config = self.vae.config
        return {"encoder": {"type": "autoencoderkl", "vae": os.path.abspath(self.path), "image_size": self.image_size,
                            "image_channels": 3, "latent_sample": "sample" if self.sample else "mean",
                            "latent_channels": int(config.latent_channels),
                            "downsample": 2 ** (len(config.block_out_channels) - 1)},
                "scaling_factor": float(config.scaling_factor),
                "shift_factor": float(getattr(config, "shift_factor", None) or 0.0)}


def build_decoder(manifest: Manifest, vae_path: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map model-space latents (B, C, H, W) back to images in [0, 1] (B, 3 or 1, H', W')."""
    scale, shift = float(manifest.scaling_factor), float(manifest.shift_factor)
    kind = manifest.encoder.get("type", "identity")
    if kind == "autoencoderkl":
        vae = load_vae(vae_path or manifest.encoder.get("vae"))

        @torch.no_grad()
        def decode_vae(latents: torch.Tensor) -> torch.Tensor:
            vae.to(latents.device)
            raw = latents / scale + shift
            images = vae.decode(raw.to(vae.dtype)).sample  # (B, 3, H', W') in about [-1, 1]
            return ((images.float() + 1) / 2).clamp(0, 1)

        return decode_vae

    def decode_pixels(latents: torch.Tensor) -> torch.Tensor:
        pixels = latents / scale + shift  # stored values, in [-1, 1] for identity
        if pixels.shape[1] not in (1, 3):  # synthetic latents: show the first channel
            pixels = pixels[:, :1]
        return ((pixels + 1) / 2).clamp(0, 1)

    return decode_pixels
