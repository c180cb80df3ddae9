"""REPA features in the data (issue 26): `moedit prepare --repa-encoder` with a tiny random-weight
DINOv2 made here and with `random:WIDTH`, the field `repa` read back by plain webdataset against an
independent computation, the flipped copies, the digits_repa built-in, the loader (by name,
resumed exactly), and the named errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moedit.cli import main as cli_main
from moedit.data import DataConfig, build_loader, load_manifest
from moedit.data.manifest import write_manifest
from moedit.data.prepare import PrepareSpec, prepare, prepare_builtin
from moedit.data.repa import STAND_IN_MARKER, make_tiny_dinov2, resample_tokens
from moedit.data.sources import SourceSpec
from moedit.errors import MoeditError

SIZE = 32  # images and the tiny DINOv2's input: patch 4 -> an 8 x 8 encoder grid, width 32
FILES = (("a", 0), ("a", 1), ("b", 0))


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return make_tiny_dinov2(tmp_path_factory.mktemp("encoder") / "dinov2")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """ROOT/<class>/<i>.png, 32x32 RGB: smooth random fields, so features differ per image and flip."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, i in FILES:
        os.makedirs(root / name, exist_ok=True)
        coarse = torch.from_numpy(rng.random((1, 3, 4, 4), dtype=np.float32))
        smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
        Image.fromarray((smooth.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def read_wds(output) -> list[dict]:
    import webdataset as wds

    urls = sorted(str(p) for p in output.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def reference_dinov2(encoder_dir, png, flip: bool, image_size: int, grid: int) -> np.ndarray:
    """The expected `repa` of one image, computed without moedit: DINOv2's input, its patch tokens,
    resampled to the grid."""
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(encoder_dir, local_files_only=True).eval()
    pixels = np.asarray(Image.open(png).convert("RGB"), np.float32) / 255.0  # (H, W, 3) in [0, 1]
    if flip:
        pixels = pixels[:, ::-1]
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state[0, 1:]  # (g*g, C): the CLS token dropped
    g, width = int(len(tokens) ** 0.5), tokens.shape[1]
    fmap = tokens.reshape(g, g, width).permute(2, 0, 1)[None]  # (1, C, g, g): row y, column x
    if g != grid:
        fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False, antialias=grid < g)
    return fmap[0].permute(1, 2, 0).reshape(grid * grid, width).numpy()


def reference_random(image: np.ndarray, width: int) -> np.ndarray:
    """`random:WIDTH` on an image (C, G, G) already at the grid: each token maps its zero-padded 3x3
    neighbourhood (channel, row, column order) by the documented seeded matrix."""
    c, g, _ = image.shape
    weight = np.random.default_rng([26, c, width]).standard_normal((9 * c, width)).astype(np.float32) / np.sqrt(9 * c)
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
    out = np.empty((g * g, width), np.float32)
    for y in range(g):
        for x in range(g):
            out[y * g + x] = padded[:, y : y + 3, x : x + 3].reshape(-1) @ weight
    return out


# ---- the tiny DINOv2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [None, 4, 8])  # default H // 2 = 16 (upsampled), shrunk, the encoder's own
def test_folder_prepare_stores_dinov2_patch_features(tmp_path, images, dinov2_dir, grid):
    spec = PrepareSpec(SourceSpec("folder", input=str(images)), dtype="float32", flip=True, shard_size=4,
                       repa_encoder=dinov2_dir, repa_grid=grid, repa_image_size=SIZE if grid != 4 else 24)
    manifest = prepare(spec, str(tmp_path / "out"), progress=False)
    image_size, expected_grid = spec.repa_image_size, grid or SIZE // 2
    assert manifest.repa_encoder == {"path": os.path.abspath(dinov2_dir), "type": "dinov2", "width": 32,
                                     "grid": expected_grid, "image_size": image_size}
    assert manifest.fields == {"repa": {"dtype": "float16", "shape": [expected_grid ** 2, 32]}}
    samples = read_wds(tmp_path / "out")
    assert [s["__key__"] for s in samples][:2] == ["000000000", "000000000_flip"]
    for n, sample in enumerate(samples):
        name, i = FILES[n // 2]
        stored = sample["repa.npy"]
        assert stored.dtype == np.float16 and stored.shape == (expected_grid ** 2, 32)
        expected = reference_dinov2(dinov2_dir, images / name / f"{i}.png", n % 2 == 1, image_size, expected_grid)
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-3, atol=1e-3)  # float16 rounding
    original, flipped = samples[0]["repa.npy"], samples[1]["repa.npy"]
    assert np.abs(original.astype(np.float32) - flipped).mean() > 0.05
    assert "RANDOM weights" in open(os.path.join(dinov2_dir, STAND_IN_MARKER)).read()


def test_resampling_is_bilinear_with_antialias_only_when_shrinking():
    fmap = torch.arange(16.0).reshape(1, 4, 4, 1)  # value 4y + x at token y * 4 + x
    tokens = fmap.reshape(1, 16, 1)
    assert torch.equal(resample_tokens(tokens, 4), tokens)
    up = resample_tokens(tokens, 8).reshape(8, 8)
    # half-pixel centers: output (Y, X) samples input ((Y + 0.5) / 2 - 0.5, ...), clamped at the border
    expected = {(0, 0): 0.0, (1, 1): 0.25 * 5, (7, 7): 15.0, (2, 3): 4 * 0.75 + 1.25}
    assert {k: round(float(up[k]), 5) for k in expected} == expected
    # shrinking: antialiased bilinear as PIL does it (a triangle filter as wide as the scale)
    image = Image.fromarray(np.random.default_rng(1).random((12, 12), dtype=np.float32), mode="F")
    tokens = torch.from_numpy(np.asarray(image).copy()).reshape(1, 144, 1)
    pil = np.asarray(image.resize((5, 5), Image.BILINEAR))
    np.testing.assert_allclose(resample_tokens(tokens, 5).reshape(5, 5).numpy(), pil, rtol=1e-4, atol=1e-5)


# ---- random:WIDTH and digits_repa ----------------------------------------------------------------------
def test_random_features_follow_the_model_token_order():
    """One bright cell at (y=2, x=5) of the 8 x 8 grid lights exactly the tokens (y+dy)*8 + (x+dx)."""
    from moedit.data.repa import RandomPatchFeatures

    image = np.zeros((1, 16, 16), np.float32)
    image[0, 4:6, 10:12] = 1.0  # pools to cell (2, 5)
    features = RandomPatchFeatures("random:8", 8).encode([image])[0]
    lit = sorted(int(t) for t in torch.nonzero(features.abs().sum(-1)))
    assert lit == sorted((2 + dy) * 8 + 5 + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    pooled = image.reshape(1, 8, 2, 8, 2).mean((2, 4))
    np.testing.assert_allclose(features.numpy(), reference_random(pooled, 8), rtol=1e-5, atol=1e-6)


def test_digits_repa_builtin(tmp_path):
    manifest = prepare_builtin("digits_repa", tmp_path / "d", progress=False)
    assert manifest.num_samples == 1797 and manifest.latent_shape == [1, 8, 8]
    assert manifest.repa_encoder == {"path": "random:32", "type": "random", "width": 32, "grid": 8, "image_size": None}
    assert manifest.fields == {"repa": {"dtype": "float16", "shape": [64, 32]}}
    samples = read_wds(tmp_path / "d")[:40]
    for sample in samples:
        expected = reference_random(sample["npy"], 32).astype(np.float16)
        np.testing.assert_allclose(sample["repa.npy"].astype(np.float32), expected.astype(np.float32), rtol=1e-3, atol=1e-3)
    assert len({s["repa.npy"].tobytes() for s in samples}) == len(samples)  # image-dependent


def test_random_features_on_synthetic_latents_and_flips(tmp_path, images):
    out = tmp_path / "syn"
    assert cli_main(["prepare", "--source", "synthetic", "--output", str(out), "--latent-shape", "4,8,8",
                     "--num-samples", "6", "--repa-encoder", "random:16", "--no-progress"]) == 0
    manifest = load_manifest(str(out))
    assert manifest.repa_encoder["grid"] == 4 and manifest.fields["repa"]["shape"] == [16, 16]
    for sample in read_wds(out):
        pooled = sample["npy"].astype(np.float32).reshape(4, 4, 2, 4, 2).mean((2, 4))
        np.testing.assert_allclose(sample["repa.npy"].astype(np.float32), reference_random(pooled, 16), rtol=1e-3, atol=2e-3)
    spec = PrepareSpec(SourceSpec("folder", input=str(images)), dtype="float32", flip=True, repa_encoder="random:8",
                       repa_grid=4)
    prepare(spec, str(tmp_path / "flip"), progress=False)
    samples = read_wds(tmp_path / "flip")
    for plain, flipped in zip(samples[::2], samples[1::2]):
        assert np.array_equal(flipped["npy"], plain["npy"][:, :, ::-1])
        assert not np.array_equal(flipped["repa.npy"], plain["repa.npy"])
        pooled = flipped["npy"].reshape(3, 4, 8, 4, 8).mean((2, 4))
        np.testing.assert_allclose(flipped["repa.npy"].astype(np.float32), reference_random(pooled, 8), rtol=1e-3, atol=2e-3)


# ---- the loader ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_repa(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_repa")
    spec = PrepareSpec(SourceSpec("digits", num_samples=45), channels=1, dtype="float32", shard_size=6,
                       repa_encoder="random:32", repa_grid=8)
    prepare(spec, str(root), progress=False)
    return str(root)


def test_loader_returns_repa_by_name_aligned_with_the_latents(digits_repa):
    batches = list(build_loader(DataConfig(path=digits_repa, num_workers=0, shuffle_buffer=7, fields=["repa"]),
                                batch_size=5))
    assert sum(len(y) for _, y, _ in batches) == 45
    for x, _, fields in batches:
        assert sorted(fields) == ["repa"] and fields["repa"].dtype == torch.float16
        assert fields["repa"].shape == (len(x), 64, 32)
        for latent, repa in zip(x, fields["repa"]):
            expected = reference_random(latent.numpy(), 32)
            np.testing.assert_allclose(repa.float().numpy(), expected, rtol=1e-3, atol=1e-3)


def test_resume_with_repa_is_exact(digits_repa):
    cfg = DataConfig(path=digits_repa, num_workers=2, shuffle_buffer=5, fields=["repa"])

    def flat(batches):
        return [(x.tolist(), y.tolist(), f["repa"].tolist()) for x, y, f in batches]

    whole = flat(itertools.islice(build_loader(cfg, batch_size=4, seed=1).forever(), 16))
    first = build_loader(cfg, batch_size=4, seed=1)
    head = flat(itertools.islice(first.forever(), 7))
    resumed = build_loader(cfg, batch_size=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + flat(itertools.islice(resumed.forever(), 9)) == whole  # crosses the epoch boundary (12 batches)


# ---- named errors --------------------------------------------------------------------------------------
def test_missing_or_wrong_encoder_is_a_one_line_error(tmp_path, images, dinov2_dir, capsys):
    args = ["prepare", "--source", "folder", "--input", str(images), "--no-progress"]

    def error(*extra) -> str:
        assert cli_main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    err = error("--repa-encoder", str(tmp_path / "nothing"), "--output", str(tmp_path / "a"))
    assert err.startswith(f"moedit prepare: error: REPA encoder directory {tmp_path / 'nothing'} not found: "
                          "pass --repa-encoder DIR") and "never downloads" in err
    assert not (tmp_path / "a").exists()  # checked before anything is written
    (tmp_path / "empty").mkdir()
    assert "no REPA encoder at" in error("--repa-encoder", str(tmp_path / "empty"), "--output", str(tmp_path / "b"))
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    assert f"REPA encoder {tmp_path / 'vit'}: model_type 'vit' is not a DINOv2" in error(
        "--repa-encoder", str(tmp_path / "vit"), "--output", str(tmp_path / "c"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32}))
    assert f"REPA encoder {tmp_path / 'noweights'}: cannot load its Dinov2Model" in error(
        "--repa-encoder", str(tmp_path / "noweights"), "--output", str(tmp_path / "d"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert "cannot read config.json" in error("--repa-encoder", str(tmp_path / "bad"), "--output", str(tmp_path / "e"))
    assert "random features need a width" in error("--repa-encoder", "random:wide", "--output", str(tmp_path / "f"))
    assert "a DINOv2 cannot encode them" in error("--source", "synthetic", "--repa-encoder", dinov2_dir,
                                                  "--output", str(tmp_path / "g"))


def test_grid_that_cannot_be_resampled_is_named(tmp_path, images, dinov2_dir, capsys):
    with pytest.raises(MoeditError, match=r"gives 12 patch tokens, not a square g x g grid: cannot resample them to "
                                          r"the model's 4 x 4 tokens"):
        resample_tokens(torch.zeros(1, 12, 4), 4)
    with pytest.raises(MoeditError, match=r"REPA grid 0: the model's token grid must be 1 or more"):
        resample_tokens(torch.zeros(1, 16, 4), 0)
    assert cli_main(["prepare", "--source", "folder", "--input", str(images), "--repa-encoder", "random:4",
                     "--repa-grid", "0", "--output", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "--repa-grid 0: the model's token grid must be 1 or more" in capsys.readouterr().err
    spec = PrepareSpec(SourceSpec("folder", input=str(images)), repa_encoder=dinov2_dir, repa_image_size=30)
    with pytest.raises(MoeditError, match=r"--repa-image-size 30 is not a multiple of the REPA encoder's patch size 4"):
        prepare(spec, str(tmp_path / "b"), progress=False)


def test_width_or_grid_must_match_the_shards_being_resumed(tmp_path, images, dinov2_dir):
    encoder = tmp_path / "encoder"
    shutil.copytree(dinov2_dir, encoder)
    spec = PrepareSpec(SourceSpec("folder", input=str(images)), shard_size=2, repa_encoder=str(encoder),
                       repa_grid=4, repa_image_size=SIZE)
    out = tmp_path / "out"
    prepare(spec, str(out), progress=False)
    with pytest.raises(MoeditError, match=rf"{out} holds REPA features of width 32 on a 4 x 4 grid \(encoder .*encoder\), "
                                          r"but encoder .*encoder gives width 32 on 8 x 8: use the encoder and --repa-grid"):
        prepare(PrepareSpec(**{**spec.__dict__, "repa_grid": 8}), str(out), progress=False)
    os.remove(out / "dataset.json")  # as after a kill: the progress record still names the shape
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "hidden_size": 16}))  # another model, same path
    with pytest.raises(MoeditError, match=r"holds REPA features of width 32 on a 4 x 4 grid .* gives width 16 on 4 x 4"):
        prepare(spec, str(out), progress=False)


def test_loader_names_a_missing_repa_field_and_manifests_stay_valid(tmp_path, digits_dir, digits_repa):
    with pytest.raises(MoeditError, match=rf"^{digits_dir}/dataset.json does not list field 'repa' that data.fields asks "
                                          r"for \(stored fields: none\): prepare the shards with REPA features "
                                          r"\(`moedit prepare ... --repa-encoder DIR`, or data.prepare: digits_repa"):
        build_loader(DataConfig(path=str(digits_dir), fields=["repa"]), batch_size=4)
    assert "repa_encoder" not in json.loads((digits_dir / "dataset.json").read_text())  # old manifests unchanged
    assert load_manifest(str(digits_dir)).repa_encoder is None
    manifest = load_manifest(digits_repa)
    manifest.fields["repa"]["shape"] = [16, 32]
    shutil.copytree(digits_repa, tmp_path / "bad")
    write_manifest(manifest, str(tmp_path / "bad"))
    with pytest.raises(MoeditError, match=r"field 'repa' has shape \[16, 32\], but the repa_encoder gives "
                                          r"\[grid\^2, width\] = \[64, 32\]"):
        load_manifest(str(tmp_path / "bad"))


def test_transformers_is_not_imported_for_random_features(tmp_path):
    code = ("import sys; from moedit.data.prepare import PrepareSpec, prepare; from moedit.data.sources import SourceSpec; "
            f"prepare(PrepareSpec(SourceSpec('digits', num_samples=4), channels=1, repa_encoder='random:8', repa_grid=8), "
            f"{str(tmp_path / 'o')!r}, progress=False); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
