"""`moedit sample` on a tiny DiffMoE model (checkpoint loading and decoding stubbed to their contracts):
determinism, the capacity record per model call, guidance batching, --print-config, the manifest."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from moedit import cli
from moedit.diffusion import DiffusionConfig
from moedit.diffusion.grid import make_grid, save_grid
from moedit.models import MoEConfig, ModelConfig, build_model

NUM_CLASSES, SIZE = 10, 8



@pytest.fixture
def checkpoint(monkeypatch, tmp_path):
    """A tiny DiffMoE-DiT behind `load_for_inference`, and a pixel-space decoder behind `build_decoder`."""
    mcfg = ModelConfig(input_size=SIZE, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                       num_classes=NUM_CLASSES, learn_sigma=False, moe=MoEConfig(router="diffmoe", num_experts=4))
    torch.manual_seed(0)
    model = build_model(mcfg)
    with torch.no_grad():  # DiT zero-initialises its output layer; give the network something to say
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = SimpleNamespace(model=mcfg, diffusion=DiffusionConfig(objective="flow", sample_steps=3),
                          data=SimpleNamespace(path=str(tmp_path / "shards"), manifest=None))
    calls, manifests = [], []

    def load_for_inference(path, use_ema=True, device="cpu"):
        calls.append((path, use_ema))
        return model.to(device).eval(), cfg

    monkeypatch.setattr("moedit.train.checkpoint.load_for_inference", load_for_inference)
    monkeypatch.setattr("moedit.data.load_manifest", lambda path: manifests.append(path) or path)
    monkeypatch.setattr("moedit.data.build_decoder", lambda manifest, vae_path=None: lambda z: ((z + 1) / 2).clamp(0, 1))
    return SimpleNamespace(calls=calls, dir=tmp_path, cfg=cfg, manifests=manifests, model=model)


def run(tmp_path, *extra):
    return cli.main(["sample", "ckpt", "--num-samples", "5", "--steps", "3", "--batch-size", "3", *extra])


def test_sample_is_deterministic_and_records_capacity_per_call(checkpoint, tmp_path):
    outs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert run(tmp_path, "--seed", str(seed), "--sampler", "heun", "--cfg-scale", "2.0", "--classes", "1,3",
                   "--out", str(tmp_path / f"{name}.png")) == 0
        outs[name] = ((tmp_path / f"{name}.png").read_bytes(), json.loads((tmp_path / f"{name}.json").read_text()))
    assert outs["a"] == outs["b"] and outs["a"][0] != outs["c"][0]
    info = outs["a"][1]
    assert info["classes"] == [1, 3, 1, 3, 1] and info["sampler"] == "heun" and info["steps"] == 3
    # 2 batches (3 + 2 images) x 3 Heun steps x 2 calls; one MoE layer (block 1 of 2)
    records = info["capacity_per_call"]
    assert [(r["batch"], r["call"]) for r in records] == [(b, c) for b in (0, 1) for c in range(6)]
    assert all(set(r["capacity"]) == {"1"} and r["capacity"]["1"] > 0 for r in records)
    assert records[0]["noise_level"] == 1.0 and records[1]["t"] == pytest.approx(1 / 3)
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    tile = SIZE * (64 // SIZE)  # small images are enlarged to at least 64 px
    assert grid.shape == (2 * (tile + 2) + 2, 3 * (tile + 2) + 2, 3)  # nrow = ceil(sqrt(5)) = 3
    assert checkpoint.calls[0] == ("ckpt", True)


def test_raw_weights_and_bad_classes(checkpoint, tmp_path, capsys):
    assert run(tmp_path, "--raw", "--out", str(tmp_path / "r.png")) == 0
    assert checkpoint.calls[-1] == ("ckpt", False)
    assert len(json.loads((tmp_path / "r.json").read_text())["classes"]) == 5  # random labels
    assert run(tmp_path, "--classes", "3,10", "--out", str(tmp_path / "x.png")) == 2
    assert "--classes" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert run(tmp_path, "--steps", "0", "--out", str(tmp_path / "y.png")) == 2
    assert "steps" in capsys.readouterr().err


def test_guidance_batching_is_recorded_and_changes_the_pool(checkpoint, tmp_path):
    """separate: two calls of B per step (conditional, then all-null); joint: one call of 2B."""
    for threshold in checkpoint.model.threshold_buffers():  # trained-like thresholds: not every token passes
        threshold.fill_(0.5)
    infos = {}
    for batching in ("joint", "separate"):
        out = tmp_path / f"{batching}.png"
        assert run(tmp_path, "--cfg-scale", "2.0", "--classes", "1,3", "--cfg-batching", batching, "--out", str(out)) == 0
        infos[batching] = json.loads(out.with_suffix(".json").read_text())
    joint, separate = infos["joint"], infos["separate"]
    assert (joint["cfg_batching"], separate["cfg_batching"], joint["batch_size"]) == ("joint", "separate", 3)
    # batch 0 (3 images) x 3 Euler steps: joint 3 calls of 6 rows, half null; separate 6 calls of 3 rows
    assert [(r["rows"], r["null_rows"]) for r in joint["capacity_per_call"] if r["batch"] == 0] == [(6, 3)] * 3
    assert [(r["rows"], r["null_rows"]) for r in separate["capacity_per_call"] if r["batch"] == 0] == \
        [(3, 0), (3, 3)] * 3
    # the pool decides which tokens each expert takes: capacities and images change
    assert [r["capacity"] for r in joint["capacity_per_call"]] != [r["capacity"] for r in separate["capacity_per_call"]]
    assert (tmp_path / "joint.png").read_bytes() != (tmp_path / "separate.png").read_bytes()
    checkpoint.cfg.diffusion.cfg_batching = "separate"  # the checkpoint's default applies without the flag
    assert run(tmp_path, "--cfg-scale", "2.0", "--classes", "1,3", "--out", str(tmp_path / "d.png")) == 0
    assert (tmp_path / "d.png").read_bytes() == (tmp_path / "separate.png").read_bytes()


def test_print_config_shows_the_checkpoints_sampling_settings(checkpoint, tmp_path, capsys):
    checkpoint.cfg.diffusion = DiffusionConfig(objective="flow", sampler="heun", sample_steps=7, cfg_scale=1.5,
                                               guidance_channels=2, cfg_batching="separate")
    assert run(tmp_path, "--print-config", "--out", str(tmp_path / "p.png")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sampling"] == {"objective": "flow", "sampler": "heun", "steps": 3, "cfg_scale": 1.5,
                                 "guidance_channels": 2, "guidance_interval": None, "cfg_batching": "separate",
                                 "batch_size": 3}  # run() passes --steps 3 and --batch-size 3
    assert "2 heads (head dim 16)" in shown["architecture"] and not (tmp_path / "p.png").exists()


def test_sample_reads_the_manifest_named_by_data_manifest(checkpoint, tmp_path):
    (tmp_path / "shards").mkdir()
    assert run(tmp_path, "--out", str(tmp_path / "a.png")) == 0
    assert checkpoint.manifests[-1] == str(tmp_path / "shards" / "dataset.json")  # beside data.path by default
    checkpoint.cfg.data.manifest = str(tmp_path / "elsewhere" / "dataset.json")
    assert run(tmp_path, "--out", str(tmp_path / "b.png")) == 0
    assert checkpoint.manifests[-1] == str(tmp_path / "elsewhere" / "dataset.json")


def test_grid_layout_and_grayscale():
    images = torch.zeros(5, 1, 4, 6)
    images[4] = 1.0
    grid = make_grid(images, nrow=2, padding=1, min_tile=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    assert np.all(grid[1 + 2 * 5:1 + 2 * 5 + 4, 1:7] == 255)  # fifth image: row 2, column 0, white
    assert np.all(grid[1:5, 1:7] == 0) and np.all(grid[0] == 255)  # first image black, padding white
    with pytest.raises(ValueError, match="shape"):
        make_grid(torch.zeros(2, 4, 3, 3))


def test_save_grid_round_trips(tmp_path):
    images = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    grid = save_grid(images, tmp_path / "sub" / "g.png", nrow=2, min_tile=1)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "g.png")), grid)
    expected = (images[3].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(grid[2 + 7:2 + 7 + 5, 2 + 7:2 + 7 + 5], expected)


def test_small_images_are_enlarged_by_an_integer_factor():
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = make_grid(images, nrow=2, padding=0, min_tile=64)
    assert grid.shape == (64, 128, 3)
    block = grid[8:16, 16:24, 0]  # pixel (1, 2) of the first image as an 8x8 block
    assert np.all(block == block[0, 0]) and block[0, 0] == round(float(images[0, 0, 1, 2]) * 255)
