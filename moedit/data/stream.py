"""One worker's stream of batches: shards -> samples -> block shuffle -> checked batches.

A rank's shards (with split_samples: all shards) are dealt to `num_streams` streams (one per DataLoader worker). A stream is the
concatenation of its shards' samples; position p counts samples of that concatenation. Samples
are permuted within blocks of `block` consecutive positions, with a permutation that depends only
on (seed, epoch, rank, stream, block index). So a stream can restart at any position by reading
one block: that is what makes resume exact without saving shuffle buffers.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moedit.data.samples import STRING_DTYPE, BadSample, SampleDecoder
from moedit.data.tario import RawSample, ShardError, iter_samples, read_shard_bytes

log = logging.getLogger("moedit.data")

# Distinct constants keep the random streams for different purposes independent.
TAG_SHARD_ORDER, TAG_BLOCK, TAG_RESAMPLE = 11, 23, 37
RESAMPLE_CHUNK = 1024
MAX_LOGGED_SKIPS = 10


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs, picklable."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sha256: tuple[str, ...]
    latent_shape: tuple[int, int, int]
    latent_dtype: str
    num_classes: int
    scaling_factor: float
    shift_factor: float
    batch_size: int
    block: int
    shuffle: bool
    resampled: bool
    drop_last: bool
    skip_bad: bool
    verify_checksums: bool
    seed: int
    rank: int
    world_size: int
    num_streams: int
    split_samples: bool = False
    """Every rank reads all shards and keeps samples rank::world_size of each global batch."""
    check_finite: bool = False
    """Check every latent for NaN and infinity (data.check_finite)."""
    fields: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    """Named fields to return, (name, dtype, shape) as the manifest lists them (data.fields)."""

    @property
    def reader_rank(self) -> int:
        """The rank whose stream this rank reads (with split_samples all ranks read rank 0's)."""
        return 0 if self.split_samples else self.rank

    @property
    def reader_world(self) -> int:
        return 1 if self.split_samples else self.world_size

    @property
    def read_batch_size(self) -> int:
        """Samples per batch of the stream: the global batch when ranks split samples."""
        return self.batch_size * (self.world_size if self.split_samples else 1)


def rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def epoch_rank_shards(plan: StreamPlan, epoch: int) -> list[int]:
    """Indices of this rank's shards for an epoch, in reading order."""
    order = np.arange(len(plan.urls))
    if plan.shuffle:
        order = rng(plan.seed, epoch, TAG_SHARD_ORDER).permutation(len(plan.urls))
    return [int(i) for i in order[plan.reader_rank :: plan.reader_world]]


@dataclass
class BadEntry:
    """A stream position whose sample cannot be used."""

    shard: str
    key: str | None
    reason: str
    problem: str


class ShardSequence:
    """The shards of one stream: a finite list, or endless random draws (resampled mode)."""

    def __init__(self, plan: StreamPlan, stream: int, shard_ids: list[int] | None):
        self.plan, self.stream = plan, stream
        self.ids: list[int] = list(shard_ids) if shard_ids is not None else []
        self.finite = shard_ids is not None
        self.starts = [0]
        for i in self.ids:
            self.starts.append(self.starts[-1] + plan.counts[i])

    @property
    def length(self) -> int | None:
        return self.starts[-1] if self.finite else None

    def _draw_more(self) -> None:
        chunk = len(self.ids) // RESAMPLE_CHUNK
        draws = rng(self.plan.seed, self.plan.reader_rank, self.stream, chunk, TAG_RESAMPLE).integers(
            0, len(self.plan.urls), RESAMPLE_CHUNK
        )
        for i in draws:
            self.ids.append(int(i))
            self.starts.append(self.starts[-1] + self.plan.counts[int(i)])

    def locate(self, pos: int) -> tuple[int, int]:
        """(j, offset): position pos is sample `offset` of the stream's j-th shard."""
        while not self.finite and self.starts[-1] <= pos:
            self._draw_more()
        j = bisect.bisect_right(self.starts, pos) - 1
        return j, pos - self.starts[j]


def load_shard_entries(plan: StreamPlan, shard_id: int) -> list[RawSample | BadEntry]:
    """Exactly `counts[shard_id]` entries for a shard; unreadable parts become BadEntry."""
    url, expected = plan.urls[shard_id], plan.counts[shard_id]
    if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url):
        return [BadEntry(url, None, "missing_shard", "listed in the manifest but missing from the directory")] * expected
    entries: list[RawSample | BadEntry] = []
    reason, problem = "", ""
    try:
        data = read_shard_bytes(url)
        verified = bool(plan.verify_checksums and plan.sha256[shard_id])
        if verified:
            digest = hashlib.sha256(data).hexdigest()
            if digest != plan.sha256[shard_id]:
                return [BadEntry(url, None, "checksum", f"sha256 {digest[:12]}.. != manifest {plan.sha256[shard_id][:12]}..")] * expected
        entries.extend(iter_samples(data, url, check_headers=not verified))
    except ShardError as exc:
        reason, problem = "corrupt_shard", exc.problem
    if len(entries) > expected:
        problem = f"holds {len(entries)} samples, the manifest lists {expected}: re-index the shards"
        return [BadEntry(url, None, "corrupt_shard", problem)] * expected
    if len(entries) < expected:
        problem = problem or f"holds {len(entries)} samples, the manifest lists {expected}"
        entries.extend([BadEntry(url, None, reason or "corrupt_shard", problem)] * (expected - len(entries)))
    return entries


