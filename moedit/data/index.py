"""Write dataset.json for WebDataset shards made elsewhere (e.g. with `webdataset.ShardWriter`).

Extra per-sample members become the manifest's named `fields`: every `KEY.<name>.npy` (dtype and
shape from its `.npy` header) and the caption `KEY.txt`. They are read from the first sample of the
first shard and checked against the first sample of every other shard. Shards with caption features
(`text`, `text_mask`) or REPA features (`repa`) get a `text_encoder` / `repa_encoder` record of
type "unknown": the shards say the features' shape, not which encoder made them.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import math
import os
from typing import Any

import numpy as np

from moedit.data.manifest import Manifest, ShardInfo, load_manifest, write_manifest
from moedit.data.samples import (
    FIELD_DTYPES, FIELD_NAME, RESERVED_FIELDS, STRING_DTYPE, BadSample, SampleDecoder,
)
from moedit.data.tario import RawSample, ShardError, iter_samples, read_shard_bytes
from moedit.errors import MoeditError

log = logging.getLogger("moedit.data")

CAPTION_MEMBER = "txt"
ARRAY_DTYPES = tuple(d for d in FIELD_DTYPES if d != STRING_DTYPE)


def index_shards(shard_dir: str, *, num_classes: int, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, class_names: list[str] | None = None) -> Manifest:
    """Check every sample of `shard_dir/*.tar` and write the manifest describing them.

    The first sample fixes the latent shape and dtype; any sample that differs, lacks `.npy` or
    `.cls`, or has a label outside [0, num_classes) is an error naming the shard and key. The first
    sample's extra members fix the named fields; the first sample of every other shard must hold
    them with the same dtype and shape.
    """
    paths = sorted(glob.glob(os.path.join(shard_dir, "*.tar")))
    if not paths:
        raise MoeditError(f"no *.tar shards in {shard_dir} to index")
    decoder: SampleDecoder | None = None
    fields: dict[str, dict[str, Any]] | None = None
    first_sample = ""
    shards = []
    for path in paths:
        data = read_shard_bytes(path)
        count = 0
        try:
            for sample in iter_samples(data, path):
                if decoder is None:
                    decoder = _decoder_for(sample.fields.get("npy"), path, sample.key, num_classes)
                if count == 0:
                    found = sample_fields(sample, path)
                    if fields is None:
                        fields, first_sample = found, f"{path} (sample {sample.key})"
                    else:
                        _check_same_fields(fields, found, path, sample.key, first_sample)
                try:
                    decoder.decode(sample.fields)
                except BadSample as bad:
                    raise MoeditError(f"shard {path}, sample {sample.key}: {bad.problem}") from None
                count += 1
        except ShardError as exc:
            raise MoeditError(str(exc)) from None
        shards.append(ShardInfo(os.path.basename(path), count, hashlib.sha256(data).hexdigest(), len(data)))
    assert decoder is not None and fields is not None
    text_encoder, repa_encoder = encoder_records(fields, first_sample)
    manifest = Manifest(
        latent_shape=list(decoder.shape), latent_dtype=str(decoder.dtype), num_classes=num_classes,
        class_names=class_names or [str(i) for i in range(num_classes)], shards=shards,
        encoder={"type": "none"}, scaling_factor=scaling_factor, shift_factor=shift_factor,
        samples_per_shard=max(s.num_samples for s in shards), source={"kind": "shards", "input": os.path.abspath(shard_dir)},
        fields=fields, text_encoder=text_encoder, repa_encoder=repa_encoder,
    )
    manifest.validate(f"--source shards {shard_dir}")  # before writing: no dataset.json that cannot load
    write_manifest(manifest, shard_dir)
    return load_manifest(shard_dir)


def sample_fields(sample: RawSample, shard: str) -> dict[str, dict[str, Any]]:
    """The named fields one sample holds: {name: {"dtype", "shape"}} for each `<name>.npy` member
    (from its header; the data is not read) and {"dtype": "str", "shape": []} for `txt`. Members
    whose name is not a field name (`npy`, `cls`, `json`, images, `a.b.npy`) are not fields."""
    fields: dict[str, dict[str, Any]] = {}
    for member in sorted(sample.fields):
        if member == CAPTION_MEMBER:
            fields[CAPTION_MEMBER] = {"dtype": STRING_DTYPE, "shape": []}
            continue
        name = member[: -len(".npy")] if member.endswith(".npy") else None
        if name is None:
            continue
        if not FIELD_NAME.fullmatch(name) or name in RESERVED_FIELDS:
            log.warning("shard %s, sample %s: member .%s is not a field (a field name is [a-z][a-z0-9_]*); "
                        "not recorded", shard, sample.key, member)
            continue
        dtype, shape = npy_header(sample.fields[member], f"shard {shard}, sample {sample.key}, member .{member}")
        fields[name] = {"dtype": dtype, "shape": list(shape)}
    return fields


def npy_header(data: bytes | memoryview, where: str) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) from a `.npy` member's header, checked to be a field dtype."""
    stream = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise MoeditError(f"{where}: not a readable .npy array ({exc})") from None
    if dtype.name not in ARRAY_DTYPES or dtype != np.dtype(dtype.name):
        raise MoeditError(f"{where}: dtype {dtype.str}; a field's dtype is one of {', '.join(ARRAY_DTYPES)} "
                          "(native byte order)")
    return dtype.name, tuple(int(n) for n in shape)


def _describe(spec: dict[str, Any]) -> str:
    return f"{spec['dtype']} {spec['shape']}"


def _check_same_fields(first: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]], shard: str, key: str,
                       first_sample: str) -> None:
    """Every shard holds the fields of the first: a one-line error naming the shard, the field and
    both shapes otherwise."""
    for name, spec in first.items():
        got = found.get(name)
        if got is None:
            raise MoeditError(f"shard {shard}: its first sample {key} lacks field {name!r}, which {first_sample} "
                              f"holds as {_describe(spec)}; every sample needs the same fields")
        if got != spec:
            raise MoeditError(f"shard {shard}: field {name!r} of its first sample {key} is {_describe(got)}, but "
                              f"{_describe(spec)} in {first_sample}; every sample needs the same field shapes")


def encoder_records(fields: dict[str, dict[str, Any]], where: str) -> tuple[dict | None, dict | None]:
    """The manifest's `text_encoder` and `repa_encoder` for indexed features: type "unknown", path
    None (`moedit sample --prompt` then needs --text-encoder DIR), sizes from the fields' shapes."""
    text_encoder = repa_encoder = None
    text = fields.get("text")
    if text is not None:
        if len(text["shape"]) != 2:
            raise MoeditError(f"{where}: field 'text' is {_describe(text)}; text features are (max_length, width)")
        length, width = text["shape"]
        mask = fields.get("text_mask")
        if mask is not None and mask != {"dtype": "bool", "shape": [length]}:
            raise MoeditError(f"{where}: field 'text_mask' is {_describe(mask)}; beside text {_describe(text)} it "
                              f"must be bool [{length}] (true for real tokens)")
        text_encoder = {"path": None, "type": "unknown", "width": width, "max_length": length}
    repa = fields.get("repa")
    if repa is not None:
        shape = repa["shape"]
        if len(shape) != 2 or math.isqrt(shape[0]) ** 2 != shape[0]:
            raise MoeditError(f"{where}: field 'repa' is {_describe(repa)}; REPA features are (grid^2, width) on "
                              "a square token grid")
        repa_encoder = {"path": None, "type": "unknown", "width": shape[1], "grid": math.isqrt(shape[0]),
                        "image_size": None}
    return text_encoder, repa_encoder


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
