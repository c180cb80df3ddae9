"""Captions in the data (issue 25): every caption source of `moedit prepare`, the per-sample text
fields read back by plain webdataset and by the loader (by name, resumed exactly), the digits
captions and the tiny stand-in encoder, and the named errors."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.cli import main as cli_main
from moedit.data import DataConfig, DataError, build_loader, load_manifest
from moedit.data.manifest import Manifest, ShardInfo, file_sha256, write_manifest
from moedit.data.prepare import PrepareSpec, npy_bytes, prepare
from moedit.data.sources import SourceSpec
from moedit.data.tario import write_tar
from moedit.data.text import (
    DIGIT_CAPTION_TEMPLATES, DIGIT_WORDS, STAND_IN_MARKER, digit_caption, encode_captions, load_text_encoder,
    make_tiny_text_encoder,
)
from moedit.errors import MoeditError

MAX_LENGTH = 8
CAPTIONS = {("cat", 0): "a small cat", ("cat", 1): "the digit seven", ("dog", 0): "a handwritten dog",
            ("dog", 1): "a picture of the number 3, written by hand and cut off after eight tokens"}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("encoder") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """ROOT/<class>/<i>.png, 8x8 RGB, each with a caption <i>.txt beside it."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for (name, i), caption in CAPTIONS.items():
        os.makedirs(root / name, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
        (root / name / f"{i}.txt").write_text(caption + "\n")
    return root


def read_wds(output) -> list[dict]:
    """Every sample of the shards, decoded by plain webdataset."""
    import webdataset as wds

    urls = sorted(str(p) for p in output.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def expected_text(encoder, captions, max_length=MAX_LENGTH):
    features, mask = encode_captions(encoder, captions, max_length)
    return features.numpy().astype(np.float16), mask.numpy()


def check_text_samples(samples, captions, encoder, max_length=MAX_LENGTH):
    """The shard holds the caption, the float16 features and the mask of each sample as encoded."""
    assert [s["txt"] for s in samples] == captions
    features, mask = expected_text(encoder, captions, max_length)
    np.testing.assert_array_equal(np.stack([s["text.npy"] for s in samples]), features)
    np.testing.assert_array_equal(np.stack([s["text_mask.npy"] for s in samples]), mask)
    assert all(s["text.npy"].dtype == np.float16 and s["text_mask.npy"].dtype == np.bool_ for s in samples)


# ---- digits captions and the stand-in encoder ----------------------------------------------------------
def test_digit_captions_are_label_phrasings_fixed_per_sample():
    captions = [digit_caption(i % 10, i) for i in range(300)]
    assert captions == [digit_caption(i % 10, i) for i in range(300)]
    for i, caption in enumerate(captions):
        assert str(i % 10) in caption.split() or DIGIT_WORDS[i % 10] in caption.replace(",", "").split()
    sevens = {digit_caption(7, i) for i in range(300)}
    assert sevens == {t.format(digit=7, word="seven") for t in DIGIT_CAPTION_TEMPLATES} and len(sevens) >= 4
    assert "a handwritten 7" in sevens and "the digit seven" in sevens and "a picture of the number 7" in sevens


def test_stand_in_encoder_is_local_seeded_and_masks_padding(tmp_path, encoder_dir):
    encoder = load_text_encoder(encoder_dir)
    assert (encoder.kind, encoder.width) == ("clip", 64)
    assert "RANDOM weights" in open(os.path.join(encoder_dir, STAND_IN_MARKER)).read()
    again = make_tiny_text_encoder(tmp_path / "again")
    captions = ["a handwritten 7", "the digit seven", "zebra"]
    features, mask = encode_captions(encoder_dir, captions, 6)
    torch.testing.assert_close(encode_captions(again, captions, 6)[0], features, rtol=0, atol=0)  # same seed
    assert features.shape == (3, 6, 64) and features.dtype == torch.float32 and mask.dtype == torch.bool
    # [BOS] words [EOS]; an unknown word is one [UNK] token
    assert mask.sum(1).tolist() == [5, 5, 3]
    assert (features[~mask] == 0).all() and (features[mask].abs().sum(-1) > 0).all()
    assert not torch.equal(features[0], features[1])
    # one caption alone gives the features it gets in a batch, and a longer padding leaves them alone
    alone, _ = encode_captions(encoder_dir, captions[1:2], 9)
    torch.testing.assert_close(alone[0, :6], features[1], rtol=1e-5, atol=1e-6)


def test_digits_prepare_stores_label_captions_with_the_stand_in(tmp_path):
    spec = PrepareSpec(SourceSpec("digits", captions=True, num_samples=24), channels=1, dtype="float32",
                       shard_size=10, text_max_length=MAX_LENGTH)
    manifest = prepare(spec, str(tmp_path / "d"), progress=False)
    stand_in = str(tmp_path / "d" / "text_encoder")
    assert manifest.text_encoder == {"path": stand_in, "type": "clip", "width": 64, "max_length": MAX_LENGTH}
    assert manifest.fields == {"text": {"dtype": "float16", "shape": [MAX_LENGTH, 64]},
                               "text_mask": {"dtype": "bool", "shape": [MAX_LENGTH]}, "txt": {"dtype": "str", "shape": []}}
    samples = read_wds(tmp_path / "d")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(24)]
    check_text_samples(samples, [digit_caption(s["cls"], i) for i, s in enumerate(samples)], stand_in)
    # byte-reproducible: a second preparation (stand-in written afresh) gives the same shards
    prepare(spec, str(tmp_path / "e"), progress=False)
    assert all((tmp_path / "d" / n).read_bytes() == (tmp_path / "e" / n).read_bytes()
               for n in ("shard-000000.tar", "shard-000002.tar"))


# ---- caption sources ---------------------------------------------------------------------------------
def test_folder_source_reads_the_txt_beside_each_image(tmp_path, images, encoder_dir):
    spec = PrepareSpec(SourceSpec("folder", input=str(images), captions=True), dtype="float32", flip=True,
                       shard_size=3, text_encoder=encoder_dir, text_max_length=MAX_LENGTH)
    prepare(spec, str(tmp_path), progress=False)
    samples = read_wds(tmp_path)
    assert [s["__key__"] for s in samples][:2] == ["000000000", "000000000_flip"]
    captions = [c for c in CAPTIONS.values() for _ in range(2)]  # the flip keeps its image's caption
    check_text_samples(samples, captions, encoder_dir)
    assert samples[-1]["text_mask.npy"].all()  # the long caption is cut at MAX_LENGTH tokens
    assert load_manifest(str(tmp_path)).text_encoder["path"] == os.path.abspath(encoder_dir)


def png_bytes(path) -> bytes:
    return open(path, "rb").read()


def test_webdataset_tars_with_txt_or_json_captions(tmp_path, images, encoder_dir):
    import webdataset as wds

    files = [images / name / f"{i}.png" for name, i in CAPTIONS]
    captions = list(CAPTIONS.values())
    os.makedirs(tmp_path / "txt")
    os.makedirs(tmp_path / "json")
    with wds.TarWriter(str(tmp_path / "txt" / "part-0.tar")) as sink:  # LAION style: jpg/png + txt + json
        for k, (f, c) in enumerate(zip(files, captions)):
            sink.write({"__key__": f"s{k:04d}", "png": png_bytes(f), "txt": c, "json": {"url": f"http://x/{k}"}})
    for part in range(2):  # captions only in the json, under a key of our choosing
        with wds.TarWriter(str(tmp_path / "json" / f"part-{part}.tar")) as sink:
            for k in range(2 * part, 2 * part + 2):
                sink.write({"__key__": f"s{k:04d}", "png": png_bytes(files[k]), "cls": k % 2,
                            "json": {"alt_text": captions[k], "caption": "not this one" if k else None}})
    for name, key in (("txt", "caption"), ("json", "alt_text")):
        source = SourceSpec("webdataset", input=str(tmp_path / name), captions=True, caption_key=key)
        manifest = prepare(PrepareSpec(source, dtype="float32", shard_size=3, text_encoder=encoder_dir,
                                       text_max_length=MAX_LENGTH), str(tmp_path / f"out-{name}"), progress=False)
        samples = read_wds(tmp_path / f"out-{name}")
        check_text_samples(samples, captions, encoder_dir)
        pixels = np.asarray(Image.open(files[2]).convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(samples[2]["npy"], pixels, atol=1e-6)
        assert [s["cls"] for s in samples] == ([0] * 4 if name == "txt" else [0, 1, 0, 1])
        assert manifest.num_classes == (1 if name == "txt" else 2)


def test_hf_dataset_and_parquet_caption_column(tmp_path, images, encoder_dir):
    import datasets

    files = [str(images / name / f"{i}.png") for name, i in CAPTIONS]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog"]),
                                  "prompt": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"img": files, "y": [0, 0, 1, 1], "prompt": list(CAPTIONS.values())},
                                      features=features)
    data.save_to_disk(str(tmp_path / "hf"))
    data.to_parquet(str(tmp_path / "data.parquet"))
    shards = {}
    for kind, path in (("hf", tmp_path / "hf"), ("parquet", tmp_path / "data.parquet")):
        source = SourceSpec(kind, input=str(path), image_key="img", label_key="y", captions=True, caption_column="prompt")
        prepare(PrepareSpec(source, dtype="float32", shard_size=4, text_encoder=encoder_dir, text_max_length=MAX_LENGTH),
                str(tmp_path / kind), progress=False)
        shards[kind] = (tmp_path / kind / "shard-000000.tar").read_bytes()
        check_text_samples(read_wds(tmp_path / kind), list(CAPTIONS.values()), encoder_dir)
    assert shards["hf"] == shards["parquet"]


