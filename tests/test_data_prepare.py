"""`moedit prepare`: VAE encoding, image sources, clear errors, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.cli import main as cli_main
from moedit.data import DataConfig, build_decoder, build_loader, load_manifest
from moedit.data.prepare import PrepareSpec, prepare
from moedit.data.sources import SourceSpec
from moedit.errors import MoeditError


def load_all(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build_loader(DataConfig(path=root, num_workers=0, shuffle=False), batch_size=64)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """2 classes x 3 random 16x16 RGB images (already at the target size: no resampling)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for i in range(3):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.3)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path, vae.eval()


def as_input(path: str, flip: bool = False) -> torch.Tensor:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
    x = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) in [-1, 1]
    return x.flip(-1) if flip else x


def test_vae_latents_match_a_direct_encode_and_carry_the_scaling(tmp_path, image_folder, tiny_vae):
    vae_path, vae = tiny_vae
    spec = PrepareSpec(SourceSpec("folder", input=str(image_folder)), encoder="vae", vae=vae_path, image_size=16,
                       flip=True, dtype="float32", shard_size=5, batch_size=4)
    prepare(spec, str(tmp_path), progress=False)
    manifest = load_manifest(str(tmp_path))
    assert (manifest.latent_shape, manifest.scaling_factor, manifest.class_names) == ([4, 8, 8], 0.3, ["cat", "dog"])
    assert manifest.encoder["type"] == "autoencoderkl" and manifest.encoder["latent_sample"] == "mean"
    latents, labels = load_all(str(tmp_path))
    assert labels.tolist() == [0] * 6 + [1] * 6
    files = [image_folder / c / f"{i}.png" for c in ("cat", "dog") for i in range(3)]
    inputs = torch.stack([as_input(str(f), flip) for f in files for flip in (False, True)])
    with torch.no_grad():
        expected = vae.encode(inputs).latent_dist.mean * 0.3  # (12, 4, 8, 8)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    decoded = build_decoder(manifest)(latents[:2])
    with torch.no_grad():
        reference = ((vae.decode(expected[:2] / 0.3).sample + 1) / 2).clamp(0, 1)
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, reference, rtol=1e-4, atol=1e-5)


def test_sampled_latents_are_seeded(tmp_path, image_folder, tiny_vae):
    def run(out, seed):
        spec = PrepareSpec(SourceSpec("folder", input=str(image_folder)), encoder="vae", vae=tiny_vae[0],
                           image_size=16, latent_sample="sample", dtype="float32", shard_size=6, seed=seed)
        prepare(spec, str(tmp_path / out), progress=False)
        return (tmp_path / out / "shard-000000.tar").read_bytes()

    assert run("a", 0) == run("b", 0)
    assert run("a2", 0) != run("c", 1)


def test_missing_vae_weights_is_a_one_line_error(tmp_path, capsys):
    args = ["prepare", "--source", "digits", "--encoder", "vae", "--vae", str(tmp_path / "nothing"),
            "--output", str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"moedit prepare: error: no AutoencoderKL at {tmp_path / 'nothing'} (config.json missing)")
    assert "pass --vae DIR" in err and "never downloads" in err
    with pytest.raises(MoeditError, match="--encoder vae needs weights"):
        prepare(PrepareSpec(SourceSpec("digits"), encoder="vae", vae=None), str(tmp_path / "o2"), progress=False)


def test_hugging_face_dataset_on_disk_and_parquet_give_the_same_shards(tmp_path, image_folder):
    import datasets

    files = [(str(image_folder / c / f"{i}.png"), label) for label, c in enumerate(("cat", "dog")) for i in range(3)]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog"])})
    data = datasets.Dataset.from_dict({"img": [f for f, _ in files], "y": [y for _, y in files]}, features=features)
    data.save_to_disk(str(tmp_path / "hf"))
    data.to_parquet(str(tmp_path / "data.parquet"))
    outputs = {}
    for kind, path in (("hf", tmp_path / "hf"), ("parquet", tmp_path / "data.parquet"), ("folder", image_folder)):
        source = SourceSpec(kind, input=str(path), image_key="img", label_key="y")
        prepare(PrepareSpec(source, image_size=16, dtype="float32", shard_size=4), str(tmp_path / kind), progress=False)
        outputs[kind] = [(tmp_path / kind / f"shard-{i:06d}.tar").read_bytes() for i in range(2)]
    assert outputs["hf"] == outputs["parquet"] == outputs["folder"]
    latents, _ = load_all(str(tmp_path / "hf"))
    torch.testing.assert_close(latents[4], as_input(files[4][0]), rtol=0, atol=0)
    assert load_manifest(str(tmp_path / "parquet")).class_names == ["cat", "dog"]


def test_preparation_resumes_after_a_kill(tmp_path):
    args = ["--source", "digits", "--image-size", "24", "--shard-size", "15", "--no-progress"]
    victim = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "moedit.cli", "prepare", *args, "--output", str(victim)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and len(list(victim.glob(".prepare/*.tar.json"))) < 5:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(victim.glob(".prepare/*.tar.json")))
    assert 5 <= done < 120 and not (victim / "dataset.json").exists(), f"kill came too late ({done} shards)"
    # plant the debris a kill can leave, plus a finished shard whose bytes went bad
    (victim / "shard-000003.tar.tmp-999").write_bytes(b"half a shard")
    (victim / "shard-000001.tar").write_bytes(b"corrupted")
    assert cli_main(["prepare", *args, "--output", str(victim)]) == 0
    assert cli_main(["prepare", *args, "--output", str(tmp_path / "fresh")]) == 0
    fresh = sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.is_file())
    assert fresh == sorted(p.name for p in victim.iterdir() if p.is_file())
    for name in fresh:
        assert (victim / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    with pytest.raises(MoeditError, match="holds shards prepared with other settings"):
        prepare(PrepareSpec(SourceSpec("digits"), image_size=8, shard_size=15), str(victim), progress=False)
