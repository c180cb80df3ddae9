"""The `data` section of a training config."""

from __future__ import annotations

from dataclasses import dataclass, field

from moedit.data.samples import check_field_name

BAD_DATA_POLICIES = ("raise", "skip")
SPLITS = ("shard", "sample")
BUILTIN_SOURCES = ("digits", "digits_text", "digits_repa", "synthetic")


@dataclass
class DataConfig:
    """Where the latent shards are and how the streaming loader reads them."""

    path: str = "data/digits"
    """Shards: a directory holding `*.tar` and `dataset.json`, a brace pattern
    (`/data/in1k/shard-{000000..000127}.tar`), a `pipe:` URL (`pipe:cat /x/shard-{0..7}.tar`)
    or several of these joined by `::`."""

    prepare: str | None = None
    """Built-in dataset to prepare into `path` when its dataset.json is missing: `digits`,
    `digits_text` (digits with captions made from the labels, encoded by a tiny random stand-in
    text encoder), `digits_repa` (digits with REPA features `repa`, float16 (64, 32): a fixed
    random map of the pixels pooled onto the 8 x 8 token grid) or `synthetic` (see
    moedit.data.prepare.prepare_builtin). None: the shards must exist. A `data.path`
    given on the command line is never filled with it (a typo must not become a fresh dataset)
    unless `data.prepare` is given on the command line too; `moedit train` names the error."""

    prepare_image_size: int | None = None
    """Image size for `prepare: digits` (None keeps the native 8x8)."""

    manifest: str | None = None
    """Path of `dataset.json`. Default: inside `path` if it is a directory, else in the directory
    of the first shard. Required for `pipe:` URLs."""

    fields: list[str] = field(default_factory=list)
    """Named per-sample fields the loader returns beside latents and labels, e.g. [text, text_mask]
    (see the manifest's `fields`). Empty: batches are (latents, labels); otherwise
    (latents, labels, {name: batched tensor}); text is float16 (B, L, D), text_mask bool (B, L),
    a string field (txt) a list of B strings. Every name must be listed in the manifest."""

    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process. Part of the sample
    order: a run must resume with the same value."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead of the trainer (ignored with num_workers = 0)."""

    pin_memory: bool = True
    """With num_workers > 0 and a CUDA device: copy each batch into page-locked memory on the
    DataLoader's pinning thread, so the training thread's host-to-device copy is asynchronous and
    pins nothing itself. Not part of the sample order."""

    split: str = "shard"
    """How data-parallel ranks share the data. `shard`: each rank reads its own shards (scales;
    ranks may see slightly different numbers of batches per epoch). `sample`: every rank reads
    all shards and keeps samples rank::world_size of each global batch of batch_size * world_size,
    so the ranks' batches together equal a 1-process run's and all ranks see the same number of
    batches (costs world_size x the reading; for small datasets and exact parity tests)."""

    shuffle: bool = True
    """Shuffle the shard order every epoch and samples within blocks of `shuffle_buffer`."""

    shuffle_buffer: int = 1000
    """Samples of one worker's stream permuted together (a block shuffle; 1 = no sample shuffle).
    Memory per worker is about this many encoded samples."""

    resampled: bool = False
    """Infinite mode: every worker draws shards at random with replacement and iteration never
    ends. Default: epochs in which every sample is seen exactly once."""

    drop_last: bool = False
    """Drop each worker's final partial batch of an epoch (counted in stats as `dropped_remainder`).
    Default keeps them, so batches can be smaller than batch_size at the end of an epoch."""

    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest when it is read (catches corrupted payloads
    that still parse); a mismatch counts as bad data for every sample of the shard."""

    check_finite: bool = False
    """Check every latent for NaN and infinity as it is read (one pass over each sample). A bad one is
    bad data (below) named by shard and sample; without the check the trainer's non-finite loss
    check finds it only as a NaN step, without its name."""

    bad_data: str = "raise"
    """What to do with a corrupt/truncated shard, a missing key, a wrong latent shape or dtype or a
    label out of range: `raise` (error naming shard, sample key and problem) or `skip` (count, log)."""

    max_skip_fraction: float = 0.01
    """With bad_data = skip: error once more than this fraction of a rank's samples per epoch
    has been skipped in the current epoch."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"data.path = {self.path!r}: give a shard directory, brace pattern or pipe: URL")
        if self.path.startswith("pipe:") and not self.manifest:
            raise ValueError(
                f"data.path = {self.path!r}: a pipe: URL needs data.manifest (the path of dataset.json)"
            )
        if self.prepare not in (None,) + BUILTIN_SOURCES:
            raise ValueError(f"data.prepare = {self.prepare!r}: use one of {', '.join(BUILTIN_SOURCES)} or null")
        if self.prepare_image_size is not None and self.prepare_image_size < 1:
            raise ValueError(f"data.prepare_image_size = {self.prepare_image_size}: use a positive size or null")
        if not isinstance(self.fields, (list, tuple)):
            raise ValueError(f"data.fields = {self.fields!r}: give a list of field names, e.g. [text, text_mask]")
        self.fields = list(self.fields)
        for name in self.fields:
            check_field_name(name, "data.fields")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"data.fields = {self.fields}: a field is named twice")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers = {self.num_workers}: use 0 (read in-process) or more")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor = {self.prefetch_factor}: use 1 or more")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer = {self.shuffle_buffer}: use 1 (no sample shuffle) or more")
        if self.split not in SPLITS:
            raise ValueError(f"data.split = {self.split!r}: use one of {', '.join(SPLITS)}")
        if self.bad_data not in BAD_DATA_POLICIES:
            raise ValueError(f"data.bad_data = {self.bad_data!r}: use one of {', '.join(BAD_DATA_POLICIES)}")
        if not 0.0 <= self.max_skip_fraction < 1.0:
            raise ValueError(f"data.max_skip_fraction = {self.max_skip_fraction}: use a value in [0, 1)")