# ---- the loader ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_text")
    spec = PrepareSpec(SourceSpec("digits", captions=True, num_samples=45), channels=1, dtype="float32",
                       shard_size=6, text_max_length=MAX_LENGTH)
    prepare(spec, str(root), progress=False)
    return str(root)


FIELDS = ["text", "text_mask", "txt"]


def test_loader_returns_fields_by_name_aligned_with_their_samples(digits_text):
    plain = next(iter(build_loader(DataConfig(path=digits_text, num_workers=0), batch_size=5)))
    assert len(plain) == 2  # no fields asked: (x, y) as before
    loader = build_loader(DataConfig(path=digits_text, num_workers=0, shuffle_buffer=7, fields=FIELDS), batch_size=5)
    batches = list(loader)
    assert sum(len(y) for _, y, _ in batches) == 45
    x, y, fields = batches[0]
    assert fields["text"].shape == (5, MAX_LENGTH, 64) and fields["text"].dtype == torch.float16
    assert fields["text_mask"].shape == (5, MAX_LENGTH) and fields["text_mask"].dtype == torch.bool
    assert isinstance(fields["txt"], list) and len(fields["txt"]) == 5
    texts = [t for _, _, f in batches for t in f["txt"]]
    features, mask = expected_text(os.path.join(digits_text, "text_encoder"), texts)
    np.testing.assert_array_equal(torch.cat([f["text"] for _, _, f in batches]).numpy(), features)
    np.testing.assert_array_equal(torch.cat([f["text_mask"] for _, _, f in batches]).numpy(), mask)
    labels = torch.cat([y for _, y, _ in batches]).tolist()
    assert all(str(label) in t or DIGIT_WORDS[label] in t for label, t in zip(labels, texts))
    only_text = next(iter(build_loader(DataConfig(path=digits_text, num_workers=0, fields=["text"]), batch_size=5)))[2]
    assert sorted(only_text) == ["text"]


