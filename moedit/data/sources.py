"""Datasets `moedit prepare` can read. Each yields (image, label) by index, in a fixed order, and
with `captions` on, `caption(index)` the item's caption.

An image is a PIL image, or for `digits` a float32 array (1, H, W) already in [-1, 1].
Sources are opened once per preparation process, so they keep no open handles when pickled.
Captions: folder `ROOT/<class>/<stem>.txt` beside each image; webdataset `KEY.txt`, else the
`caption_key` of `KEY.json`; hf/parquet the `caption_column`; digits (and synthetic, for
benchmarks) made from the label (moedit.data.text.digit_caption). A source opened with captions on checks that every item it will
use has one, so a missing caption is an error before any encoding starts.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from moedit.errors import MoeditError

SOURCES = ("digits", "folder", "webdataset", "hf", "parquet", "synthetic", "shards")
WEBDATASET_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
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
    captions: bool = False
    """Read a caption for every item (and fail on a missing one)."""
    caption_column: str = "caption"
    """hf/parquet: the caption column."""
    caption_key: str = "caption"
    """webdataset: the key of the caption in `KEY.json` (used when a sample has no `KEY.txt`)."""

    def limit(self, length: int) -> int:
        """Items used of a source of `length` items."""
        return length if self.num_samples is None else min(length, self.num_samples)


def missing_caption(item: str, source: str, how: str) -> MoeditError:
    return MoeditError(f"{item}: no caption (--source {source} reads {how})")


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

    def caption(self, index: int) -> str:
        from moedit.data.text import digit_caption

        return digit_caption(int(self.labels[index]), index)


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
        if spec.captions:
            for path, _ in self.items[: spec.limit(len(self.items))]:
                if not os.path.isfile(self._caption_path(path)):
                    raise missing_caption(path, "folder", f"the caption of ROOT/<class>/<stem>.<ext> from "
                                          f"ROOT/<class>/<stem>.txt, and {os.path.basename(self._caption_path(path))} "
                                          "is not there")

    @staticmethod
    def _caption_path(image_path: str) -> str:
        return os.path.splitext(image_path)[0] + ".txt"

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        path = self._caption_path(self.items[index][0])
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise MoeditError(f"{path}: cannot read caption ({exc})") from None

    def get(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image.load()
                return image, label
        except OSError as exc:
            raise MoeditError(f"{path}: cannot read image ({exc})") from None


def webdataset_paths(pattern: str | None) -> list[str]:
    """The tar files of --input for --source webdataset: a file, a directory (its *.tar), a glob or
    a brace pattern (shard-{000000..000099}.tar)."""
    from moedit.data.manifest import expand_braces

    if not pattern:
        raise MoeditError("--source webdataset needs --input (a directory of .tar shards, a glob or a brace pattern)")
    if os.path.isdir(pattern):
        paths = sorted(glob.glob(os.path.join(pattern, "*.tar")))
    else:
        paths = [p for part in expand_braces(pattern) for p in (sorted(glob.glob(part)) if glob.has_magic(part) else [part])]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MoeditError(f"--input {pattern!r}: {missing[0]} not found")
    if not paths:
        raise MoeditError(f"--input {pattern!r}: no .tar shards")
    return paths


class WebDatasetSource:
    """Existing webdataset tars of images, as LAION-style shards are written (img2dataset):
    `KEY.jpg` (or jpeg/png/webp), a caption in `KEY.txt` or under `caption_key` in `KEY.json`, and
    optionally a class index in `KEY.cls` (all samples or none; none: one class, 0). Samples in
    shard order, members in file order; the tars are indexed once, images read on demand."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        # (tar path, key, image member offset, size), and the caption or None
        self.items: list[tuple[str, str, int, int]] = []
        self.captions: list[str | None] = []
        labels: list[int | None] = []
        for path in webdataset_paths(spec.input):
            try:
                with tarfile.open(path) as tar:
                    for key, members in _tar_samples(tar):
                        self._add(path, key, members, tar, labels)
            except (tarfile.TarError, OSError) as exc:
                raise MoeditError(f"--source webdataset: cannot read {path} ({exc})") from None
        if not self.items:
            raise MoeditError(f"--input {spec.input}: no samples with an image member ({', '.join(WEBDATASET_IMAGE_MEMBERS)})")
        have = [label is not None for label in labels]
        if any(have) and not all(have):
            path, key = self.items[have.index(False)][:2]
            raise MoeditError(f"{path}, sample {key}: no .cls member, but other samples have one (all or none)")
        self.labels = [int(label or 0) for label in labels]
        self.class_names = [str(i) for i in range(max(self.labels) + 1)]
        if spec.captions:
            for (path, key, _, _), text in zip(self.items, self.captions[: spec.limit(len(self.items))]):
                if text is None:
                    raise missing_caption(f"{path}, sample {key}", "webdataset",
                                          f"KEY.txt, else the {spec.caption_key!r} key of KEY.json; set --caption-key")

    def _add(self, path: str, key: str, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile,
             labels: list[int | None]) -> None:
        image = next((members[ext] for ext in WEBDATASET_IMAGE_MEMBERS if ext in members), None)
        if image is None:
            raise MoeditError(f"{path}, sample {key}: no image member ({', '.join(WEBDATASET_IMAGE_MEMBERS)}; "
                              f"has {', '.join(sorted(members))})")
        read = lambda ext: tar.extractfile(members[ext]).read()  # noqa: E731
        caption = None
        if "txt" in members:
            caption = read("txt").decode("utf-8").strip()
        elif "json" in members and self.spec.captions:
            try:
                meta = json.loads(read("json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise MoeditError(f"{path}, sample {key}: .json is not valid JSON ({exc})") from None
            value = meta.get(self.spec.caption_key) if isinstance(meta, dict) else None
            caption = value if isinstance(value, str) else None
        label = None
        if "cls" in members:
            try:
                label = int(read("cls"))
            except ValueError:
                raise MoeditError(f"{path}, sample {key}: .cls is not an integer") from None
        self.items.append((path, key, image.offset_data, image.size))
        self.captions.append(caption)
        labels.append(label)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, key, offset, size = self.items[index]
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                image = Image.open(io.BytesIO(f.read(size)))
                image.load()
        except OSError as exc:
            raise MoeditError(f"{path}, sample {key}: cannot read image ({exc})") from None
        return image, self.labels[index]

    def caption(self, index: int) -> str:
        text = self.captions[index]
        assert text is not None, "captions are checked when the source opens"
        return text


def _tar_samples(tar: tarfile.TarFile):
    """(key, {extension: member}) per sample, grouped by WebDataset's rule (consecutive members,
    key up to the first dot of the file name); webdataset's `__`-prefixed metadata skipped."""
    from moedit.data.tario import split_key

    current_key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_key(member.name)
        if key.rpartition("/")[2].startswith("__"):
            continue
        if key != current_key:
            if current_key is not None:
                yield current_key, members
            current_key, members = key, {}
        members[ext] = member
    if current_key is not None:
        yield current_key, members


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
        self.captions: list[Any] | None = None
        if spec.captions:
            if spec.caption_column not in data.column_names:
                raise MoeditError(f"--input {spec.input}: no caption column {spec.caption_column!r} "
                                  f"(columns: {data.column_names}); set --caption-column")
            self.captions = list(data[spec.caption_column])
            for row, text in enumerate(self.captions[: spec.limit(len(self.captions))]):
                if not isinstance(text, str):
                    raise missing_caption(f"--input {spec.input}, row {row}", spec.kind,
                                          f"column {spec.caption_column!r}, which holds {text!r} there")
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

    def caption(self, index: int) -> str:
        assert self.captions is not None, "source opened without captions"
        return self.captions[index]


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

    def caption(self, index: int) -> str:
        """A digit caption of the item's class modulo 10 (words the tiny stand-in encoder knows);
        for benchmarks and tests of the text path, where what the caption says does not matter."""
        from moedit.data.text import digit_caption

        return digit_caption(self.get(index)[1] % 10, index)


def open_source(spec: SourceSpec) -> Any:
    if spec.kind == "digits":
        return DigitsSource(spec)
    if spec.kind == "folder":
        return FolderSource(spec)
    if spec.kind == "webdataset":
        return WebDatasetSource(spec)
    if spec.kind in ("hf", "parquet"):
        return HFSource(spec)
    if spec.kind == "synthetic":
        return SyntheticSource(spec)
    raise MoeditError(f"--source {spec.kind!r}: use one of {', '.join(SOURCES)}")
