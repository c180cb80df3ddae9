"""moedit export: diffusers DiTTransformer2DModel equivalence, official and diffusers round trips."""

import json

import pytest
import torch

from moedit import cli
from moedit.errors import MoeditError
from moedit.interop.convert import build_config, convert_checkpoint, write_checkpoint
from moedit.interop.export import export_diffusers, export_official, patch_diffusers_time_embedding
from moedit.models import build_model
from moedit.train.checkpoint import load_for_inference

pytest.importorskip("diffusers")


def make_checkpoint(path, flavor, fields=(), seed=0):
    """A checkpoint directory of `flavor` whose every tensor is random (raw and EMA differ)."""
    objective = "flow" if "model.learn_sigma=false" in fields else "ddpm"
    cfg = build_config(flavor, None, list(fields), objective)
    states = []
    for offset in (0, 1):
        torch.manual_seed(seed + offset)
        model = build_model(cfg.model)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name != "pos_embed" and tensor.is_floating_point():
                    tensor.normal_(0, 0.1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    write_checkpoint(path, cfg, states[0], states[1], {"test": True})
    return cfg, states[1]  # EMA


@pytest.fixture
def dense_dir(tmp_path):
    return tmp_path / "dense", make_checkpoint(tmp_path / "dense", "tiny-dense")


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_diffusers_model_matches_moedit_dit(dense_dir, tmp_path):
    from diffusers import DiTTransformer2DModel

    path, (cfg, _) = dense_dir
    export_diffusers(path, tmp_path / "hf")
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_for_inference(path)
    assert cfg.model.learn_sigma and ours.cfg.out_channels == 8
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 9, 10])  # 10 = the null (CFG) class
    with torch.no_grad():
        zero = torch.zeros(4)  # timestep features agree exactly at t = 0
        assert _relative(theirs(x, timestep=zero.long(), class_labels=y).sample, ours(x, zero, y)) <= 1e-5
        t = torch.tensor([1, 250, 600, 999])  # integer DDPM steps, the same index for both
        unpatched = theirs(x, timestep=t, class_labels=y).sample
        patch_diffusers_time_embedding(theirs)
        patched = theirs(x, timestep=t, class_labels=y).sample
        expected = ours(x, t.float(), y)
        other_class = ours(x, t.float(), torch.tensor([1, 4, 8, 2]))
    assert _relative(patched, expected) <= 1e-5  # all 8 channels, learned sigma included
    assert _relative(unpatched, expected) > 1e-3  # diffusers' 10000^(-k/127) frequencies differ
    assert _relative(other_class, expected) > 1e-3  # class conditioning is exercised


def test_diffusers_round_trip_is_bit_identical(dense_dir, tmp_path, monkeypatch):
    path, (cfg, ema) = dense_dir
    monkeypatch.setitem(cli.COMMANDS, "export", ("moedit.interop.export_cli", "export"))
    monkeypatch.setitem(cli.COMMANDS, "convert", ("moedit.interop.convert_cli", "convert"))
    assert cli.main(["export", str(path), "--format", "diffusers", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["norm_eps"] == 1e-6
    assert cli.main(["convert", "--from", "diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    model, back_cfg = load_for_inference(tmp_path / "back")
    assert back_cfg.flavor == "tiny-dense" and back_cfg.model == cfg.model
    state = model.state_dict()
    assert set(state) == set(ema) and all(torch.equal(state[k], ema[k]) for k in ema)


@pytest.mark.parametrize("flavor, layout", [("tiny-dense", "dit"), ("tiny-diffmoe", "diffmoe"),
                                            ("tiny-ditmoe", "ditmoe")])
def test_official_round_trip_is_bit_identical(tmp_path, flavor, layout):
    cfg, ema = make_checkpoint(tmp_path / "src", flavor, seed=5)
    export_official(tmp_path / "src", tmp_path / "official.pt", layout)
    official = torch.load(tmp_path / "official.pt", weights_only=True)
    if layout == "diffmoe":
        assert float(official["blocks.1.mlp.ema_decay"]) == pytest.approx(cfg.model.moe.threshold_decay)
        assert "blocks.1.mlp.experts.3.fc2.bias" in official
    convert_checkpoint(tmp_path / "official.pt", layout, tmp_path / "back", flavor=flavor,
                       overrides=["diffusion.objective=ddpm", "model.learn_sigma=true"])
    model, back_cfg = load_for_inference(tmp_path / "back")
    state = model.state_dict()
    assert back_cfg.model == cfg.model
    assert set(state) == set(ema) and all(torch.equal(state[k], ema[k]) for k in ema)


def test_moe_and_unconditional_models_are_not_diffusers_dits(tmp_path):
    make_checkpoint(tmp_path / "moe", "tiny-diffmoe")
    with pytest.raises(MoeditError, match="MoE layers"):
        export_diffusers(tmp_path / "moe", tmp_path / "hf")
    make_checkpoint(tmp_path / "unc", "tiny-dense", ["model.num_classes=0"])
    with pytest.raises(MoeditError, match="class-conditional"):
        export_diffusers(tmp_path / "unc", tmp_path / "hf2")
    with pytest.raises(MoeditError, match="dit layout is dense"):
        export_official(tmp_path / "moe", tmp_path / "x.pt", "dit")


def test_safetensors_export_loads_without_the_run(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "src", "tiny-ditmoe", seed=9)
    monkeypatch.setitem(cli.COMMANDS, "export", ("moedit.interop.export_cli", "export"))
    out = tmp_path / "export" / "m.safetensors"
    assert cli.main(["export", str(tmp_path / "src"), "--format", "safetensors", "--out", str(out)]) == 0
    exported, _ = load_for_inference(out)
    original, _ = load_for_inference(tmp_path / "src")
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(exported(x, t, y), original(x, t, y))