def test_resume_with_fields_is_exact(digits_text):
    cfg = DataConfig(path=digits_text, num_workers=2, shuffle_buffer=5, fields=FIELDS)

    def flat(batches):
        return [(x.tolist(), y.tolist(), f["text"].tolist(), f["text_mask"].tolist(), f["txt"]) for x, y, f in batches]

    whole = flat(itertools.islice(build_loader(cfg, batch_size=4, seed=1).forever(), 16))
    first = build_loader(cfg, batch_size=4, seed=1)
    head = flat(itertools.islice(first.forever(), 7))
    resumed = build_loader(cfg, batch_size=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + flat(itertools.islice(resumed.forever(), 9)) == whole  # crosses the epoch boundary (12 batches)


# ---- named errors --------------------------------------------------------------------------------------
def test_missing_caption_is_named_for_every_source(tmp_path, images, encoder_dir):
    broken = tmp_path / "folder"
    shutil.copytree(images, broken)
    os.remove(broken / "dog" / "0.txt")
    source = SourceSpec("folder", input=str(broken), captions=True)
    with pytest.raises(MoeditError, match=rf"^{broken}/dog/0.png: no caption \(--source folder reads .*0.txt is not there"):
        prepare(PrepareSpec(source, text_encoder=encoder_dir), str(tmp_path / "o1"), progress=False)
    assert not (tmp_path / "o1").exists()  # checked before anything is written

    import webdataset as wds

    os.makedirs(tmp_path / "wds")
    with wds.TarWriter(str(tmp_path / "wds" / "a.tar")) as sink:
        sink.write({"__key__": "good", "png": png_bytes(images / "cat" / "0.png"), "txt": "a cat"})
        sink.write({"__key__": "bad", "png": png_bytes(images / "cat" / "1.png"), "json": {"url": "u"}})
    source = SourceSpec("webdataset", input=str(tmp_path / "wds"), captions=True)
    with pytest.raises(MoeditError, match=r"a.tar, sample bad: no caption \(--source webdataset reads KEY.txt, else "
                                          r"the 'caption' key of KEY.json"):
        prepare(PrepareSpec(source, text_encoder=encoder_dir), str(tmp_path / "o2"), progress=False)

    import datasets

    data = datasets.Dataset.from_dict({"image": [str(images / "cat" / "0.png")] * 3, "label": [0, 1, 0],
                                       "caption": ["a", None, "c"]},
                                      features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                                                  "caption": datasets.Value("string")}))
    data.to_parquet(str(tmp_path / "p.parquet"))
    source = SourceSpec("parquet", input=str(tmp_path / "p.parquet"), captions=True)
    with pytest.raises(MoeditError, match=r"p.parquet, row 1: no caption \(--source parquet reads column 'caption'"):
        prepare(PrepareSpec(source, text_encoder=encoder_dir), str(tmp_path / "o3"), progress=False)
    source = SourceSpec("parquet", input=str(tmp_path / "p.parquet"), captions=True, caption_column="alt")
    with pytest.raises(MoeditError, match=r"no caption column 'alt' .*set --caption-column"):
        prepare(PrepareSpec(source, text_encoder=encoder_dir), str(tmp_path / "o4"), progress=False)


