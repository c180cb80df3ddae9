"""Datasets `moedit prepare` can read. Each yields (image, label) by index, in a fixed order.

An image is a PIL image, or for `digits` a float32 array (1, H, W) already in [-1, 1].
Sources are opened once per preparation process, so they keep no open handles when pickled.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from moedit.errors import MoeditError

SOURCES = ("digits", "folder", "hf", "parquet", "synthetic", "shards")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


@dataclass
class SourceSpec:
    """What to read; the same spec always gives the same items in the same order."""

    kind: str
    input: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    num_samples: int | None = None
    """Synthetic: how many; other sources: read at most this many (the first ones)."""
    num_classes: int = 10
    latent_shape: tuple[int, int, int] = (4, 32, 32)
    seed: int = 0


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), scaled from 0..16 to [-1, 1]."""

    def __init__(self, spec: SourceSpec):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # (N, 1, 8, 8)
        self.labels = digits.target.astype(np.int64)
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int) -> tuple[Any, int]:
        return self.images[index], int(self.labels[index])


class FolderSource:
    """ImageNet-style `root/<class name>/<image>`; classes in sorted order, files sorted in each."""

    def __init__(self, spec: SourceSpec):
        root = spec.input
        if not root or not os.path.isdir(root):
            raise MoeditError(f"--input {root!r}: not a directory of class subfolders")
        self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.class_names:
            raise MoeditError(f"--input {root}: no class subfolders (expected ROOT/<class>/<image files>)")
        self.items: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.items.extend((os.path.join(folder, f), label) for f in files)
        if not self.items:
            raise MoeditError(f"--input {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image.load()
                return image, label
        except OSError as exc:
            raise MoeditError(f"{path}: cannot read image ({exc})") from None


class HFSource:
    """A Hugging Face dataset saved with `save_to_disk`, or local parquet files (a file, a directory
    or a glob), with an image column and an integer label column."""

    def __init__(self, spec: SourceSpec):
        import datasets

        if not spec.input or not os.path.exists(spec.input.split("*")[0] or "."):
            raise MoeditError(f"--input {spec.input!r}: not found")
        if spec.kind == "hf":
            try:
                data = datasets.load_from_disk(spec.input)
            except FileNotFoundError as exc:
                raise MoeditError(f"--input {spec.input}: not a dataset saved with save_to_disk ({exc})") from None
            if isinstance(data, datasets.DatasetDict):
                split = "train" if "train" in data else sorted(data)[0]
                data = data[split]
        else:
            files = spec.input
            if os.path.isdir(files):
                files = os.path.join(files, "*.parquet")
            data = datasets.load_dataset("parquet", data_files=files, split="train")
        for key in (spec.image_key, spec.label_key):
            if key not in data.column_names:
                raise MoeditError(f"--input {spec.input}: no column {key!r} (columns: {data.column_names}); "
                                  "set --image-key/--label-key")
        self.data, self.image_key, self.label_key = data, spec.image_key, spec.label_key
        feature = data.features[spec.label_key]
        names = getattr(feature, "names", None)
        self.class_names = list(names) if names else [str(i) for i in range(int(max(data[spec.label_key])) + 1)]

    def __len__(self) -> int:
        return len(self.data)

    def get(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        row = self.data[index]
        image = row[self.image_key]
        if isinstance(image, dict):  # undecoded Image feature, e.g. from plain parquet
            image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        return image, int(row[self.label_key])


class SyntheticSource:
    """Random latents with a class-dependent mean: learnable, deterministic per index."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.class_names = [str(i) for i in range(spec.num_classes)]
        c, h, w = spec.latent_shape
        means = np.random.default_rng([spec.seed, 1]).standard_normal((spec.num_classes, c, 1, 1))
        self.means = means.astype(np.float32)

    def __len__(self) -> int:
        return self.spec.num_samples or 1000

    def get(self, index: int) -> tuple[Any, int]:
        rng = np.random.default_rng([self.spec.seed, 2, index])
        label = int(rng.integers(self.spec.num_classes))
        noise = rng.standard_normal(self.spec.latent_shape, dtype=np.float32)
        return self.means[label] + 0.5 * noise, label


def open_source(spec: SourceSpec) -> Any:
    if spec.kind == "digits":
        return DigitsSource(spec)
    if spec.kind == "folder":
        return FolderSource(spec)
    if spec.kind in ("hf", "parquet"):
        return HFSource(spec)
    if spec.kind == "synthetic":
        return SyntheticSource(spec)
    raise MoeditError(f"--source {spec.kind!r}: use one of {', '.join(SOURCES)}")
