"""moedit convert: official layouts (names/shapes from the published code), strictness, safe
unpickling, DiffMoE thresholds, rectified-flow conventions, and use of the converted directory."""

import argparse
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from moedit import cli
from moedit.errors import MoeditError
from moedit.interop.convert import build_config, convert_checkpoint, official_to_moedit
from moedit.interop.layouts import official_shapes, to_official
from moedit.models import build_model, get_flavor
from moedit.train.checkpoint import is_complete, load_for_inference

OFFICIAL = json.loads(gzip.open(Path(__file__).parent / "data" / "models_official_state_dict_shapes.json.gz",
                                "rt").read())
LAYOUT_OF = {"DiT-XL/2": "dit", "DiT-S/2": "dit", "DiffMoE-S-E16": "diffmoe", "DiT-MoE-S/2-8E2A": "ditmoe"}
COMMANDS = {"convert": ("moedit.interop.convert_cli", "convert"), "export": ("moedit.interop.export_cli", "export"),
            "upcycle": ("moedit.interop.upcycle_cli", "upcycle"),
            "sample": ("moedit.eval.sample_cli", "sample"), "train": ("moedit.train.cli", "train")}


@pytest.fixture
def moedit_cli(monkeypatch):
    """`moedit ...` in process, with the interop commands registered as the lead will register them."""
    for name, entry in COMMANDS.items():
        monkeypatch.setitem(cli.COMMANDS, name, entry)
    return cli.main


