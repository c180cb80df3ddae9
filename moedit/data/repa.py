"""Images -> frozen vision-encoder patch features for REPA (representation alignment), stored in
the shards as the per-sample field `repa`: float16 (N, C), N = grid * grid tokens in the DiT's
patch order (row-major: token y * grid + x, as PatchEmbed's `flatten(2)` orders them).

A REPA encoder is a LOCAL directory holding a Hugging Face `transformers` DINOv2 saved with
`save_pretrained` (config `model_type` dinov2, Dinov2Model; or dinov2_with_registers). Nothing is
ever downloaded. Each image, as the latent sees it (center-cropped to the preparation's image
size, flipped for the flipped copy), is mapped to [0, 1], resized to `image_size` x `image_size`
(bicubic, antialiased), normalised with the ImageNet mean/std DINOv2 was trained with, and
encoded in float32 without gradients. The features are the patch tokens of the last hidden state
(after DINOv2's final layer norm; the CLS token and any register tokens are dropped): a (g, g, C)
map, g = image_size / patch size. When g differs from the model's token grid G the map is
resampled to (G, G, C) by bilinear interpolation (half-pixel centers, antialiased when shrinking).

`random:WIDTH` is no model: a FIXED random linear map of each image's pixels pooled onto the G x G
grid (`RandomPatchFeatures`), image-dependent features to align with on CPU (the digits).

`make_tiny_dinov2` writes a stand-in with RANDOM weights for tests. transformers is imported only
inside the functions that need it (`pip install 'moedit[text]'`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from moedit.errors import MoeditError

REPA_FIELD = "repa"
REPA_ENCODER_TYPES = ("dinov2", "random")
RANDOM_PREFIX = "random:"
DEFAULT_IMAGE_SIZE = 224
"""DINOv2's training resolution (16 x 16 patches of 14 pixels)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_FEATURE_SEED = 26
"""`random:WIDTH` draws its map from numpy's default_rng([26, channels, WIDTH])."""
MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
REPA_ENCODER_HELP = (
    "pass --repa-encoder DIR, a local directory holding a transformers DINOv2 (Dinov2Model, config.json "
    "model_type dinov2) saved with save_pretrained (config.json and weights), or random:WIDTH; "
    "moedit never downloads weights"
)
STAND_IN_MARKER = "MOEDIT_STAND_IN.md"


def read_repa_config(path: str | os.PathLike | None) -> tuple[str, int, dict[str, Any]]:
    """(type dinov2 | random, feature width, config.json) of a REPA encoder, without loading weights
    or importing transformers; a one-line MoeditError for a missing or unusable one."""
    if not path:
        raise MoeditError(f"REPA features need an encoder: {REPA_ENCODER_HELP}")
    path = os.fspath(path)
    if path.startswith(RANDOM_PREFIX):
        return "random", RandomPatchFeatures.parse_width(path), {}
    from moedit.data.text import read_config_json

    config = read_config_json(path, "REPA encoder", REPA_ENCODER_HELP)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise MoeditError(f"REPA encoder {path}: model_type {model_type!r} is not a DINOv2 (config.json model_type "
                          f"must be one of {', '.join(MODEL_TYPES)})")
    return "dinov2", int(config.get("hidden_size", 768)), config  # Dinov2Config's default when unset


def check_grid(grid: int) -> int:
    if not isinstance(grid, int) or grid < 1:
        raise MoeditError(f"REPA grid {grid!r}: the model's token grid must be 1 or more (--repa-grid)")
    return grid