class Stream:
    """Yields (latents, labels, fields, info) records for one stream from a start position
    (fields: {name: batched tensor or list of strings}, None when the plan asks for none)."""

    def __init__(self, plan: StreamPlan, epoch: int, stream: int, shard_ids: list[int] | None):
        self.plan, self.epoch, self.stream = plan, epoch, stream
        self.shards = ShardSequence(plan, stream, shard_ids)
        self.decoder = SampleDecoder(plan.latent_shape, plan.latent_dtype, plan.num_classes, plan.check_finite,
                                     plan.fields)
        self._cached: tuple[int, list[RawSample | BadEntry]] | None = None
        self._logged = 0

    def _shard_entries(self, j: int) -> list[RawSample | BadEntry]:
        if self._cached is None or self._cached[0] != j:
            self._cached = (j, load_shard_entries(self.plan, self.shards.ids[j]))
        return self._cached[1]

    def read(self, lo: int, hi: int) -> list[RawSample | BadEntry]:
        """Entries of stream positions [lo, hi)."""
        out: list[RawSample | BadEntry] = []
        j, offset = self.shards.locate(lo)
        while len(out) < hi - lo:
            self.shards.locate(self.shards.starts[j])  # extends resampled draws as needed
            entries = self._shard_entries(j)
            out.extend(entries[offset : offset + (hi - lo - len(out))])
            j, offset = j + 1, 0
        return out

    def block_order(self, block: int, size: int) -> np.ndarray:
        if not self.plan.shuffle or size == 1:
            return np.arange(size)
        key = (self.plan.seed, self.epoch, self.plan.reader_rank, self.stream, block, TAG_BLOCK)
        return rng(*key).permutation(size)

    def records(self, start: int) -> Iterator[tuple[Any, Any, Any, dict]]:
        plan, length = self.plan, self.shards.length
        batch = _BatchBuilder(plan)
        pos = start
        while length is None or pos < length:
            block = pos // plan.block
            lo = block * plan.block
            hi = lo + plan.block if length is None else min(lo + plan.block, length)
            entries = self.read(lo, hi)
            order = self.block_order(block, hi - lo)
            for k in range(pos - lo, hi - lo):
                entry = entries[order[k]]
                pos = lo + k + 1
                if not isinstance(entry, BadEntry):
                    try:
                        latent, label = self.decoder.decode(entry.fields)
                        extras = self.decoder.extra_fields(entry.fields) if plan.fields else None
                    except BadSample as bad:
                        url = self._url_of(lo + int(order[k]))
                        entry = BadEntry(url, entry.key, bad.reason, bad.problem)
                    else:
                        batch.add(latent, label, extras)
                if isinstance(entry, BadEntry):
                    if not plan.skip_bad:
                        yield None, None, None, self._info(pos, batch, error=entry)
                        return
                    self._log_skip(entry)
                    batch.skip(entry.reason)
                if batch.full():
                    yield batch.emit(self._info(pos, batch))
        if batch.pending():
            yield batch.emit(self._info(pos, batch), drop=plan.drop_last)

    def _url_of(self, pos: int) -> str:
        j, _ = self.shards.locate(pos)
        return self.plan.urls[self.shards.ids[j]]

    def _info(self, pos: int, batch: "_BatchBuilder", error: BadEntry | None = None) -> dict:
        info: dict[str, Any] = {"stream": self.stream, "pos": pos, "raw": batch.raw, "skipped": dict(batch.skipped)}
        if error is not None:
            info["error"] = (error.shard, error.key, error.reason, error.problem)
        return info

    def _log_skip(self, entry: BadEntry) -> None:
        self._logged += 1
        if self._logged <= MAX_LOGGED_SKIPS:
            log.warning("skipping bad sample: shard %s, sample %s: %s (%s)", entry.shard, entry.key, entry.problem, entry.reason)
            if self._logged == MAX_LOGGED_SKIPS:
                log.warning("further skips of stream %d are counted, not logged", self.stream)