def random_official(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the published names and shapes. Each tensor is a view at a
    random offset into one pool of normal samples: distinct random values per tensor without
    allocating the S models' hundreds of megabytes twice."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=gen)
    state = {}
    for key, shape in OFFICIAL[name]:
        numel = math.prod(shape)
        start = int(torch.randint(0, pool.numel() - numel, (1,), generator=gen))
        state[key] = pool[start:start + numel].view(shape)
    for key in state:
        if key.endswith("ema_decay"):
            state[key] = torch.tensor([0.95])
    return state


def random_model_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """A moedit model's state dict with every tensor random (thresholds included, pos_embed kept)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name != "pos_embed" and tensor.is_floating_point():
                tensor.normal_(0, 0.2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(LAYOUT_OF))
def test_official_layout_derived_from_moedit_equals_published(name):
    expected = {key: tuple(shape) for key, shape in OFFICIAL[name]}
    assert official_shapes(get_flavor(name), LAYOUT_OF[name]) == expected  # XL: meta device only


@pytest.mark.parametrize("name", ["DiT-S/2", "DiffMoE-S-E16", "DiT-MoE-S/2-8E2A"])
def test_random_official_state_converts_and_loads_strictly(name):
    official = random_official(name)
    cfg = get_flavor(name)
    state, decay = official_to_moedit(official, LAYOUT_OF[name], cfg, "ddpm", "test")
    model = build_model(cfg, device="meta")
    model.load_state_dict(state, strict=True, assign=True)  # every target filled, nothing left over
    # every source tensor lands somewhere: the inverse map gives back exactly the source
    back = to_official(state, cfg, LAYOUT_OF[name])
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)
    if name == "DiffMoE-S-E16":
        assert decay == pytest.approx(0.95)
        assert torch.equal(model.blocks[3].mlp.router.expert_threshold, official["blocks.3.mlp.expert_threshold"])
        assert torch.equal(model.blocks[3].mlp.experts.fc2_weight[7], official["blocks.3.mlp.experts.7.fc2.weight"])
    if name == "DiT-MoE-S/2-8E2A":
        assert torch.equal(model.blocks[5].mlp.experts.up_proj_weight[2], official["blocks.5.moe.experts.2.up_proj.weight"])
        assert torch.equal(model.blocks[5].mlp.router.gate.weight, official["blocks.5.moe.gate.weight"])


def test_renamed_reshaped_and_missing_tensors_are_each_listed():
    official = {k: torch.empty(s, device="meta") for k, s in OFFICIAL["DiffMoE-S-E16"]}
    official["blocks.3.attn.qkv_weight"] = official.pop("blocks.3.attn.qkv.weight")
    official["final_layer.linear.bias"] = torch.empty(16, device="meta")
    del official["blocks.5.mlp.experts.15.fc1.bias"]
    with pytest.raises(MoeditError) as info:
        official_to_moedit(official, "diffmoe", get_flavor("DiffMoE-S-E16"), "ddpm", "ckpt.pt")
    lines = [line.strip() for line in str(info.value).splitlines()]
    assert "missing: blocks.3.attn.qkv.weight [1152, 384]" in lines[1:]
    assert "missing: blocks.5.mlp.experts.15.fc1.bias [1536]" in lines[1:]
    assert "unexpected: blocks.3.attn.qkv_weight [1152, 384]" in lines[1:]
    assert "shape mismatch: final_layer.linear.bias: file [16], expected [32]" in lines[1:]
    assert lines[0].startswith("ckpt.pt: not the diffmoe layout of DiffMoE-S-E16: 531 of 534")
    with pytest.raises(MoeditError, match="missing: blocks.1.mlp.capacity_predictor.0.weight"):
        bad = {k: torch.empty(s, device="meta") for k, s in OFFICIAL["DiT-MoE-S/2-8E2A"]}
        official_to_moedit(bad, "diffmoe", get_flavor("DiffMoE-S-E16"), "ddpm", "x")  # wrong family


def _tiny(flavor: str, **fields):
    import dataclasses

    return dataclasses.replace(get_flavor(flavor), **fields)


def test_training_checkpoint_with_namespace_args_keeps_raw_and_ema(tmp_path, moedit_cli):
    cfg = get_flavor("tiny-diffmoe")
    raw, ema = random_model_state(cfg, 1), random_model_state(cfg, 2)
    blob = {"model": to_official(raw, cfg, "diffmoe"), "ema": to_official(ema, cfg, "diffmoe"),
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "args": argparse.Namespace(config="configs/x.yaml", global_seed=0)}
    torch.save(blob, tmp_path / "0700000.pt")
    out = tmp_path / "converted"
    code = moedit_cli(["convert", "--from", "diffmoe", str(tmp_path / "0700000.pt"), "--flavor", "tiny-diffmoe",
                       "--out", str(out), "--set", "diffusion.objective=ddpm", "model.learn_sigma=true"])
    assert code == 0 and is_complete(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["imported"] and meta["world_size"] == 0 and meta["step"] == 0
    for use_ema, expected in ((True, ema), (False, raw)):
        model, loaded = load_for_inference(out, use_ema=use_ema)
        assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
        assert loaded.model == cfg and loaded.diffusion.objective == "ddpm"
    thresholds = load_for_inference(out)[0].threshold_buffers()
    assert torch.equal(thresholds[0], ema["blocks.1.mlp.router.expert_threshold"])  # carried over, nonzero
    assert thresholds[0].abs().sum() > 0
    only_raw = tmp_path / "raw"
    convert_checkpoint(tmp_path / "0700000.pt", "diffmoe", only_raw, flavor="tiny-diffmoe", weights="raw",
                       overrides=["diffusion.objective=ddpm", "model.learn_sigma=true"])
    model, _ = load_for_inference(only_raw, use_ema=True)
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)


class _Payload:
    """Unpickling this runs `_touch(path)`: a stand-in for a malicious object."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (str(self.path),))


def _touch(path):
    Path(path).write_text("code ran")


def test_pickle_with_arbitrary_object_is_refused_without_trust(tmp_path, moedit_cli, capsys):
    cfg = get_flavor("tiny-dense")
    marker = tmp_path / "marker"
    torch.save({"model": random_model_state(cfg), "args": _Payload(marker)}, tmp_path / "evil.pt")
    code = moedit_cli(["convert", "--from", "dit", str(tmp_path / "evil.pt"), "--flavor", "tiny-dense",
                       "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--trust-pickle" in err and "it holds test_interop_convert._touch" in err
    assert not marker.exists() and not (tmp_path / "o").exists()
    with pytest.warns(UserWarning, match="full unpickling"):
        convert_checkpoint(tmp_path / "evil.pt", "dit", tmp_path / "o", flavor="tiny-dense", trust_pickle=True)
    assert marker.exists() and is_complete(tmp_path / "o")


def test_flow_checkpoint_with_variance_channels_keeps_the_velocity_half(tmp_path):
    """DiffMoE's flow code trains 2C outputs and uses the first C: the converted C-channel model
    computes exactly those channels."""
    source_cfg = _tiny("tiny-diffmoe", learn_sigma=True)
    state = random_model_state(source_cfg, 3)
    torch.save(to_official(state, source_cfg, "diffmoe"), tmp_path / "flow.pt")
    convert_checkpoint(tmp_path / "flow.pt", "diffmoe", tmp_path / "c", flavor="tiny-diffmoe")  # default: flow
    converted, cfg = load_for_inference(tmp_path / "c")
    assert cfg.diffusion.objective == "flow" and not cfg.model.learn_sigma
    source = build_model(source_cfg).eval()
    source.load_state_dict(state)
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, t, y), source(x, t, y)[:, :4], rtol=1e-6, atol=1e-6)


def test_ditmoe_flow_time_is_reversed_into_moedits_convention(tmp_path):
    """DiT-MoE's flow: t = 0 data, output noise - data. Converted: f(x, t) = -g(x, 1 - t)[:C]."""
    source_cfg = _tiny("tiny-ditmoe")
    state = random_model_state(source_cfg, 4)
    torch.save(to_official(state, source_cfg, "ditmoe"), tmp_path / "rf.pt")
    convert_checkpoint(tmp_path / "rf.pt", "ditmoe", tmp_path / "c", flavor="tiny-ditmoe",
                       overrides=["diffusion.objective=flow"])
    converted, _ = load_for_inference(tmp_path / "c")
    source = build_model(source_cfg).eval()
    source.load_state_dict(state)
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([0.0, 0.3, 0.71, 1.0]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        expected = -source(x, 1 - t, y)[:, :4]
        got = converted(x, t, y)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (got + source(x, t, y)[:, :4]).abs().max() > 1e-2 * expected.abs().max()  # t really was reversed


def test_bad_inputs_name_what_to_change(tmp_path):
    torch.save(random_model_state(get_flavor("tiny-dense")), tmp_path / "d.pt")
    with pytest.raises(MoeditError, match="--flavor NAME"):
        convert_checkpoint(tmp_path / "d.pt", "dit", tmp_path / "a")
    with pytest.raises(MoeditError, match="dit layout is dense"):
        convert_checkpoint(tmp_path / "d.pt", "dit", tmp_path / "b", flavor="tiny-diffmoe")
    with pytest.raises(MoeditError, match="no 'ema' entry"):
        torch.save({"model": random_model_state(get_flavor("tiny-dense"))}, tmp_path / "m.pt")
        convert_checkpoint(tmp_path / "m.pt", "dit", tmp_path / "c", flavor="tiny-dense", weights="ema")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(MoeditError, match="not an empty directory"):
        convert_checkpoint(tmp_path / "d.pt", "dit", tmp_path / "full", flavor="tiny-dense")
    with pytest.raises(MoeditError, match="shape mismatch: final_layer.linear.weight"):
        convert_checkpoint(tmp_path / "d.pt", "dit", tmp_path / "e", flavor="tiny-dense",
                           overrides=["model.learn_sigma=false"])


def test_converted_checkpoint_samples_and_trains_on(tmp_path, moedit_cli, digits_dir, capsys):
    """`moedit sample` reads the converted directory; `train.resume=DIR` starts training from its weights."""
    fields = ["model.input_size=8", "model.in_channels=1", "model.patch_size=1", f"data.path={digits_dir}",
              "data.num_workers=0", "model.learn_sigma=false", "diffusion.objective=flow"]
    cfg = build_config("tiny-dense", None, fields, "flow")
    torch.save(random_model_state(cfg.model), tmp_path / "d.pt")
    assert moedit_cli(["convert", "--from", "dit", str(tmp_path / "d.pt"), "--flavor", "tiny-dense",
                       "--out", str(tmp_path / "c"), "--set", *fields]) == 0
    png = tmp_path / "s.png"
    assert moedit_cli(["sample", str(tmp_path / "c"), "--num-samples", "2", "--steps", "2", "--classes", "3",
                       "--out", str(png), "--device", "cpu"]) == 0
    assert png.stat().st_size > 0
    config = tmp_path / "train.yaml"
    config.write_text((tmp_path / "c" / "config.yaml").read_text())
    capsys.readouterr()
    code = moedit_cli(["train", str(config), f"train.resume={tmp_path / 'c'}", f"train.run_dir={tmp_path / 'run'}",
                       "train.steps=1", "train.global_batch_size=4", "logging.tensorboard=false",
                       "optim.lr=1e-12", "train.ema_decay=0.5", "train.num_sample_images=0"])
    out = capsys.readouterr().out
    assert code == 0 and "initialised from imported weights" in out
    # One step at a negligible learning rate: the trained weights are still the converted ones.
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "c" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000001" / "model.safetensors"))
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


# ----- the architecture a source saved, and its authors' sampling defaults ----------------------

def diffmoe_yaml(**params) -> str:
    """The model part of an official DiffMoE training YAML (train.py copies it into the experiment
    directory as config_<time>.yaml; the checkpoint's args only name the file)."""
    moe = params.pop("MoE_config")
    lines = ["basic:", "  rf: True", "model:", "  target: models.models_DiffMoE.DiT", "  params:"]
    lines += [f"    {k}: {v}" for k, v in params.items()] + ["    MoE_config:"]
    lines += [f"      {k}: {v}" for k, v in moe.items()]
    return "\n".join(lines) + "\n"


S_E16 = dict(input_size=32, num_classes=1000, patch_size=2, depth=12, hidden_size=384, num_heads=16, mlp_ratio=4,
             use_swiglu="false", MoE_config=dict(n_shared_experts=0, num_experts=16, capacity=1, interleave="true"))
TINY = dict(input_size=16, num_classes=10, patch_size=2, depth=2, hidden_size=32, num_heads=2, mlp_ratio=4,
            use_swiglu="false", MoE_config=dict(n_shared_experts=0, num_experts=4, capacity=1, interleave="true"))


def official_experiment(tmp_path, state, params) -> Path:
    """<exp>/config_<time>.yaml and <exp>/checkpoints/0700000.pt as the official DiffMoE train.py leaves them."""
    exp = tmp_path / "0000-000_DiffMoE_S_E16_Flow"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "config_2025-03-20T10-00-00.yaml").write_text(diffmoe_yaml(**params))
    ckpt = exp / "checkpoints" / "0700000.pt"
    torch.save({"model": state, "ema": state, "opt": {},
                "args": argparse.Namespace(config="./config/000_DiffMoE_S_E16_Flow.yaml")}, ckpt)
    return ckpt


def test_saved_config_with_16_heads_refuses_a_model_with_6(tmp_path, moedit_cli, capsys):
    """DiffMoE-S-E16: the official config has 16 heads; a 6-head model must not convert silently."""
    assert get_flavor("DiffMoE-S-E16").num_heads == 16
    ckpt = official_experiment(tmp_path, random_official("DiffMoE-S-E16"), dict(S_E16))
    code = moedit_cli(["convert", "--from", "diffmoe", str(ckpt), "--flavor", "DiffMoE-S-E16",
                       "--set", "model.num_heads=6", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    assert err.startswith(f"moedit convert: error: {ckpt}: its training config (saved args config -> ")
    assert "says model.num_heads = 16, but the model from --flavor DiffMoE-S-E16 (after any --config/--set) has 6." in err
    assert err.endswith("Pass --set model.num_heads=16")


def test_dit_train_args_name_the_matching_flavor(tmp_path):
    """DiT's train.py saves args.model = "DiT-S/2" (6 heads); Dense-DiT-S has DiT-S/2's tensors but 16 heads."""
    torch.save({"model": random_official("DiT-S/2"), "ema": random_official("DiT-S/2"), "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", image_size=256, num_classes=1000)}, tmp_path / "s.pt")
    with pytest.raises(MoeditError) as info:
        convert_checkpoint(tmp_path / "s.pt", "dit", tmp_path / "o", flavor="Dense-DiT-S")
    message = str(info.value)
    assert "(saved args model='DiT-S/2') says model.num_heads = 6, but the model from --flavor Dense-DiT-S" in message
    assert message.endswith("Pass --set model.num_heads=6, or --flavor DiT-S/2 (it matches the saved config)")
    with pytest.raises(MoeditError, match=r"says model.input_size = 64, .* has 32\."):
        torch.save({"model": {}, "ema": {}, "args": argparse.Namespace(model="DiT-S/2", image_size=512)},
                   tmp_path / "512.pt")
        convert_checkpoint(tmp_path / "512.pt", "dit", tmp_path / "p", flavor="DiT-S/2")


def test_convert_prints_the_architecture_and_checks_it_against_the_saved_config(tmp_path, moedit_cli, capsys):
    source_cfg = _tiny("tiny-diffmoe", learn_sigma=True)
    state = to_official(random_model_state(source_cfg, 5), source_cfg, "diffmoe")
    ckpt = official_experiment(tmp_path, state, dict(TINY, num_heads=4))
    out = tmp_path / "c"
    assert moedit_cli(["convert", "--from", "diffmoe", str(ckpt), "--flavor", "tiny-diffmoe", "--out", str(out)]) == 2
    assert "says model.num_heads = 4, but the model from --flavor tiny-diffmoe (after any --config/--set) has 2." in capsys.readouterr().err
    assert moedit_cli(["convert", "--from", "diffmoe", str(ckpt), "--flavor", "tiny-diffmoe", "--out", str(out),
                       "--set", "model.num_heads=4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("architecture assumed: tiny-diffmoe: 2 blocks x 32 wide, 4 heads (head dim 8), "
                                 "patch 2 on 16x16x4 latents (64 tokens)")
    assert "MoE in blocks 1 (1): 4 experts of hidden 128, expert choice over the batch pool" in printed[0]
    assert printed[1] == f"  heads and shape: agrees with saved args config -> {ckpt.parent.parent / 'config_2025-03-20T10-00-00.yaml'}"
    model, cfg = load_for_inference(out)
    assert cfg.model.num_heads == 4 and model.blocks[0].attn.num_heads == 4


def test_saved_config_contradictions_are_listed_and_unusable_configs_are_not_checked(tmp_path):
    source_cfg = _tiny("tiny-diffmoe", learn_sigma=True)
    state = to_official(random_model_state(source_cfg, 7), source_cfg, "diffmoe")
    moe = dict(TINY["MoE_config"], num_experts=8, interleave="false")
    ckpt = official_experiment(tmp_path / "a", state, dict(TINY, num_heads=4, MoE_config=moe))
    with pytest.raises(MoeditError) as info:
        convert_checkpoint(ckpt, "diffmoe", tmp_path / "o", flavor="tiny-diffmoe")
    assert ("says model.num_heads = 4, moe.num_experts = 8, moe.every = 1, moe.first = 0, but the model from "
            "--flavor tiny-diffmoe (after any --config/--set) has model.num_heads = 2, moe.num_experts = 4, moe.every = 2, "
            "moe.first = 1.") in str(info.value)
    assert str(info.value).endswith("Pass --set model.num_heads=4 moe.num_experts=8 moe.every=1 moe.first=0")
    broken = official_experiment(tmp_path / "b", state, TINY)
    (broken.parent.parent / "config_2025-03-20T10-00-00.yaml").write_text("model: [unclosed\n")
    convert_checkpoint(broken, "diffmoe", tmp_path / "p", flavor="tiny-diffmoe")  # nothing usable: not checked
    check = json.loads((tmp_path / "p" / "meta.json").read_text())["source"]["architecture_check"]
    assert check.startswith("from the flavor (saved args name config './config/000_DiffMoE_S_E16_Flow.yaml': "
                            "unusable ") and check.endswith("config_2025-03-20T10-00-00.yaml (ParserError): not checked)")


@pytest.mark.parametrize("layout,flavor,objective,expected", [
    ("dit", "tiny-dense", "ddpm", {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "guidance_channels": 3,
                                   "cfg_batching": "joint"}),
    ("diffmoe", "tiny-diffmoe", "flow", {"sampler": "euler", "steps": 250, "cfg_scale": 1.5,
                                         "guidance_channels": None, "cfg_batching": "separate"}),
    ("diffmoe", "tiny-diffmoe", "ddpm", {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "guidance_channels": 3,
                                         "cfg_batching": "joint"}),
])
def test_converted_checkpoints_carry_the_authors_sampling_defaults(tmp_path, moedit_cli, capsys, layout, flavor,
                                                                   objective, expected):
    """`moedit sample --print-config` on a converted checkpoint shows how the source's authors sampled."""
    source_cfg = _tiny(flavor, learn_sigma=True)
    torch.save(to_official(random_model_state(source_cfg, 6), source_cfg, layout), tmp_path / "w.pt")
    extra = [] if layout == "dit" else ["--set", f"diffusion.objective={objective}"]
    assert moedit_cli(["convert", "--from", layout, str(tmp_path / "w.pt"), "--flavor", flavor,
                       "--out", str(tmp_path / "c"), *extra]) == 0
    assert "heads and shape: from the flavor (the checkpoint holds no training arguments: not checked)" in \
        capsys.readouterr().out
    assert moedit_cli(["sample", str(tmp_path / "c"), "--print-config", "--batch-size", "5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sampling"] == {"objective": objective, "guidance_interval": None, "batch_size": 5, **expected}
    assert shown["source"]["from"] == layout and shown["source"]["sampling_defaults_from"].split()[0] in (
        "facebookresearch/DiT", "KwaiVGI/DiffMoE")
    # an explicit --set wins over the authors' default
    assert moedit_cli(["convert", "--from", layout, str(tmp_path / "w.pt"), "--flavor", flavor, "--out",
                       str(tmp_path / "d"), "--set", "diffusion.cfg_batching=joint", "diffusion.cfg_scale=4",
                       *extra[1:]]) == 0
    _, cfg = load_for_inference(tmp_path / "d")
    assert (cfg.diffusion.cfg_batching, cfg.diffusion.cfg_scale) == ("joint", 4.0)