def test_missing_or_unreadable_encoder_is_a_one_line_error(tmp_path, images, capsys):
    args = ["prepare", "--source", "folder", "--input", str(images), "--no-progress"]
    assert cli_main([*args, "--text-encoder", str(tmp_path / "nothing"), "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "never downloads" in err
    assert err.startswith(f"moedit prepare: error: text encoder directory {tmp_path / 'nothing'} not found: pass --text-encoder DIR")
    assert cli_main([*args, "--captions", "--output", str(tmp_path / "b")]) == 2  # only digits has a stand-in
    assert "captions need a text encoder: pass --text-encoder DIR" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "hidden_size": 64}))
    assert cli_main([*args, "--text-encoder", str(tmp_path / "broken"), "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"text encoder {tmp_path / 'broken'}: cannot load its CLIPTextModel and tokenizer" in err
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MoeditError, match="model_type 'bert' is not a CLIP text model or a T5 encoder"):
        load_text_encoder(tmp_path / "bert")


def test_t5_encoder_is_chosen_by_its_config(tmp_path, encoder_dir):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=40, d_model=24, d_kv=6, d_ff=32, num_layers=1, num_heads=4)).eval()
    model.save_pretrained(tmp_path / "t5")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the stand-in's word-level tokenizer will do
        shutil.copy(os.path.join(encoder_dir, name), tmp_path / "t5" / name)
    encoder = load_text_encoder(tmp_path / "t5")
    assert (encoder.kind, encoder.width, encoder.manifest_entry(120)["max_length"]) == ("t5", 24, 120)
    features, mask = encode_captions(tmp_path / "t5", ["the digit seven"], None)
    assert features.shape == (1, 120, 24) and mask.sum() == 5
    tokens = encoder.tokenizer(["the digit seven"], return_tensors="pt")
    with torch.no_grad():
        reference = model(**tokens).last_hidden_state[0]  # (5, 24): unpadded
    torch.testing.assert_close(features[0, :5], reference, rtol=1e-5, atol=1e-5)


