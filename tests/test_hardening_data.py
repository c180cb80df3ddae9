"""Issue 27, data: items 2, 20 and 21 (see docs/training.md, "What can go wrong")."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moedit.data import DataConfig, build_loader
from moedit.errors import MoeditError
from test_data_helpers import make_dataset, sample_ids

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _moedit(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedit.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------------- item 2


def test_shard_missing_from_the_directory_is_a_named_error(tmp_path):
    root = str(tmp_path)
    make_dataset(root, 20, 5)  # 4 shards
    os.remove(tmp_path / "shard-000001.tar")
    with pytest.raises(MoeditError) as info:
        build_loader(DataConfig(path=root, num_workers=0), batch_size=4)
    message = str(info.value)
    assert "1 of the 4 shards listed in" in message and "shard-000001.tar" in message
    assert "5 of 20 samples" in message and "data.bad_data=skip" in message


def test_missing_shard_under_skip_is_counted(tmp_path, caplog):
    root = str(tmp_path)
    make_dataset(root, 20, 5)
    os.remove(tmp_path / "shard-000002.tar")
    cfg = DataConfig(path=root, num_workers=0, bad_data="skip", max_skip_fraction=0.3, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="moedit.data"):
        loader = build_loader(cfg, batch_size=4)
    assert "shard-000002.tar" in caplog.text and "skipped and counted" in caplog.text
    ids = [i for x, _ in loader for i in sample_ids(x)]
    assert ids == [*range(0, 10), *range(15, 20)]
    stats = loader.stats()
    assert stats["skipped_missing_shard"] == 5 and stats["skipped"] == 5
    # the usual budget applies: a quarter of the data gone is too much for the default 1%
    strict = build_loader(DataConfig(path=root, num_workers=0, bad_data="skip"), batch_size=4)
    with pytest.raises(MoeditError, match=r"missing_shard 1\), more than data.max_skip_fraction"):
        list(strict)


def test_shard_list_comes_from_the_manifest_and_extra_tars_are_named(tmp_path, caplog):
    root = str(tmp_path)
    make_dataset(root, 20, 5)
    shutil.copy(tmp_path / "shard-000000.tar", tmp_path / "stray-copy.tar")  # not in dataset.json
    with caplog.at_level(logging.WARNING, logger="moedit.data"):
        loader = build_loader(DataConfig(path=root, num_workers=0), batch_size=4)
    assert "stray-copy.tar" in caplog.text and "not listed" in caplog.text
    assert sorted(i for x, _ in loader for i in sample_ids(x)) == list(range(20))  # read once, not twice


# ----------------------------------------------------------------------------------- item 20


def test_mistyped_data_path_is_not_filled_with_the_builtin_dataset(tmp_path):
    target = tmp_path / "nonexistent" / "shards"
    run = tmp_path / "run"
    proc = _moedit(["train", QUICKSTART, f"data.path={target}", f"train.run_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moedit train: error: data.path = {target}: no prepared shards")
    assert "data.prepare=digits" in lines[0]
    assert not (tmp_path / "nonexistent").exists() and not run.exists()


def test_builtin_dataset_still_prepared_at_the_configs_own_path_or_when_asked(monkeypatch, tmp_path):
    from moedit.train import cli
    from moedit.train.config import load_config

    cfg = load_config(QUICKSTART, [f"data.path={tmp_path / 'd'}"])
    with pytest.raises(MoeditError, match="no prepared shards"):
        cli._check_builtin_target(cfg, [f"data.path={tmp_path / 'd'}"])
    cli._check_builtin_target(cfg, [f"data.path={tmp_path / 'd'}", "data.prepare=digits"])  # asked: fine
    cli._check_builtin_target(load_config(QUICKSTART), [])  # the config's own data/digits: fine


# ----------------------------------------------------------------------------------- item 21


def test_shards_of_other_shapes_name_the_model_keys_before_the_run_dir_exists(tmp_path):
    data = tmp_path / "shards"
    make_dataset(str(data), 12, 4, shape=(3, 4, 4), num_classes=17)
    run = tmp_path / "run"
    proc = _moedit(["train", QUICKSTART, f"data.path={data}", f"train.run_dir={run}", "train.steps=1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "hold latents of shape 3x4x4 (C x H x W) with 17 classes" in lines[0]
    assert lines[0].endswith("set model.in_channels=3 model.input_size=4 model.num_classes=17")
    assert not run.exists()


def test_model_changes_only_where_the_model_does_not_fit(tmp_path):
    from moedit.data.manifest import model_changes_for

    manifest = make_dataset(str(tmp_path), 4, 4, shape=(1, 8, 8), num_classes=10)
    assert model_changes_for(manifest, in_channels=1, input_size=8, num_classes=10) == {}
    assert model_changes_for(manifest, in_channels=1, input_size=8, num_classes=1000) == {}  # more classes fit
    assert model_changes_for(manifest, in_channels=1, input_size=8, num_classes=0) == {}  # unconditional
    assert model_changes_for(manifest, in_channels=4, input_size=8, num_classes=5) == {
        "model.in_channels": 1, "model.num_classes": 10}
