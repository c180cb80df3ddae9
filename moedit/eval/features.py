"""Feature networks for FID-style metrics, behind one small interface and a registry.

An extractor maps images in [0, 1] (B, 3, H, W) to a dict of per-image features:

- `pool`    (B, D)  : the vector FID, precision and recall use (Inception: pool_3, D = 2048);
- `spatial` (B, Ds) : the vector sFID uses (Inception: the first 7 channels of mixed_6/conv,
                      17 x 17 x 7 = 2023, flattened in TF's (H, W, C) order as ADM's evaluator does);
- `logits`  (B, K)  : class logits for the Inception Score (Inception: pool_3 @ W_softmax^T,
                      K = 1008, without the bias, as the original Inception Score code does).

`FEATURES` names the extractors: `inception` (pytorch-fid's port of TF's 2015-12-05 Inception-v3,
weights from a local file, never downloaded) and `random-test` (a tiny randomly initialised
network for tests, which goes through exactly the same accumulation and metric code).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moedit.errors import MoeditError

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""pytorch-fid's FID weights (TF's inception-2015-12-05 ported to PyTorch); FID_WEIGHTS_URL in
pytorch_fid.inception says where pytorch-fid publishes them."""

WEIGHTS_ENV = "MOEDIT_INCEPTION_WEIGHTS"
"""Environment variable read when --inception-weights is not given."""


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, H, W) in [0, 1] -> (B, 3, H, W) quantised to 8 bits.

    Quantising matches the protocol: papers evaluate samples saved as uint8 (PNG or .npz), and
    reference images are uint8, so both sides see the same 256 levels.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (B, 1 or 3, H, W)")
    images = (images.float().clamp(0, 1) * 255).round() / 255
    if images.shape[1] == 1:  # grayscale data (digits): the networks take RGB
        images = images.expand(-1, 3, -1, -1)
    return images


class FeatureExtractor(nn.Module):
    """Base class: `dims` names the feature vectors and their sizes; forward returns them."""

    name = "base"
    dims: dict[str, int]

    def identity(self) -> dict:
        """What makes cached reference statistics valid for this extractor (name, weights)."""
        return {"features": self.name}


class RandomTestFeatures(FeatureExtractor):
    """A tiny fixed random conv net with the same three outputs as Inception (for tests).

    Its weights come from a private generator, so every process builds the same network
    whatever the global RNG state.
    """

    name = "random-test"

    def __init__(self, seed: int = 0, size: int = 16):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10, bias=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                fan_in = param[0].numel() if param.dim() > 1 else 1
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        self.spatial_channels = 2
        side = size // 2
        self.dims = {"pool": 16, "spatial": side * side * self.spatial_channels, "logits": 10}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        h1 = torch.relu(self.conv1(x))  # (B, 8, size/2, size/2)
        # Like ADM's sFID: a few channels of an intermediate map, flattened as (H, W, C).
        spatial = h1[:, : self.spatial_channels].permute(0, 2, 3, 1).flatten(1)  # (B, Ds)
        pool = torch.relu(self.conv2(h1)).mean(dim=(2, 3))  # (B, 16)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


@contextlib.contextmanager
def _serve_local_weights(module, state_dict: dict):
    """Make pytorch-fid's weight loader return `state_dict` instead of downloading anything."""
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def missing_weights_message(path: str | None) -> str:
    where = f"not found at {path}" if path else "not given"
    return (
        f"Inception weights {where}: --features inception needs the FID Inception-v3 weights file "
        f"{INCEPTION_WEIGHTS_FILE} (pytorch-fid's port of TF's inception-2015-12-05; "
        "pytorch_fid.inception.FID_WEIGHTS_URL names where it is published). Copy it to this machine and pass "
        f"--inception-weights /path/to/{INCEPTION_WEIGHTS_FILE} or set {WEIGHTS_ENV}; moedit never downloads it"
    )


class InceptionFeatures(FeatureExtractor):
    """pytorch-fid's FID Inception-v3 with local weights; pool_3, mixed_6/conv and logits."""

    name = "inception"

    def __init__(self, weights_path: str | None):
        super().__init__()
        if not weights_path or not Path(weights_path).is_file():
            raise MoeditError(missing_weights_message(weights_path))
        try:
            from pytorch_fid import inception as fid_inception
        except Exception as exc:  # ImportError, or a torchvision that does not match torch
            raise MoeditError(
                f"--features inception needs pytorch-fid with a torchvision matching torch {torch.__version__} "
                f"(pip install pytorch-fid): importing it failed with {type(exc).__name__}: {exc}"
            ) from exc
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        fc_weight = state.get("fc.weight") if isinstance(state, dict) else None
        if fc_weight is None or tuple(fc_weight.shape) != (1008, 2048):
            raise MoeditError(f"{weights_path}: not the FID Inception weights ({INCEPTION_WEIGHTS_FILE}): "
                              "no fc.weight of shape (1008, 2048)")
        with _serve_local_weights(fid_inception, state):
            self.net = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
        self.net.eval()
        self.register_buffer("softmax_weight", fc_weight.float().clone())  # (1008, 2048)
        # blocks[2] runs Mixed_5b .. Mixed_6e; index 6 is Mixed_6d, TF's "mixed_6", whose first
        # conv (branch1x1, 768 -> 192 at 17 x 17) is ADM's "mixed_6/conv" sFID layer.
        self._mixed_6_conv = self.net.blocks[2][6].branch1x1
        self._weights = {"path": str(Path(weights_path).resolve()), "bytes": Path(weights_path).stat().st_size}
        self.dims = {"pool": 2048, "spatial": 17 * 17 * 7, "logits": 1008}

    def identity(self) -> dict:
        return {"features": self.name, "weights_bytes": self._weights["bytes"]}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self._mixed_6_conv.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            pool = self.net(images)[0].flatten(1)  # (B, 2048)
        finally:
            handle.remove()
        spatial = captured[0][:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17 * 17 * 7) in (H, W, C) order
        logits = pool @ self.softmax_weight.T  # (B, 1008)
        return {"pool": pool, "spatial": spatial, "logits": logits}


FEATURES: dict[str, Callable[[str | None], FeatureExtractor]] = {
    "inception": InceptionFeatures,
    "random-test": lambda weights_path: RandomTestFeatures(),
}
"""name -> factory(inception weights path or None). Tests may register their own."""


def build_features(name: str, weights_path: str | None = None,
                   device: torch.device | str = "cpu") -> FeatureExtractor:
    """The extractor `name` in eval mode on `device`; `weights_path` defaults to $MOEDIT_INCEPTION_WEIGHTS."""
    if name not in FEATURES:
        raise ValueError(f"--features {name}: unknown feature network; choose one of {', '.join(FEATURES)}")
    weights_path = weights_path or os.environ.get(WEIGHTS_ENV) or None
    return FEATURES[name](weights_path).to(device).eval()