def test_encoder_width_must_match_the_shards_being_resumed(tmp_path, images, encoder_dir):
    encoder = tmp_path / "encoder"
    shutil.copytree(encoder_dir, encoder)
    spec = PrepareSpec(SourceSpec("folder", input=str(images), captions=True), shard_size=2, text_encoder=str(encoder),
                       text_max_length=MAX_LENGTH)
    prepare(spec, str(tmp_path / "out"), progress=False)
    os.remove(tmp_path / "out" / "dataset.json")  # as after a kill: the progress record still names the width
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))  # another model, same path
    with pytest.raises(MoeditError, match=rf"{tmp_path / 'out'} holds text features 8 x 64 \(text encoder .*encoder\), "
                                          rf"but text encoder .*encoder gives 8 x 32: use the encoder"):
        prepare(spec, str(tmp_path / "out"), progress=False)


def fielded_dataset(root, drop_text_of: int | None = None) -> None:
    """10 samples in 2 shards with text fields (L=3, D=2); sample `drop_text_of` lacks KEY.text.npy."""
    os.makedirs(root, exist_ok=True)
    shards = []
    for s in range(2):
        samples = []
        for i in range(5 * s, 5 * s + 5):
            fields = {"npy": npy_bytes(np.full((1, 2, 2), i, np.float32)), "cls": b"1",
                      "text.npy": npy_bytes(np.full((3, 2), i, np.float16)), "text_mask.npy": npy_bytes(np.ones(3, bool))}
            if i == drop_text_of:
                del fields["text.npy"]
            samples.append((f"{i:06d}", fields))
        path = os.path.join(root, f"shard-{s:06d}.tar")
        write_tar(path, samples)
        shards.append(ShardInfo(os.path.basename(path), 5, file_sha256(path), os.path.getsize(path)))
    write_manifest(Manifest([1, 2, 2], "float32", 2, ["0", "1"], shards,
                            fields={"text": {"dtype": "float16", "shape": [3, 2]}, "text_mask": {"dtype": "bool", "shape": [3]}},
                            text_encoder={"path": "/enc", "type": "clip", "width": 2, "max_length": 3}), root)


