"""Shard format: prepare -> load round trip, interop with webdataset and tar, reproducible bytes."""

from __future__ import annotations

import glob
import os
import subprocess

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from moedit.data import DataConfig, build_loader, load_manifest
from moedit.cli import main as cli_main
from moedit.data.index import index_shards
from moedit.errors import MoeditError
from moedit.data.prepare import PrepareSpec, prepare
from moedit.data.sources import SourceSpec


def digits_reference() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.images.astype(np.float32) / 16 * 2 - 1, digits.target


def load_all(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build_loader(DataConfig(path=root, num_workers=0, shuffle=False), batch_size=512)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("digits32"))
    prepare(PrepareSpec(SourceSpec("digits"), channels=1, dtype="float32", shard_size=400), root, progress=False)
    return root


def test_float32_round_trip_is_bit_exact(digits32):
    images, labels = digits_reference()
    latents, loaded_labels = load_all(digits32)
    assert latents.shape == (1797, 1, 8, 8)
    assert torch.equal(latents[:, 0], torch.from_numpy(images))
    assert torch.equal(loaded_labels, torch.from_numpy(labels))
    manifest = load_manifest(digits32)
    assert (manifest.num_samples, manifest.latent_shape, manifest.num_classes) == (1797, [1, 8, 8], 10)
    assert [s.num_samples for s in manifest.shards] == [400, 400, 400, 400, 197]


def test_float16_round_trip_is_float16_rounding(tmp_path):
    prepare(PrepareSpec(SourceSpec("digits", num_samples=300), channels=1, dtype="float16", shard_size=128),
            str(tmp_path), progress=False)
    images, _ = digits_reference()
    latents, _ = load_all(str(tmp_path))
    expected = torch.from_numpy(images[:300].astype(np.float16).astype(np.float32))
    assert torch.equal(latents[:, 0], expected)
    assert (latents[:, 0] - torch.from_numpy(images[:300])).abs().max() <= 2**-11  # half ulp at |x| <= 1


def test_shards_open_with_plain_webdataset_and_tar(digits32):
    import webdataset as wds

    first = sorted(glob.glob(os.path.join(digits32, "*.tar")))[0]
    listing = subprocess.run(["tar", "-tf", first], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:4] == ["000000000.cls", "000000000.npy", "000000001.cls", "000000001.npy"]
    assert len(listing) == 800
    samples = list(wds.WebDataset(first, shardshuffle=False, empty_check=False).decode().to_tuple("npy", "cls"))
    images, labels = digits_reference()
    assert len(samples) == 400
    assert np.array_equal(np.stack([s[0] for s in samples])[:, 0], images[:400])
    assert [s[1] for s in samples] == labels[:400].tolist()


def test_shards_written_by_webdataset_shardwriter_load(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((23, 4, 3, 3)).astype(np.float16)
    with wds.ShardWriter(str(tmp_path / "part-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i, latent in enumerate(latents):
            sink.write({"__key__": f"img{i:04d}", "npy": latent, "cls": i % 7})
    args = ["prepare", "--source", "shards", "--output", str(tmp_path), "--num-classes", "7", "--scaling-factor", "0.5"]
    assert cli_main(args) == 0
    manifest = load_manifest(str(tmp_path))
    assert [s.num_samples for s in manifest.shards] == [10, 10, 3]
    assert (manifest.latent_shape, manifest.latent_dtype) == ([4, 3, 3], "float16")
    loaded, labels = load_all(str(tmp_path))
    assert torch.equal(loaded, torch.from_numpy(latents.astype(np.float32)) * 0.5)
    assert labels.tolist() == [i % 7 for i in range(23)]


def test_preparation_is_byte_identical_across_runs_and_process_counts(tmp_path):
    spec = PrepareSpec(SourceSpec("digits", num_samples=250), channels=1, image_size=16, flip=True, shard_size=100)
    prepare(spec, str(tmp_path / "a"), workers=1, progress=False)
    prepare(spec, str(tmp_path / "b"), workers=2, progress=False)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    assert [n for n in names if n.endswith(".tar")] == [f"shard-{i:06d}.tar" for i in range(5)]
    for name in names:
        if os.path.isfile(tmp_path / "a" / name):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    latents, labels = load_all(str(tmp_path / "a"))
    assert latents.shape == (500, 1, 16, 16)
    assert torch.equal(latents[1], latents[0].flip(-1))  # sample 2i + 1 is the flip of 2i
    assert torch.equal(labels[0::2], labels[1::2])


def test_indexing_names_the_bad_sample(tmp_path):
    import webdataset as wds

    with wds.ShardWriter(str(tmp_path / "part-%06d.tar"), maxcount=10, verbose=0) as sink:
        sink.write({"__key__": "fine", "npy": np.zeros((2, 2, 2), np.float32), "cls": 1})
        sink.write({"__key__": "odd", "npy": np.zeros((2, 2, 2), np.float32), "cls": 9})
    with pytest.raises(MoeditError, match=r"part-000000.tar, sample odd: label 9 out of range \[0, 7\)"):
        index_shards(str(tmp_path), num_classes=7)
