"""Bad data: each defect raises a DataError naming shard, key and problem, or is skipped and counted."""

from __future__ import annotations

import os

import numpy as np
import pytest

from moedit.data import DataConfig, DataError, build_loader
from moedit.data.prepare import npy_bytes
from moedit.errors import MoeditError
from test_data_helpers import make_dataset, sample_ids

GOOD_LABEL = b"3"
# sample index -> (replacement fields, counter reason, words the error must contain)
DEFECTS = {
    "missing_key": ({"npy": npy_bytes(np.zeros((1, 2, 2), np.float32))}, "missing_key", "missing .cls"),
    "wrong_shape": ({"npy": npy_bytes(np.zeros((1, 3, 2), np.float32)), "cls": GOOD_LABEL}, "wrong_shape",
                    r"latent shape \(1, 3, 2\), manifest says \(1, 2, 2\)"),
    "wrong_dtype": ({"npy": npy_bytes(np.zeros((1, 2, 2), np.float64)), "cls": GOOD_LABEL}, "wrong_dtype",
                    "latent dtype float64, manifest says float32"),
    "label_range": ({"npy": npy_bytes(np.zeros((1, 2, 2), np.float32)), "cls": b"10"}, "bad_label",
                    r"label 10 out of range \[0, 10\)"),
    "label_text": ({"npy": npy_bytes(np.zeros((1, 2, 2), np.float32)), "cls": b"cat"}, "bad_label",
                   "label b'cat' is not an integer"),
    "not_npy": ({"npy": b"garbage bytes", "cls": GOOD_LABEL}, "bad_array", r"\.npy member is not a numpy array"),
    "short_npy": ({"npy": npy_bytes(np.zeros((1, 2, 2), np.float32))[:-4], "cls": GOOD_LABEL}, "bad_array",
                  r"\.npy holds 12 data bytes, expected 16"),
}
BAD_INDEX = 13  # in shard-000002 (5 samples per shard)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_sample_raises_or_is_skipped_and_counted(tmp_path, defect):
    fields, reason, words = DEFECTS[defect]
    root = str(tmp_path)
    make_dataset(root, 20, 5, bad={BAD_INDEX: fields})
    with pytest.raises(DataError, match=rf"shard .*shard-000002.tar, sample {BAD_INDEX:06d}: {words}") as err:
        list(build_loader(DataConfig(path=root, num_workers=0), batch_size=4))
    assert err.value.reason == reason
    cfg = DataConfig(path=root, num_workers=0, bad_data="skip", max_skip_fraction=0.1)
    loader = build_loader(cfg, batch_size=4)
    ids = [i for x, _ in loader for i in sample_ids(x)]
    assert sorted(ids) == [i for i in range(20) if i != BAD_INDEX]
    stats = loader.stats()
    assert (stats["skipped"], stats[f"skipped_{reason}"], stats["samples"]) == (1, 1, 19)


def test_error_from_a_worker_process_is_the_same_data_error(tmp_path):
    root = str(tmp_path)
    make_dataset(root, 20, 5, bad={BAD_INDEX: DEFECTS["label_range"][0]})
    with pytest.raises(DataError, match=f"sample {BAD_INDEX:06d}: label 10 out of range"):
        list(build_loader(DataConfig(path=root, num_workers=2), batch_size=4))


def damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    # Each sample is 4 blocks: .cls header, .cls data, .npy header, .npy data (128 + 16 bytes).
    if how == "truncate":  # cut inside the third sample's .npy payload
        data = data[: 11 * 512 + 68]
    elif how == "header":  # flip a byte in the second member's header (its size field)
        data[512 + 512 + 130] ^= 0x11
    elif how == "payload":  # change a latent value: the tar still parses
        data[3 * 512 + 130] ^= 0x40
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how,verify,reason,words,lost", [
    ("truncate", False, "corrupt_shard", "truncated: member at byte 5120 needs 144 bytes", 3),
    ("header", False, "corrupt_shard", "corrupt tar header at byte 1024", 5),
    ("payload", True, "checksum", "sha256 .* != manifest", 5),
])
def test_damaged_shard_raises_or_skips_its_lost_samples(tmp_path, how, verify, reason, words, lost):
    root = str(tmp_path)
    make_dataset(root, 20, 5)
    damage(os.path.join(root, "shard-000001.tar"), how)
    cfg = dict(path=root, num_workers=0, verify_checksums=verify)
    with pytest.raises(DataError, match=rf"shard .*shard-000001.tar: {words}"):
        list(build_loader(DataConfig(**cfg), batch_size=4))
    loader = build_loader(DataConfig(**cfg, bad_data="skip", max_skip_fraction=0.5), batch_size=4)
    ids = sorted(i for x, _ in loader for i in sample_ids(x))
    assert ids == [i for i in range(20) if not 5 + (5 - lost) <= i < 10]
    assert loader.stats()[f"skipped_{reason}"] == lost