def test_requested_field_missing_from_manifest_or_sample_is_named(tmp_path, digits_dir):
    with pytest.raises(MoeditError, match=rf"^{digits_dir}/dataset.json does not list field 'text' that data.fields asks "
                                          r"for \(stored fields: none\): prepare the shards with captions .*--text-encoder"):
        build_loader(DataConfig(path=str(digits_dir), fields=["text"]), batch_size=4)
    fielded_dataset(str(tmp_path / "ok"))
    with pytest.raises(MoeditError, match=r"does not list field 'txt' .*stored fields: text, text_mask"):
        build_loader(DataConfig(path=str(tmp_path / "ok"), fields=["txt"]), batch_size=4)
    x, _, fields = next(iter(build_loader(DataConfig(path=str(tmp_path / "ok"), num_workers=0, shuffle=False,
                                                     fields=["text"]), batch_size=4)))
    assert fields["text"][:, 0, 0].tolist() == x[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    fielded_dataset(str(tmp_path / "bad"), drop_text_of=7)
    cfg = DataConfig(path=str(tmp_path / "bad"), num_workers=0, fields=["text", "text_mask"])
    with pytest.raises(DataError, match=r"shard .*shard-000001.tar, sample 000007: missing field 'text' \(member "
                                        r"\.text\.npy; has \['cls', 'npy', 'text_mask.npy'\]\) \(missing_key") as err:
        list(build_loader(cfg, batch_size=4))
    assert err.value.reason == "missing_key"
    # not asked for, the field is not needed; skipped, the sample is counted
    assert sum(len(y) for _, y in build_loader(DataConfig(path=str(tmp_path / "bad"), num_workers=0), batch_size=4)) == 10
    skip = DataConfig(path=str(tmp_path / "bad"), num_workers=0, fields=["text"], bad_data="skip", max_skip_fraction=0.2)
    loader = build_loader(skip, batch_size=4)
    assert sorted(int(v) for _, _, f in loader for v in f["text"][:, 0, 0]) == [i for i in range(10) if i != 7]
    assert loader.stats()["skipped_missing_key"] == 1
    with pytest.raises(ValueError, match=r"data.fields: field name 'text.npy' must be a lowercase identifier"):
        DataConfig(fields=["text.npy"])


def test_transformers_loads_only_on_the_text_paths():
    """moedit, its data package, prepare and the loader import without transformers (the text extra)."""
    import subprocess
    import sys

    code = ("import sys, moedit.cli, moedit.data, moedit.data.prepare, moedit.data.loader, moedit.data.text, "
            "moedit.data.sources; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_synthetic_captions_with_random_features_for_benchmarks(tmp_path):
    """`--source synthetic --text-encoder random:W`: no model; each caption's features are seeded by
    its text, over 2 + its word count tokens, zeros and a false mask after; a bad width is named."""
    import webdataset as wds

    from moedit.data.text import RandomTextFeatures

    out = tmp_path / "syn"
    assert cli_main(["prepare", "--source", "synthetic", "--output", str(out), "--latent-shape", "4,4,4",
                     "--num-samples", "8", "--text-encoder", "random:16", "--text-max-length", "6",
                     "--no-progress"]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["text_encoder"] == {"path": "random:16", "type": "random", "width": 16, "max_length": 6}
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 8
    captions = [s["txt"].decode() for s in samples]
    expected, mask = RandomTextFeatures("random:16").encode(captions, 6)
    for s, e, m, caption in zip(samples, expected, mask, captions):
        assert int(m.sum()) == min(6, 2 + len(caption.split()))
        np.testing.assert_array_equal(np.load(io.BytesIO(s["text_mask.npy"])), m.numpy())
        np.testing.assert_array_equal(np.load(io.BytesIO(s["text.npy"])), e.numpy().astype(np.float16))
    again, _ = RandomTextFeatures("random:16").encode(captions[:1] * 2, 6)
    assert torch.equal(again[0], again[1]) and not torch.equal(expected[0], expected[1] if captions[1] != captions[0]
                                                                else expected[0] + 1)
    with pytest.raises(MoeditError, match="random features need a width"):
        RandomTextFeatures("random:wide")