def resample_tokens(features: Any, grid: int) -> Any:
    """(B, T, C) patch tokens of a square g x g map (row-major, T = g * g) -> (B, grid * grid, C):
    bilinear, half-pixel centers (align_corners False), antialiased when shrinking; unchanged when
    g == grid. A token count that is not a square is a MoeditError (no grid to resample)."""
    import torch

    check_grid(grid)
    B, T, C = features.shape
    g = math.isqrt(T)
    if g * g != T or T == 0:
        raise MoeditError(f"the REPA encoder gives {T} patch tokens, not a square g x g grid: cannot resample "
                          f"them to the model's {grid} x {grid} tokens")
    if g == grid:
        return features
    fmap = features.reshape(B, g, g, C).permute(0, 3, 1, 2)  # (B, C, g, g)
    fmap = torch.nn.functional.interpolate(fmap.float(), size=(grid, grid), mode="bilinear", align_corners=False,
                                           antialias=grid < g)
    return fmap.permute(0, 2, 3, 1).reshape(B, grid * grid, C)  # (B, N, C), N = grid^2 row-major


def _stack_pixels(images: list[np.ndarray]) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.stack(images), dtype=np.float32))  # (B, C, H, W)


class DinoV2Features:
    """A frozen local DINOv2: `encode(images)` -> (B, grid^2, C) float32 patch features."""

    kind = "dinov2"

    def __init__(self, path: str | os.PathLike, grid: int, image_size: int = DEFAULT_IMAGE_SIZE, device: str = "cpu"):
        _, self.width, config = read_repa_config(path)
        self.path, self.grid, self.image_size, self.device = os.path.abspath(os.fspath(path)), check_grid(grid), \
            int(image_size), device
        self.patch_size = int(config.get("patch_size", 14))
        self.skip = 1 + int(config.get("num_register_tokens", 0))  # CLS, then registers, then patches
        if self.image_size < self.patch_size or self.image_size % self.patch_size:
            raise MoeditError(f"--repa-image-size {self.image_size} is not a multiple of the REPA encoder's patch size "
                              f"{self.patch_size} ({self.path}): use e.g. {max(1, self.image_size // self.patch_size) * self.patch_size}")
        try:
            import transformers
        except ImportError:
            raise MoeditError("REPA encoders need transformers: pip install 'moedit[text]'") from None
        transformers.utils.logging.disable_progress_bar()
        model_class = getattr(transformers, MODEL_TYPES[config["model_type"]])
        try:
            model = model_class.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError...: all one problem here
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MoeditError(f"REPA encoder {path}: cannot load its {model_class.__name__} ({detail}); "
                              f"{REPA_ENCODER_HELP}") from None
        self.model = model.float().to(device).eval().requires_grad_(False)

    @property
    def encoder_grid(self) -> int:
        return self.image_size // self.patch_size

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's `repa_encoder` record."""
        return {"path": self.path, "type": self.kind, "width": self.width, "grid": self.grid,
                "image_size": self.image_size}

    def pixel_values(self, images: list[np.ndarray]) -> Any:
        """Images (C, H, W) in [-1, 1], C = 1 or 3 -> DINOv2's input (B, 3, S, S)."""
        import torch

        x = (_stack_pixels(images) + 1) / 2  # (B, C, H, W) in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise MoeditError(f"REPA encoder {self.path}: images have {x.shape[1]} channels; DINOv2 takes 1 or 3")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                                align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode(self, images: list[np.ndarray]) -> Any:
        """(B, grid^2, width) float32 on the CPU for images (C, H, W) in [-1, 1]."""
        import torch

        with torch.no_grad():
            x = self.pixel_values(images).to(self.device)
            hidden = self.model(pixel_values=x).last_hidden_state  # (B, skip + g*g, C)
            return resample_tokens(hidden[:, self.skip:].float(), self.grid).cpu()


