"""`moedit prepare --source shards` on shards made elsewhere that carry caption and REPA features:
the named fields are found in the first sample, checked on every shard, recorded with encoder
records of type unknown, and read back by the loader by name."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moedit.cli import main as cli_main
from moedit.data import DataConfig, build_loader, load_manifest
from moedit.data.index import index_shards
from moedit.data.prepare import npy_bytes
from moedit.data.tario import write_tar
from moedit.errors import MoeditError
from moedit.eval.prompts import run_text_encoder

L, D, GRID, C = 4, 6, 3, 5  # text (L, D), repa (GRID^2, C)
SHARD_SIZES = (3, 2)


def write_shards(root, *, text_length_of_shard1: int = L, drop_repa_of_shard1: bool = False) -> dict[int, dict]:
    """Two shards written by moedit's writer, as another pipeline would write them: latent (1, 2, 2)
    filled with the sample index, label, text, text_mask, caption, repa, an int64 field and a json
    member. Returns what was written, by sample index."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    written, index = {}, 0
    for shard, count in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(count):
            length = text_length_of_shard1 if shard == 1 else L
            sample = {"text": rng.standard_normal((length, D)).astype(np.float16),
                      "text_mask": np.arange(length) < 1 + index % length,
                      "repa": rng.standard_normal((GRID * GRID, C)).astype(np.float16),
                      "ids": np.arange(3, dtype=np.int64) + index, "txt": f"caption number {index}"}
            members = {"npy": npy_bytes(np.full((1, 2, 2), index, np.float32)), "cls": str(index % 2).encode(),
                       "txt": sample["txt"].encode(), "json": b"{}",
                       **{f"{name}.npy": npy_bytes(sample[name]) for name in ("text", "text_mask", "repa", "ids")}}
            if drop_repa_of_shard1 and shard == 1:
                del members["repa.npy"]
            samples.append((f"{index:06d}", members))
            written[index] = sample
            index += 1
        write_tar(os.path.join(root, f"part-{shard:06d}.tar"), samples)
    return written


def test_indexing_records_the_fields_and_the_loader_returns_them(tmp_path, capsys):
    root = tmp_path / "shards"
    written = write_shards(root)
    assert cli_main(["prepare", "--source", "shards", "--output", str(root), "--num-classes", "2"]) == 0
    assert "unknown encoder: `moedit sample --prompt` needs --text-encoder DIR" in capsys.readouterr().out
    with open(root / "dataset.json") as f:
        stored = json.load(f)
    assert stored["fields"] == {"text": {"dtype": "float16", "shape": [L, D]}, "text_mask": {"dtype": "bool", "shape": [L]},
                                "repa": {"dtype": "float16", "shape": [GRID * GRID, C]},
                                "ids": {"dtype": "int64", "shape": [3]}, "txt": {"dtype": "str", "shape": []}}
    assert stored["text_encoder"] == {"path": None, "type": "unknown", "width": D, "max_length": L}
    assert stored["repa_encoder"] == {"path": None, "type": "unknown", "width": C, "grid": GRID, "image_size": None}
    assert load_manifest(root).num_samples == sum(SHARD_SIZES)

    cfg = DataConfig(path=str(root), num_workers=0, fields=["text", "text_mask", "repa", "ids", "txt"])
    batches = list(build_loader(cfg, batch_size=2))
    seen = []
    for x, y, fields in batches:
        assert fields["text"].dtype == torch.float16 and fields["text_mask"].dtype == torch.bool
        assert fields["repa"].dtype == torch.float16 and fields["ids"].dtype == torch.int64
        for row, index in enumerate(int(v) for v in x[:, 0, 0, 0]):
            sample = written[index]
            assert int(y[row]) == index % 2 and fields["txt"][row] == sample["txt"]
            for name in ("text", "text_mask", "repa", "ids"):
                np.testing.assert_array_equal(fields[name][row].numpy(), sample[name])
            seen.append(index)
    assert sorted(seen) == list(written)


def test_a_shard_with_other_or_missing_fields_is_named(tmp_path):
    write_shards(tmp_path / "long", text_length_of_shard1=L + 1)
    with pytest.raises(MoeditError, match=rf"^shard \S+/long/part-000001.tar: field 'text' of its first sample 000003 is "
                                          rf"float16 \[{L + 1}, {D}\], but float16 \[{L}, {D}\] in \S+/part-000000.tar "
                                          r"\(sample 000000\); every sample needs the same field shapes$"):
        index_shards(str(tmp_path / "long"), num_classes=2)
    write_shards(tmp_path / "norepa", drop_repa_of_shard1=True)
    with pytest.raises(MoeditError, match=r"^shard \S+/norepa/part-000001.tar: its first sample 000003 lacks field "
                                          rf"'repa', which \S+/part-000000.tar \(sample 000000\) holds as float16 "
                                          rf"\[{GRID * GRID}, {C}\]"):
        index_shards(str(tmp_path / "norepa"), num_classes=2)
    assert not (tmp_path / "long" / "dataset.json").exists() and not (tmp_path / "norepa" / "dataset.json").exists()


def test_prompts_on_indexed_shards_need_the_text_encoder_flag(tmp_path):
    write_shards(tmp_path)
    index_shards(str(tmp_path), num_classes=2)
    cfg = SimpleNamespace(data=DataConfig(path=str(tmp_path)), model=SimpleNamespace(text_len=L, text_dim=D))
    with pytest.raises(MoeditError, match=r"records a text_encoder of type unknown with no path .*--source shards.*: "
                                          r"pass --text-encoder DIR"):
        run_text_encoder(cfg, None)