class _BatchBuilder:
    """Collects samples into a staging array of the stored dtype (a memcpy per sample); `emit`
    converts the whole batch to float32 in one torch call, several times faster than numpy's
    per-sample float16 -> float32 cast."""

    def __init__(self, plan: StreamPlan):
        self.plan = plan
        self.stage = np.empty((plan.read_batch_size, *plan.latent_shape), plan.latent_dtype)
        self.field_stage = {name: np.empty((plan.read_batch_size, *shape), dtype)
                            for name, dtype, shape in plan.fields if dtype != STRING_DTYPE}
        self._new()

    def _new(self) -> None:
        self.labels = np.empty(self.plan.read_batch_size, np.int64)
        self.strings: dict[str, list[str]] = {name: [] for name, dtype, _ in self.plan.fields if dtype == STRING_DTYPE}
        self.n = 0
        self.raw = 0  # stream positions consumed into this record, good or bad
        self.skipped: dict[str, int] = {}

    def add(self, latent: np.ndarray, label: int, extras: dict[str, Any] | None = None) -> None:
        self.stage[self.n] = latent
        self.labels[self.n] = label
        for name, value in (extras or {}).items():
            if name in self.strings:
                self.strings[name].append(value)
            else:
                self.field_stage[name][self.n] = value
        self.n += 1
        self.raw += 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.raw += 1

    def full(self) -> bool:
        return self.n == self.plan.read_batch_size

    def pending(self) -> bool:
        return self.raw > 0

    def emit(self, info: dict, drop: bool = False) -> tuple[Any, Any, Any, dict]:
        # Ranks that split samples must stay in lockstep: a global remainder too small to give
        # every rank a sample is dropped (and counted) on all of them alike.
        drop = drop or (self.plan.split_samples and self.n < self.plan.world_size)
        n = 0 if drop else self.n
        if drop:
            info["dropped"] = self.n
        keep = slice(self.plan.rank, n, self.plan.world_size) if self.plan.split_samples else slice(0, n)
        latents = torch.from_numpy(np.ascontiguousarray(self.stage[keep])).to(torch.float32, copy=True)  # (b, C, H, W)
        if self.plan.shift_factor != 0.0:
            latents.sub_(self.plan.shift_factor)
        if self.plan.scaling_factor != 1.0:
            latents.mul_(self.plan.scaling_factor)
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[keep]))
        fields = None
        if self.plan.fields:
            # copies: the stage is reused by the next batch
            fields = {name: torch.from_numpy(stage[keep].copy()) for name, stage in self.field_stage.items()}
            fields.update({name: values[keep] for name, values in self.strings.items()})
        self._new()
        return latents, labels, fields, info
