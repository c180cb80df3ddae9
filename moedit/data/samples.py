"""Decoding and checking one sample: `KEY.npy` (latent C x H x W), `KEY.cls` (class index), and
named extra fields: arrays as `KEY.<name>.npy`, strings as `KEY.<name>` (the caption: `KEY.txt`)."""

from __future__ import annotations

import ast
import math
import re

import numpy as np

from moedit.errors import MoeditError

LATENT_KEY = "npy"
LABEL_KEY = "cls"
METADATA_KEY = "json"

STRING_DTYPE = "str"
"""Manifest dtype of a string field (UTF-8 text stored as `KEY.<name>`, e.g. the caption `KEY.txt`)."""
FIELD_DTYPES = ("float16", "float32", "bool", "uint8", "int32", "int64", STRING_DTYPE)
RESERVED_FIELDS = (LATENT_KEY, LABEL_KEY, METADATA_KEY)
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")


def field_member(name: str, dtype: str) -> str:
    """The member extension of field `name`: `<name>.npy` for arrays, `<name>` for strings."""
    return name if dtype == STRING_DTYPE else f"{name}.npy"


def check_field_name(name: str, where: str) -> None:
    """Field names are lowercase identifiers (no dots: a dot would end the WebDataset key)."""
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or name in RESERVED_FIELDS:
        raise ValueError(f"{where}: field name {name!r} must be a lowercase identifier ([a-z][a-z0-9_]*) "
                         f"other than {', '.join(RESERVED_FIELDS)}")

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
                 check_finite: bool = False, fields: tuple[tuple[str, str, tuple[int, ...]], ...] = ()):
        self.shape = tuple(latent_shape)
        self.fields = tuple((name, dtype, tuple(shape), field_member(name, dtype)) for name, dtype, shape in fields)
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

    def array(self, data: bytes | memoryview, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
        """A `.npy` member as an array view of `data` (no copy), checked against shape and dtype."""
        stored_dtype, stored_shape, fortran, offset = self._header(data)
        if stored_shape != shape:
            raise BadSample("wrong_shape", f"{what} shape {stored_shape}, manifest says {shape}")
        if stored_dtype != dtype:
            raise BadSample("wrong_dtype", f"{what} dtype {stored_dtype}, manifest says {dtype}")
        count = math.prod(shape)
        if len(data) - offset != count * dtype.itemsize:
            of = "" if what == "latent" else f" of {what}"  # the latent's message predates named fields
            raise BadSample("bad_array", f".npy{of} holds {len(data) - offset} data bytes, expected {count * dtype.itemsize}")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)

    def latent(self, data: bytes | memoryview) -> np.ndarray:
        """The latent as a (C, H, W) array view of `data` (no copy)."""
        array = self.array(data, self.shape, self.dtype, "latent")
        if self.check_finite and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise BadSample("non_finite", f"latent holds {bad} NaN or infinite value(s) of {array.size}")
        return array

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

    def extra_fields(self, fields: dict[str, bytes | memoryview]) -> dict[str, np.ndarray | str]:
        """The requested named fields of a sample: arrays checked against the manifest, strings decoded."""
        out: dict[str, np.ndarray | str] = {}
        for name, dtype, shape, member in self.fields:
            data = fields.get(member)
            if data is None:
                raise BadSample("missing_key", f"missing field {name!r} (member .{member}; has {sorted(fields)})")
            if dtype == STRING_DTYPE:
                try:
                    out[name] = bytes(data).decode("utf-8")
                except UnicodeDecodeError:
                    raise BadSample("bad_array", f"field {name!r} (.{member}) is not UTF-8 text") from None
            else:
                out[name] = self.array(data, shape, np.dtype(dtype), f"field {name!r}")
        return out
