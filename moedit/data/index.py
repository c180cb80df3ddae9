"""Write dataset.json for WebDataset shards made elsewhere (e.g. with `webdataset.ShardWriter`)."""

from __future__ import annotations

import glob
import hashlib
import os

from moedit.data.manifest import Manifest, ShardInfo, load_manifest, write_manifest
from moedit.data.samples import BadSample, SampleDecoder
from moedit.data.tario import ShardError, iter_samples, read_shard_bytes
from moedit.errors import MoeditError


def index_shards(shard_dir: str, *, num_classes: int, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, class_names: list[str] | None = None) -> Manifest:
    """Check every sample of `shard_dir/*.tar` and write the manifest describing them.

    The first sample fixes the latent shape and dtype; any sample that differs, lacks `.npy` or
    `.cls`, or has a label outside [0, num_classes) is an error naming the shard and key.
    """
    paths = sorted(glob.glob(os.path.join(shard_dir, "*.tar")))
    if not paths:
        raise MoeditError(f"no *.tar shards in {shard_dir} to index")
    decoder: SampleDecoder | None = None
    shards = []
    for path in paths:
        data = read_shard_bytes(path)
        count = 0
        try:
            for sample in iter_samples(data, path):
                if decoder is None:
                    decoder = _decoder_for(sample.fields.get("npy"), path, sample.key, num_classes)
                try:
                    decoder.decode(sample.fields)
                except BadSample as bad:
                    raise MoeditError(f"shard {path}, sample {sample.key}: {bad.problem}") from None
                count += 1
        except ShardError as exc:
            raise MoeditError(str(exc)) from None
        shards.append(ShardInfo(os.path.basename(path), count, hashlib.sha256(data).hexdigest(), len(data)))
    assert decoder is not None
    manifest = Manifest(
        latent_shape=list(decoder.shape), latent_dtype=str(decoder.dtype), num_classes=num_classes,
        class_names=class_names or [str(i) for i in range(num_classes)], shards=shards,
        encoder={"type": "none"}, scaling_factor=scaling_factor, shift_factor=shift_factor,
        samples_per_shard=max(s.num_samples for s in shards), source={"kind": "shards", "input": os.path.abspath(shard_dir)},
    )
    write_manifest(manifest, shard_dir)
    return load_manifest(shard_dir)


def _decoder_for(npy: bytes | memoryview | None, shard: str, key: str, num_classes: int) -> SampleDecoder:
    if npy is None:
        raise MoeditError(f"shard {shard}, sample {key}: no .npy member (moedit shards hold KEY.npy and KEY.cls)")
    probe = SampleDecoder((1,), "float32", num_classes)
    try:
        dtype, shape, _, _ = probe._header(npy)
    except BadSample as bad:
        raise MoeditError(f"shard {shard}, sample {key}: {bad.problem}") from None
    if len(shape) != 3 or dtype.name not in ("float16", "float32"):
        raise MoeditError(f"shard {shard}, sample {key}: latent {shape} {dtype}; moedit needs (C, H, W) float16/float32")
    return SampleDecoder(shape, dtype.name, num_classes)