def test_shard_with_fewer_samples_than_the_manifest(tmp_path):
    root = str(tmp_path)
    make_dataset(root, 20, 5)
    manifest_path = os.path.join(root, "dataset.json")
    text = open(manifest_path).read().replace('"num_samples": 20', '"num_samples": 21')
    open(manifest_path, "w").write(text.replace('"num_samples": 5,', '"num_samples": 6,', 1))
    with pytest.raises(DataError, match="shard-000000.tar: holds 5 samples, the manifest lists 6"):
        list(build_loader(DataConfig(path=root, num_workers=0, verify_checksums=False), batch_size=4))


def test_skips_beyond_the_allowed_fraction_stop_the_run(tmp_path):
    root = str(tmp_path)
    bad = {i: DEFECTS["label_range"][0] for i in (2, 7, 11)}
    make_dataset(root, 40, 5, bad=bad)  # 3 of 40 = 7.5% bad
    ok = build_loader(DataConfig(path=root, num_workers=0, bad_data="skip", max_skip_fraction=0.08), batch_size=4)
    assert sum(len(y) for _, y in ok) == 37
    strict = build_loader(DataConfig(path=root, num_workers=0, bad_data="skip", max_skip_fraction=0.05), batch_size=4)
    with pytest.raises(MoeditError, match=r"3 bad samples skipped .*bad_label 3.*max_skip_fraction = 0.05 of 40"):
        list(strict)


def test_config_validation_names_field_and_value():
    with pytest.raises(ValueError, match=r"data.bad_data = 'ignore': use one of raise, skip"):
        DataConfig(path="x", bad_data="ignore")
    with pytest.raises(ValueError, match=r"data.max_skip_fraction = 1.5"):
        DataConfig(path="x", max_skip_fraction=1.5)
    with pytest.raises(ValueError, match=r"data.path = 'pipe:cat a.tar': a pipe: URL needs data.manifest"):
        DataConfig(path="pipe:cat a.tar")
    with pytest.raises(ValueError, match=r"data.prepare = 'mnist': use one of digits, digits_text, digits_repa, synthetic or null"):
        DataConfig(path="x", prepare="mnist")
    with pytest.raises(ValueError, match=r"data.split = 'rank'"):
        DataConfig(path="x", split="rank")


def test_missing_shards_and_manifest_are_named(tmp_path):
    with pytest.raises(MoeditError, match=f"shards not found: {tmp_path}/none"):
        build_loader(DataConfig(path=str(tmp_path / "none")), batch_size=2)
    make_dataset(str(tmp_path), 4, 2)
    os.remove(tmp_path / "dataset.json")
    with pytest.raises(MoeditError, match=f"no manifest at {tmp_path}/dataset.json: prepare shards"):
        build_loader(DataConfig(path=str(tmp_path)), batch_size=2)


def test_resume_with_skipped_samples_matches_the_uninterrupted_run(tmp_path):
    import itertools

    root = str(tmp_path)
    make_dataset(root, 40, 5, bad={i: DEFECTS["wrong_dtype"][0] for i in (3, 4, 17, 30)})
    cfg = DataConfig(path=root, num_workers=2, shuffle_buffer=4, bad_data="skip", max_skip_fraction=0.2)
    full_loader = build_loader(cfg, batch_size=3, seed=1)
    full = [sample_ids(x) for x, _ in itertools.islice(full_loader.forever(), 25)]
    first = build_loader(cfg, batch_size=3, seed=1)
    head = [sample_ids(x) for x, _ in itertools.islice(first.forever(), 7)]
    resumed = build_loader(cfg, batch_size=3, seed=1)
    resumed.load_state_dict(first.state_dict())
    tail = [sample_ids(x) for x, _ in itertools.islice(resumed.forever(), 18)]
    assert head + tail == full
    counters = ("samples", "samples_read", "skipped", "skipped_wrong_dtype", "epoch")
    assert [resumed.stats()[k] for k in counters] == [full_loader.stats()[k] for k in counters]
    assert full_loader.stats()["skipped"] >= 4  # at least one whole epoch went by


def test_non_finite_latent_is_named_with_check_finite_and_passes_without(tmp_path):
    nan = np.zeros((1, 2, 2), np.float32)
    nan[0, 1, 0] = np.nan
    root = str(tmp_path)
    make_dataset(root, 20, 5, bad={BAD_INDEX: {"npy": npy_bytes(nan), "cls": GOOD_LABEL}})
    # Off by default: the sample reaches the batch (and the trainer's loss check, unnamed).
    batches = list(build_loader(DataConfig(path=root, num_workers=0), batch_size=4))
    assert sum(int(np.isnan(x.numpy()).sum()) for x, _ in batches) == 1
    with pytest.raises(DataError, match=rf"shard-000002.tar, sample {BAD_INDEX:06d}: latent holds 1 NaN or infinite"):
        list(build_loader(DataConfig(path=root, num_workers=0, check_finite=True), batch_size=4))
    loader = build_loader(DataConfig(path=root, num_workers=0, check_finite=True, bad_data="skip",
                                     max_skip_fraction=0.1), batch_size=4)
    ids = [i for x, _ in loader for i in sample_ids(x)]
    assert sorted(ids) == [i for i in range(20) if i != BAD_INDEX]
    assert loader.stats()["skipped_non_finite"] == 1
