"""Decoding and checking one sample: `KEY.npy` (latent C x H x W) and `KEY.cls` (class index)."""

from __future__ import annotations

import ast
import math

import numpy as np

from moedit.errors import MoeditError

LATENT_KEY = "npy"
LABEL_KEY = "cls"
METADATA_KEY = "json"

# Reasons a sample is bad; they name the counters in ShardLoader.stats().
REASONS = ("corrupt_shard", "missing_shard", "checksum", "missing_key", "bad_array", "wrong_shape", "wrong_dtype",
           "bad_label", "non_finite")


class DataError(MoeditError):
    """A bad sample or shard under `data.bad_data = raise`."""

    def __init__(self, shard: str, key: str | None, reason: str, problem: str):
        where = f"shard {shard}" + (f", sample {key}" if key else "")
        super().__init__(
            f"{where}: {problem} ({reason}; set data.bad_data=skip to skip and count such samples)"
        )
        self.shard, self.key, self.reason, self.problem = shard, key, reason, problem


class BadSample(Exception):
    """Internal: why one sample cannot be used."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason
        self.problem = problem


class SampleDecoder:
    """Checks samples against the manifest and writes them into preallocated batch arrays."""

    def __init__(self, latent_shape: tuple[int, ...], latent_dtype: str, num_classes: int,
                 check_finite: bool = False):
        self.shape = tuple(latent_shape)
        self.check_finite = check_finite
        self.dtype = np.dtype(latent_dtype)
        self.count = math.prod(self.shape)
        self.num_classes = num_classes
        # Every sample of a dataset has the same .npy header: parse each distinct one once.
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}

    def _header(self, data: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], bool, int]:
        if bytes(data[:6]) != b"\x93NUMPY":
            raise BadSample("bad_array", ".npy member is not a numpy array (bad magic bytes)")
        if data[6] == 1:
            start, length = 10, int.from_bytes(data[8:10], "little")
        else:
            start, length = 12, int.from_bytes(data[8:12], "little")
        raw = bytes(data[start : start + length])
        parsed = self._headers.get(raw)
        if parsed is None:
            try:
                header = ast.literal_eval(raw.decode("latin1"))
                dtype = np.dtype(header["descr"])
                shape = tuple(int(s) for s in header["shape"])
                fortran = bool(header["fortran_order"])
            except Exception:  # any malformed header is the same problem for the user
                raise BadSample("bad_array", ".npy header cannot be parsed") from None
            parsed = (dtype, shape, fortran, start + length)
            if len(self._headers) < 64:
                self._headers[raw] = parsed
        return parsed

    def latent(self, data: bytes | memoryview) -> np.ndarray:
        """The latent as a (C, H, W) array view of `data` (no copy)."""
        dtype, shape, fortran, offset = self._header(data)
        if shape != self.shape:
            raise BadSample("wrong_shape", f"latent shape {shape}, manifest says {self.shape}")
        if dtype != self.dtype:
            raise BadSample("wrong_dtype", f"latent dtype {dtype}, manifest says {self.dtype}")
        if len(data) - offset != self.count * dtype.itemsize:
            raise BadSample("bad_array", f".npy holds {len(data) - offset} data bytes, expected {self.count * dtype.itemsize}")
        array = np.frombuffer(data, dtype=dtype, count=self.count, offset=offset)
        if self.check_finite and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise BadSample("non_finite", f"latent holds {bad} NaN or infinite value(s) of {array.size}")
        return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)

    def label(self, data: bytes | memoryview) -> int:
        try:
            value = int(bytes(data))
        except ValueError:
            raise BadSample("bad_label", f"label {bytes(data[:20])!r} is not an integer") from None
        if not 0 <= value < self.num_classes:
            raise BadSample("bad_label", f"label {value} out of range [0, {self.num_classes})")
        return value

    def decode(self, fields: dict[str, bytes | memoryview]) -> tuple[np.ndarray, int]:
        latent_bytes = fields.get(LATENT_KEY)
        label_bytes = fields.get(LABEL_KEY)
        if latent_bytes is None or label_bytes is None:
            missing = [f".{k}" for k, v in ((LATENT_KEY, latent_bytes), (LABEL_KEY, label_bytes)) if v is None]
            raise BadSample("missing_key", f"missing {' and '.join(missing)} (has {sorted(fields)})")
        return self.latent(latent_bytes), self.label(label_bytes)