class RandomPatchFeatures:
    """`random:WIDTH`: no model. Each image (C, H, W) is average-pooled onto the G x G grid
    (adaptive average pooling); each token's feature is a fixed random linear map of the pooled
    values of its 3 x 3 neighbourhood (zero outside the image): W^T v, v of size 9C, W (9C, WIDTH)
    standard normal / sqrt(9C) from numpy's default_rng([26, C, WIDTH]). The same image always
    gives the same features; they depend on the image and its local context, so a model can learn
    to predict them (the CPU test of REPA on the digits), but they carry no semantics."""

    kind = "random"

    def __init__(self, spec: str, grid: int):
        self.width, self.path, self.grid = self.parse_width(spec), spec, check_grid(grid)

    @staticmethod
    def parse_width(spec: str) -> int:
        from moedit.data.text import parse_random_width

        return parse_random_width(spec, "--repa-encoder", 32)

    def weight(self, channels: int) -> Any:
        import torch

        rng = np.random.default_rng([RANDOM_FEATURE_SEED, channels, self.width])
        return torch.from_numpy(rng.standard_normal((9 * channels, self.width)).astype(np.float32) / math.sqrt(9 * channels))

    def manifest_entry(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.kind, "width": self.width, "grid": self.grid, "image_size": None}

    def encode(self, images: list[np.ndarray]) -> Any:
        import torch

        x = _stack_pixels(images)  # (B, C, H, W)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, self.grid)  # (B, C, G, G)
        patches = torch.nn.functional.unfold(pooled, kernel_size=3, padding=1)  # (B, 9C, G*G), row-major tokens
        return patches.transpose(1, 2) @ self.weight(x.shape[1])  # (B, N, WIDTH)


def load_repa_encoder(path: str | os.PathLike | None, grid: int, image_size: int = DEFAULT_IMAGE_SIZE,
                      device: str = "cpu") -> DinoV2Features | RandomPatchFeatures:
    """A frozen local DINOv2 (by config.json model_type) or `random:WIDTH` features, giving
    features on the model's `grid`. Errors, one line each: no path, a missing directory, no or
    unreadable config.json, another model type, weights transformers cannot load, a grid < 1."""
    if path is not None and os.fspath(path).startswith(RANDOM_PREFIX):
        return RandomPatchFeatures(os.fspath(path), grid)
    return DinoV2Features(path, grid, image_size, device)


def repa_field(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's `fields` entry for features made by the encoder recorded as `entry`."""
    return {REPA_FIELD: {"dtype": "float16", "shape": [entry["grid"] ** 2, entry["width"]]}}


def check_stored_shape(output: str, records: list[str], entry: dict[str, Any]) -> None:
    """Resuming into an output whose shards hold REPA features of another width or grid is an error
    (the fingerprint covers the encoder's path, not what the directory holds now). `records`: the
    output's dataset.json (its `repa_encoder`) and the progress record of an interrupted run."""
    for path in records:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            record = json.load(f)
        record = record.get("repa_encoder") if "shards" in record else record
        if record and (record.get("width"), record.get("grid")) != (entry["width"], entry["grid"]):
            raise MoeditError(
                f"{output} holds REPA features of width {record.get('width')} on a {record.get('grid')} x "
                f"{record.get('grid')} grid (encoder {record.get('path')}), but encoder {entry['path']} gives width "
                f"{entry['width']} on {entry['grid']} x {entry['grid']}: use the encoder and --repa-grid the shards "
                "were made with, or a new --output")


def make_tiny_dinov2(directory: str | os.PathLike, seed: int = 0, *, hidden_size: int = 32, patch_size: int = 4,
                     image_size: int = 32) -> str:
    """Write a tiny RANDOM-weight DINOv2 (Dinov2Model: `hidden_size` wide, 2 layers, 2 heads,
    `patch_size` pixels per patch, `image_size` input, so an 8 x 8 patch grid by default) into
    `directory` with save_pretrained, without any download; returns the directory, which then loads
    like any other local encoder. The same seed gives the same weights. A stand-in for tests, not a
    pretrained model: its features are fixed functions of the image with no learned meaning."""
    directory = os.fspath(directory)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = transformers.Dinov2Config(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=2 * hidden_size, patch_size=patch_size, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Dinov2Model(config).eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    with open(os.path.join(directory, STAND_IN_MARKER), "w") as f:
        f.write(f"A stand-in REPA encoder made by moedit.data.repa.make_tiny_dinov2 (seed {seed}): a tiny DINOv2 with "
                "RANDOM weights, for tests. It is not a pretrained model. Point --repa-encoder at a real DINOv2 "
                "(e.g. facebook/dinov2-base saved with save_pretrained) for REPA.\n")
    return directory
