"""The streaming loader: batches of scaled latents and labels with exact resume.

Sample order is a pure function of (seed, epoch, rank, world_size, num_workers, batch_size,
shuffle_buffer) and the shard list. The trainer-side iterator records, for every stream, how far
the batches it has handed out reach; `state_dict()` returns that, and a loader restored from it
continues with exactly the batches an uninterrupted one would have produced (docs/data.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moedit.data.config import DataConfig
from moedit.data.manifest import (
    Manifest, directory_shards, load_manifest, manifest_path, resolve_shards, same_directory,
)
from moedit.data.samples import REASONS, DataError
from moedit.data.stream import Stream, StreamPlan, epoch_rank_shards
from moedit.errors import MoeditError

STATE_VERSION = 1

log = logging.getLogger("moedit.data")


class _StreamDataset(IterableDataset):
    """DataLoader worker i serves stream (i + rotation) % num_streams from its saved position.

    torch's DataLoader asks its workers in turn and hands out their batches in that order,
    skipping a worker once it is exhausted; rotating the worker->stream map lets a resumed
    loader start the cycle at the stream the interrupted one would have asked next.
    """

    def __init__(self, plan: StreamPlan, epoch: int, stream_shards: list[list[int] | None],
                 positions: list[int], rotation: int):
        self.plan, self.epoch = plan, epoch
        self.stream_shards, self.positions, self.rotation = stream_shards, positions, rotation

    def stream_records(self, stream: int) -> Iterator[tuple[Any, Any, Any, dict]]:
        return Stream(self.plan, self.epoch, stream, self.stream_shards[stream]).records(self.positions[stream])

    def __iter__(self) -> Iterator[tuple[Any, Any, Any, dict]]:
        info = get_worker_info()
        if info is None:
            return self.stream_records(0)
        torch.set_num_threads(1)  # workers only copy bytes; don't fight the trainer for cores
        return self.stream_records((info.id + self.rotation) % self.plan.num_streams)


def _identity(item: Any) -> Any:
    return item


class ShardLoader:
    """Iterate for one epoch of `(latents (B, C, H, W) float32, labels (B,) int64)` batches, or
    `(latents, labels, fields)` when data.fields names fields (fields: {name: tensor (B, ...) of
    the stored dtype, or a list of B strings}; text float16 (B, L, D), text_mask bool (B, L)).

    Each `iter()` continues the current epoch from where the previous one stopped (or from a
    loaded state) and, when the epoch is exhausted, moves to the next. In resampled mode the
    iteration never ends. `forever()` chains epochs for step-based training.
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, plan: StreamPlan):
        self.cfg, self.manifest, self.plan = cfg, manifest, plan
        self.num_streams = plan.num_streams
        self.epoch = 0
        self._counters: dict[str, float] = self._zero_counters()
        self._epoch_skipped = 0
        self._start_epoch(0)

    # ---- sample order -------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._positions = [0] * self.num_streams
        self._next_stream = 0
        self._epoch_skipped = 0
        self._rank_shards = None if self.plan.resampled else epoch_rank_shards(self.plan, epoch)

    def _stream_shards(self) -> list[list[int] | None]:
        if self._rank_shards is None:
            return [None] * self.num_streams
        return [self._rank_shards[s :: self.num_streams] for s in range(self.num_streams)]

    def _stream_lengths(self) -> list[int]:
        return [sum(self.plan.counts[i] for i in ids or []) for ids in self._stream_shards()]

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch (0 in resampled mode: there are no epochs); with
        split = sample that is the whole dataset, of which it keeps 1 / world_size."""
        return 0 if self._rank_shards is None else sum(self.plan.counts[i] for i in self._rank_shards)

    def batches_per_epoch(self) -> int:
        """Batches of a full epoch of this rank, if no sample is bad (each stream ends on its own batch)."""
        b = self.plan.read_batch_size
        lengths = self._stream_lengths()
        return sum(n // b if self.cfg.drop_last else -(-n // b) for n in lengths)

    def __len__(self) -> int:
        """Batches per full epoch (see batches_per_epoch); resampled loaders have no length."""
        if self._rank_shards is None:
            raise TypeError("a resampled loader has no length: it never ends")
        return self.batches_per_epoch()

    def _epoch_done(self) -> bool:
        return self._rank_shards is not None and self._positions == self._stream_lengths()

    # ---- iteration ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple]:
        if self._epoch_done():
            self._start_epoch(self.epoch + 1)
        dataset = _StreamDataset(self.plan, self.epoch, self._stream_shards(), list(self._positions), self._next_stream)
        if self.cfg.num_workers == 0:
            records: Iterator = dataset.stream_records(0)
        else:
            records = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor, collate_fn=_identity,
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            ))
        while True:
            start = time.perf_counter()
            try:
                latents, labels, fields, info = next(records)
            except StopIteration:
                break
            finally:
                self._counters["wait_time_s"] += time.perf_counter() - start
            self._account(info)
            if labels is not None and len(labels):
                self._counters["batches"] += 1
                self._counters["samples"] += len(labels)
                yield (latents, labels) if fields is None else (latents, labels, fields)
        if self._rank_shards is not None and self._epoch_done():
            self._start_epoch(self.epoch + 1)

    def forever(self) -> Iterator[tuple]:
        """Batches across epoch boundaries, without end."""
        while True:
            produced = False
            for batch in self:
                produced = True
                yield batch
            if not produced:
                raise MoeditError(f"data.path {self.cfg.path!r}: an epoch of rank {self.plan.rank} produced no batch")

    def _account(self, info: dict) -> None:
        """Record a record's effect on positions and counters; raise on bad data or too many skips."""
        if "error" in info:
            shard, key, reason, problem = info["error"]
            raise DataError(shard, key, reason, problem)
        stream = info["stream"]
        self._positions[stream] = info["pos"]
        self._next_stream = (stream + 1) % self.num_streams
        self._counters["samples_read"] += info["raw"]
        self._counters["dropped_remainder"] += info.get("dropped", 0)
        for reason, count in info["skipped"].items():
            self._counters[f"skipped_{reason}"] += count
            self._counters["skipped"] += count
            self._epoch_skipped += count
        if info["skipped"]:
            self._check_skip_budget()

    def _check_skip_budget(self) -> None:
        # Per epoch against the rank's share of the data, so that one bad sample early in an
        # epoch does not count as 100% (resampled mode: against everything read so far).
        if self._rank_shards is not None:  # with split_samples every rank reads (and counts) all shards
            base, skipped = self.samples_per_epoch, self._epoch_skipped
        else:
            share = self.manifest.num_samples // self.plan.reader_world
            base, skipped = max(int(self._counters["samples_read"]), share), int(self._counters["skipped"])
        if skipped > self.cfg.max_skip_fraction * base:
            detail = ", ".join(f"{r} {int(self._counters[f'skipped_{r}'])}" for r in REASONS if self._counters[f"skipped_{r}"])
            raise MoeditError(
                f"data: {skipped} bad samples skipped on rank {self.plan.rank} (epoch {self.epoch}: {detail}), "
                f"more than data.max_skip_fraction = {self.cfg.max_skip_fraction} of {base}; "
                f"check the shards under {self.cfg.path}"
            )

    # ---- counters and state -------------------------------------------------------------
    @staticmethod
    def _zero_counters() -> dict[str, float]:
        names = ["samples", "batches", "samples_read", "skipped", "dropped_remainder", "wait_time_s"]
        return {name: 0 for name in names + [f"skipped_{r}" for r in REASONS]}

    def stats(self) -> dict[str, float]:
        """Counters since the start of training (restored on resume): samples and batches handed
        out, samples read, skipped in total and per reason, dropped remainders, and seconds the
        trainer waited for data."""
        out = dict(self._counters)
        out["epoch"] = self.epoch
        return out

    def _fingerprint(self) -> str:
        names = "\n".join(os.path.basename(u) for u in self.plan.urls)
        return hashlib.sha256(f"{names}\n{self.plan.counts}".encode()).hexdigest()[:16]

    def _settings(self) -> dict[str, Any]:
        p = self.plan
        return {"seed": p.seed, "rank": p.rank, "world_size": p.world_size, "num_streams": p.num_streams,
                "batch_size": p.batch_size, "shuffle": p.shuffle, "shuffle_buffer": p.block,
                "resampled": p.resampled, "drop_last": p.drop_last, "split_samples": p.split_samples,
                "dataset": self._fingerprint()}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats and strings (loadable with torch.load(weights_only=True))."""
        names = None if self._rank_shards is None else [os.path.basename(self.plan.urls[i]) for i in self._rank_shards]
        return {"version": STATE_VERSION, "settings": self._settings(), "epoch": self.epoch,
                "shard_order": names, "positions": list(self._positions), "next_stream": self._next_stream,
                "epoch_skipped": self._epoch_skipped, "counters": dict(self._counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION}")
        ours = self._settings()
        changed = {k: (v, ours.get(k)) for k, v in state["settings"].items() if ours.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items()))
            raise ValueError(f"cannot resume the data loader exactly: {detail}; "
                             "use the saved settings or start the loader fresh")
        self.epoch = int(state["epoch"])
        if state["shard_order"] is None:
            self._rank_shards = None
        else:
            index = {os.path.basename(u): i for i, u in enumerate(self.plan.urls)}
            self._rank_shards = [index[name] for name in state["shard_order"]]
        self._positions = [int(p) for p in state["positions"]]
        self._next_stream = int(state["next_stream"])
        self._epoch_skipped = int(state["epoch_skipped"])
        self._counters = self._zero_counters() | {k: v for k, v in state["counters"].items()}


def _check_manifest_directories(data_cfg: DataConfig, manifest: Manifest, json_path: str, report: bool) -> None:
    """Shards the manifest lists but the directory lacks: an error under data.bad_data = raise; under
    skip a warning, and their samples are counted as skipped (`missing_shard`) when they come up.
    `*.tar` files the manifest does not list are not read: a warning names them."""
    for part in filter(None, data_cfg.path.split("::")):
        if part.startswith("pipe:") or "://" in part or not os.path.isdir(part):
            continue
        if not same_directory(part, manifest.root):
            continue
        _, missing, extra = directory_shards(manifest, part)
        names = lambda paths: ", ".join(os.path.basename(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
        if missing:
            lost = sum(manifest.shard(p).num_samples for p in missing)
            what = (f"{len(missing)} of the {len(manifest.shards)} shards listed in {json_path} are missing from "
                    f"{part} ({names(missing)}; {lost} of {manifest.num_samples} samples)")
            if data_cfg.bad_data == "raise":
                raise MoeditError(
                    f"{what}: restore them, re-index the directory with `moedit prepare --source shards "
                    f"--output DIR`, or set data.bad_data=skip to count their samples as skipped")
            if report:
                log.warning("%s: their samples are skipped and counted (data/skipped_missing_shard)", what)
        if extra and report:
            log.warning("%s: %d *.tar file(s) not listed in %s are not read: %s (index them with "
                        "`moedit prepare --source shards --output DIR` to use them)",
                        part, len(extra), json_path, names(extra))


def build_loader(data_cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> ShardLoader:
    """The loader of one data-parallel rank. See ShardLoader."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: use 1 or more")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
    json_path = manifest_path(data_cfg)
    if not os.path.isfile(json_path):
        resolve_shards(data_cfg.path)  # first: "shards not found" is the likelier mistake
    manifest = load_manifest(json_path)
    if manifest.num_samples == 0:
        raise MoeditError(f"{data_cfg.path}: the manifest lists no samples")
    urls = resolve_shards(data_cfg.path, manifest)
    _check_manifest_directories(data_cfg, manifest, json_path, report=rank == 0)
    infos = [manifest.shard(u) for u in urls]
    fields = tuple((name, *manifest.field_spec(name)) for name in data_cfg.fields)
    if not data_cfg.resampled and data_cfg.split == "shard" and len(urls) < world_size:
        raise MoeditError(
            f"data.path {data_cfg.path!r} has {len(urls)} shards, fewer than the {world_size} data-parallel "
            "ranks: every rank needs at least one shard (prepare with a smaller --shard-size)"
        )
    plan = StreamPlan(
        urls=tuple(urls), counts=tuple(i.num_samples for i in infos), sha256=tuple(i.sha256 for i in infos),
        latent_shape=tuple(manifest.latent_shape), latent_dtype=manifest.latent_dtype,
        num_classes=manifest.num_classes, scaling_factor=float(manifest.scaling_factor),
        shift_factor=float(manifest.shift_factor), batch_size=batch_size, block=data_cfg.shuffle_buffer,
        shuffle=data_cfg.shuffle, resampled=data_cfg.resampled, drop_last=data_cfg.drop_last,
        skip_bad=data_cfg.bad_data == "skip", verify_checksums=data_cfg.verify_checksums, seed=seed, rank=rank,
        world_size=world_size, num_streams=max(1, data_cfg.num_workers), split_samples=data_cfg.split == "sample",
        check_finite=data_cfg.check_finite, fields=fields,
    )
    return ShardLoader(data_cfg, manifest, plan)
