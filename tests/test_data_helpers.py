"""Shared fixtures for the data tests: tiny shard sets whose samples identify themselves."""

from __future__ import annotations

import os

import numpy as np

from moedit.data.manifest import Manifest, ShardInfo, file_sha256, write_manifest
from moedit.data.prepare import npy_bytes
from moedit.data.tario import write_tar


def make_dataset(root: str, num_samples: int, shard_size: int, shape=(1, 2, 2), dtype="float32",
                 num_classes: int = 10, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 bad: dict | None = None) -> Manifest:
    """Sample i: latent filled with i, label i % num_classes, key f"{i:06d}".

    `bad` maps a sample index to a replacement fields dict (to plant bad samples).
    """
    os.makedirs(root, exist_ok=True)
    shards = []
    for s, lo in enumerate(range(0, num_samples, shard_size)):
        samples = []
        for i in range(lo, min(lo + shard_size, num_samples)):
            fields = {"npy": npy_bytes(np.full(shape, i, dtype=dtype)), "cls": str(i % num_classes).encode()}
            if bad and i in bad:
                fields = bad[i]
            samples.append((f"{i:06d}", fields))
        name = f"shard-{s:06d}.tar"
        path = os.path.join(root, name)
        write_tar(path, samples)
        shards.append(ShardInfo(name, len(samples), file_sha256(path), os.path.getsize(path)))
    manifest = Manifest(latent_shape=list(shape), latent_dtype=dtype, num_classes=num_classes,
                        class_names=[str(c) for c in range(num_classes)], shards=shards,
                        scaling_factor=scaling_factor, shift_factor=shift_factor, samples_per_shard=shard_size)
    write_manifest(manifest, root)
    return manifest


def sample_ids(latents) -> list[int]:
    """The identity of each sample in a batch made by make_dataset (scaling 1, shift 0)."""
    return [int(round(float(v))) for v in latents[:, 0, 0, 0]]
