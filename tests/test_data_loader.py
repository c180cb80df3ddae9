"""Streaming loader: coverage per epoch over ranks and workers, exact resume, URLs, scaling."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from moedit.data import DataConfig, DataError, build_decoder, build_loader, load_manifest
from test_data_helpers import make_dataset, sample_ids

NUM_SAMPLES, SHARD_SIZE = 53, 5  # 11 shards, the last one short


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    make_dataset(root, NUM_SAMPLES, SHARD_SIZE)
    return root


def epoch_ids(root, world_size, workers, batch_size=4, seed=0, **cfg):
    """Sample ids each rank sees in its first two epochs."""
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(DataConfig(path=root, num_workers=workers, shuffle_buffer=7, **cfg),
                              batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
        expected, batches = [], []
        for _ in range(2):  # a rank's shards, so its batch count, change with the epoch
            expected.append(len(loader))
            batches.append(list(loader))
        assert [len(b) for b in batches] == expected and loader.epoch == 2
        epochs = [[i for x, _ in epoch for i in sample_ids(x)] for epoch in batches]
        per_rank.append(epochs)
    return per_rank


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 1), (3, 2), (4, 0)])
def test_every_sample_exactly_once_per_epoch(shards, world_size, workers):
    per_rank = epoch_ids(shards, world_size, workers)
    for epoch in range(2):
        seen = [i for rank in per_rank for i in rank[epoch]]
        assert sorted(seen) == list(range(NUM_SAMPLES)), f"epoch {epoch}: duplicates or gaps"
    # a new epoch reshuffles
    assert [r[0] for r in per_rank] != [r[1] for r in per_rank]


def test_order_is_seeded_and_unshuffled_order_is_file_order(shards):
    assert epoch_ids(shards, 1, 0, seed=3) == epoch_ids(shards, 1, 0, seed=3)
    assert epoch_ids(shards, 1, 0, seed=3) != epoch_ids(shards, 1, 0, seed=4)
    plain = epoch_ids(shards, 1, 0, shuffle=False)[0]
    assert plain == [list(range(NUM_SAMPLES))] * 2


def take(iterator, n):
    return [sample_ids(x) for x, _ in itertools.islice(iterator, n)]


@pytest.mark.parametrize("workers,resampled,stop_after", [(0, False, 9), (2, False, 3), (2, False, 14),
                                                          (2, True, 11), (1, False, 5)])
def test_resume_reproduces_the_uninterrupted_sequence(shards, tmp_path, workers, resampled, stop_after):
    cfg = DataConfig(path=shards, num_workers=workers, shuffle_buffer=6, resampled=resampled)
    total = 40  # crosses at least one epoch boundary (14 batches per epoch at 2 workers)
    reference = take(build_loader(cfg, batch_size=4, rank=1, world_size=2, seed=5).forever(), total)

    first = build_loader(cfg, batch_size=4, rank=1, world_size=2, seed=5)
    head = take(first.forever(), stop_after)
    torch.save({"data": first.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["data"]  # as a checkpoint would
    resumed = build_loader(cfg, batch_size=4, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    tail = take(resumed.forever(), total - stop_after)
    assert head + tail == reference
    assert resumed.stats()["samples"] == sum(len(b) for b in reference)


def test_resume_refuses_changed_settings(shards):
    loader = build_loader(DataConfig(path=shards, num_workers=0), batch_size=4, rank=0, world_size=2, seed=0)
    next(iter(loader))
    other = build_loader(DataConfig(path=shards, num_workers=0), batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="world_size: saved 2, now 1"):
        other.load_state_dict(loader.state_dict())


def test_brace_patterns_and_pipe_urls(shards):
    pattern = os.path.join(shards, "shard-{000000..000010}.tar")
    piped = f"pipe:cat {pattern}"
    manifest = os.path.join(shards, "dataset.json")
    assert load_manifest(pattern).num_samples == load_manifest(manifest).num_samples == NUM_SAMPLES
    for path in (pattern, piped):
        cfg = DataConfig(path=path, manifest=manifest, num_workers=0)
        ids = [i for x, _ in build_loader(cfg, batch_size=8) for i in sample_ids(x)]
        assert sorted(ids) == list(range(NUM_SAMPLES))
    broken = DataConfig(path=f"pipe:cat {shards}/shard-000003.tar.missing", manifest=manifest, num_workers=0)
    with pytest.raises(Exception, match="not listed"):
        build_loader(broken, batch_size=8)
    failing = DataConfig(path=f"pipe:cat {shards}/nope/shard-000003.tar", manifest=manifest, num_workers=0)
    with pytest.raises(DataError, match=r"shard pipe:cat .*shard-000003.tar: command exited with status 1"):
        list(build_loader(failing, batch_size=8))


def test_scaling_and_shift_from_manifest_and_decoder_inverts_them(tmp_path):
    root = str(tmp_path)
    make_dataset(root, 12, 4, shape=(3, 2, 2), dtype="float16", scaling_factor=0.5, shift_factor=2.0)
    loader = build_loader(DataConfig(path=root, num_workers=0, shuffle=False), batch_size=12)
    latents, labels = next(iter(loader))
    assert latents.dtype == torch.float32 and labels.dtype == torch.int64
    expected = (torch.arange(12, dtype=torch.float32) - 2.0) * 0.5
    assert torch.equal(latents[:, 1, 1, 0], expected)
    assert torch.equal(labels, torch.arange(12) % 10)
    decode = build_decoder(load_manifest(root))
    images = decode(latents)  # stored value v in [-1, 1] maps to (v + 1) / 2, clamped
    assert torch.equal(images[:, 0, 0, 0], torch.tensor([0.5] + [1.0] * 11))


@pytest.mark.parametrize("workers,drop_last", [(0, False), (2, False), (2, True)])
def test_sample_split_ranks_together_equal_one_process_batches(shards, workers, drop_last):
    cfg = DataConfig(path=shards, num_workers=workers, shuffle_buffer=7, split="sample", drop_last=drop_last)
    single = [sorted(sample_ids(x)) for x, _ in build_loader(cfg, batch_size=6, rank=0, world_size=1, seed=2)]
    loaders = [build_loader(cfg, batch_size=3, rank=r, world_size=2, seed=2) for r in range(2)]
    ranks = [[sample_ids(x) for x, _ in loader] for loader in loaders]
    assert len(ranks[0]) == len(ranks[1])  # lockstep: the same number of batches
    # a global remainder of 1 sample cannot feed 2 ranks: dropped on both and counted
    dropped = loaders[0].stats()["dropped_remainder"]
    assert dropped == loaders[1].stats()["dropped_remainder"]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [b for b in single if len(b) >= 2]
    seen = sorted(i for a, b in zip(*ranks) for i in a + b)
    assert len(seen) == len(set(seen)) == NUM_SAMPLES - dropped
