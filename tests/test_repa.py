"""REPA (issue 26): the projector and its loss against a naive float64 reference, lambda = 0 trains
bitwise as without REPA, the features get no gradient, the term falls on the digits, exact resume,
inference loads without the projector, every router, ddp and deepspeed, named errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from moedit.diffusion.losses import combine_losses
from moedit.errors import MoeditError
from moedit.models import build_model, get_flavor
from moedit.models.repa import REPA_TERM, strip_training_only
from conftest import run_one_then_two_ranks, write_config  # tests/conftest.py

ROUTERS = ["tiny-dense", "tiny-diffmoe", "tiny-tc", "tiny-ec"]
PROJECTOR = "repa_projector."


def repa_config(flavor="tiny-dense", depth=2, dim=12, hidden=16, coef=0.5, **kw):
    base = dataclasses.replace(get_flavor(flavor), input_size=4, patch_size=1, in_channels=2, learn_sigma=False, **kw)
    return dataclasses.replace(base, repa_depth=depth, repa_dim=dim, repa_hidden=hidden, repa_coef=coef)


def perturb(model, seed=0, scale=0.05):
    """Leave the zero init (adaLN gates, output layer) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def inputs(cfg, batch=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    target = torch.randn(batch, cfg.num_tokens, cfg.repa_dim, generator=g, dtype=dtype)
    return x, t, y, target


# --- the projector and the loss ---------------------------------------------------------------------
def naive_repa(projector, h, target):
    """Per token: the MLP written out (SiLU = x sigmoid(x)) and the cosine as dot / (|a| |b|)."""
    def silu(v):
        return v / (1 + torch.exp(-v))

    total, count = 0.0, 0
    for b in range(h.shape[0]):
        for n in range(h.shape[1]):
            z = silu(projector.fc1.weight @ h[b, n] + projector.fc1.bias)
            z = silu(projector.fc2.weight @ z + projector.fc2.bias)
            z = projector.fc3.weight @ z + projector.fc3.bias
            y = target[b, n]
            total = total + (z * y).sum() / (z.square().sum().sqrt() * y.square().sum().sqrt())
            count += 1
    return -total / count


def test_projector_and_loss_match_a_naive_float64_reference_values_and_gradients():
    cfg = repa_config(depth=1)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    x, t, y, target = inputs(cfg, dtype=torch.float64)
    x.requires_grad_(True)
    hidden = []
    model.blocks[cfg.repa_depth - 1].register_forward_hook(lambda mod, args, out: hidden.append(out))
    model(x, t, y, repa_target=target)
    got = model.aux_losses()[REPA_TERM]
    want = naive_repa(model.repa_projector, hidden[0], target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # through the projector and back into the blocks up to the aligned one (and into the input)
    wrt = [x, *model.repa_projector.parameters(), *model.blocks[0].parameters()]
    grads = torch.autograd.grad(got, wrt, retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(want, wrt, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads[0].abs().sum() > 0 and all(g is not None for g in grads[1:7])


def test_the_projector_changes_nothing_else_init_rng_output():
    """A model with the projector starts from the same weights, leaves the global RNG where the model
    without it leaves it, and its output does not depend on the target."""
    cfg = repa_config()
    torch.manual_seed(3)
    plain = build_model(dataclasses.replace(cfg, repa_depth=0, repa_dim=0, repa_hidden=0, repa_coef=0.0))
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    model = build_model(cfg)
    after_repa = torch.rand(4)
    assert torch.equal(after_plain, after_repa)
    state = model.state_dict()
    assert sorted(k for k in state if k.startswith(PROJECTOR)) == [
        f"{PROJECTOR}fc{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
    assert state[f"{PROJECTOR}fc3.weight"].shape == (cfg.repa_dim, cfg.repa_hidden)
    stripped, inference_cfg = strip_training_only(state, cfg)
    assert stripped.keys() == plain.state_dict().keys() and not inference_cfg.has_repa
    assert all(torch.equal(stripped[k], v) for k, v in plain.state_dict().items())
    perturb(model)
    x, t, y, target = inputs(cfg)
    with torch.no_grad():
        out = model(x, t, y, repa_target=target)
        assert REPA_TERM in model.aux_losses()
        assert torch.equal(out, model(x, t, y)) and REPA_TERM not in model.aux_losses()


def test_the_features_get_no_gradient():
    """The target is data: a (stand-in) encoder in front of it receives no gradient."""
    cfg = repa_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    perturb(model)
    x, t, y, pixels = inputs(cfg)
    encoder = torch.nn.Linear(cfg.repa_dim, cfg.repa_dim)
    target = encoder(pixels)  # requires grad: an encoder run on the fly
    assert target.requires_grad
    model(x, t, y, repa_target=target)
    combine_losses({"mse": torch.zeros(())}, model)["loss"].backward()
    assert encoder.weight.grad is None and encoder.bias.grad is None
    assert model.repa_projector.fc1.weight.grad is not None


@pytest.mark.parametrize("flavor", ROUTERS)
def test_every_router_weights_the_term_where_auxiliary_terms_are_weighted(flavor):
    cfg = repa_config(flavor, coef=0.25)
    torch.manual_seed(0)
    model = build_model(cfg)
    perturb(model)
    x, t, y, target = inputs(cfg, batch=4)
    model(x, t, y, repa_target=target)
    coefs = model.aux_loss_coefs()
    assert coefs[REPA_TERM] == 0.25
    terms = combine_losses({"mse": torch.ones(())}, model)
    expected = 1.0 + sum(coefs[k] * v for k, v in model.aux_losses().items())
    torch.testing.assert_close(terms["loss"], expected)
    assert -1 <= float(terms[REPA_TERM].detach()) <= 1
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.repa_projector.parameters())
    # lambda = 0: the term is computed (logged) but trains nothing
    zero = build_model(dataclasses.replace(cfg, repa_coef=0.0))
    zero(x, t, y, repa_target=target)
    assert not zero.aux_losses()[REPA_TERM].requires_grad
    assert not any(p.requires_grad for p in zero.repa_projector.parameters())


# --- through the Trainer ----------------------------------------------------------------------------
def make_trainer(tmp_path, data, name, repa=None, flavor="tiny-diffmoe", sections=None, **train):
    from moedit.train.config import load_config
    from moedit.train.trainer import Trainer

    cfg = {
        "model": {"flavor": flavor, "input_size": 8, "in_channels": 1, "patch_size": 1, "learn_sigma": False},
        "data": {"path": str(data), "num_workers": 0},
        "train": {"run_dir": str(tmp_path / name), "steps": 4, "global_batch_size": 8, "micro_batch_size": 4,
                  "num_sample_images": 0, "repa": {"projector_hidden": 32, **(repa or {})}, **train},
        "checkpoint": {"every": 2},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
    }
    return Trainer(load_config(write_config(tmp_path / f"{name}.yaml", cfg, sections))).setup()


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run, step, name):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / name)


def test_lambda_zero_trains_bitwise_like_no_repa(tmp_path, repa_digits):
    off = make_trainer(tmp_path, repa_digits, "off")
    assert off.fit() == 0
    zero = make_trainer(tmp_path, repa_digits, "zero", repa={"enabled": True, "coef": 0.0})
    assert (zero.cfg.model.repa_depth, zero.cfg.model.repa_dim) == (1, 32)  # max(1, round(2 * 8 / 28)); the data's C
    batches = zero._micro_batches()
    assert batches[0]["repa"].shape == (4, 64, 32) and not batches[0]["repa"].requires_grad
    zero.close()
    zero = make_trainer(tmp_path, repa_digits, "zero2", repa={"enabled": True, "coef": 0.0})
    assert zero.fit() == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(tmp_path / "off", 4, name), weights(tmp_path / "zero2", 4, name)
        assert {k for k in b if not k.startswith(PROJECTOR)} == a.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows_off, rows_zero = metrics(tmp_path / "off"), metrics(tmp_path / "zero2")
    for r_off, r_zero in zip(rows_off, rows_zero, strict=True):
        for key in ("loss", "loss/mse", "loss/predictor", "grad_norm"):
            assert r_off[key] == r_zero[key], key
        assert "loss/repa" not in r_off and math.isfinite(r_zero["loss/repa"])


def test_the_alignment_term_falls_during_a_short_digits_run(tmp_path, repa_digits):
    trainer = make_trainer(tmp_path, repa_digits, "falls", repa={"enabled": True, "coef": 0.5},
                           flavor="tiny-dense", steps=60, global_batch_size=16, micro_batch_size=0,
                           sections={"optim": {"lr": 2e-3}, "logging": {"log_every": 10}, "checkpoint": {"every": 60}})
    assert trainer.fit() == 0
    rows = metrics(tmp_path / "falls")
    repa = [r["loss/repa"] for r in rows]
    assert len(repa) == 6 and repa[-1] < repa[0] - 0.1, repa
    for r in rows:  # `loss` is the weighted sum of the logged terms
        assert abs(r["loss"] - (r["loss/mse"] + 0.5 * r["loss/repa"])) < 1e-5


def test_exact_resume_with_repa_and_inference_loads_without_the_projector(tmp_path, repa_digits):
    from moedit.cli import main as cli_main
    from moedit.train.checkpoint import export_safetensors, load_for_inference

    repa = {"enabled": True, "depth": 1}
    assert make_trainer(tmp_path, repa_digits, "full", repa=repa).fit() == 0
    assert make_trainer(tmp_path, repa_digits, "split", repa=repa, steps=2).fit() == 0
    second = make_trainer(tmp_path, repa_digits, "split", repa=repa)
    assert second.step == 2
    assert second.fit() == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(tmp_path / "full", 4, name), weights(tmp_path / "split", 4, name)
        assert a.keys() == b.keys() and any(k.startswith(PROJECTOR) for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss/repa"] for r in metrics(tmp_path / "full")][2:] == [r["loss/repa"] for r in metrics(tmp_path / "split")][2:]

    run = tmp_path / "full"
    model, cfg = load_for_inference(run)
    assert model.repa_projector is None and not cfg.model.has_repa
    assert not any(k.startswith(PROJECTOR) for k in model.state_dict())
    exported = export_safetensors(run / "checkpoints" / "step_0000004", tmp_path / "export" / "m.safetensors")
    assert not any(k.startswith(PROJECTOR) for k in load_file(exported))
    assert json.loads(exported.with_suffix(".json").read_text())["model"]["repa_depth"] == 0
    assert cli_main(["sample", str(exported), "--num-samples", "2", "--steps", "2", "--out",
                     str(tmp_path / "grid.png")]) == 0


def test_named_errors(tmp_path, repa_digits, digits_dir):
    from moedit.configtools import ConfigError

    with pytest.raises(MoeditError, match=r"dataset.json lists no per-sample field 'repa' \(stored fields: none\); "
                                          r"prepare encoder features with `moedit prepare \.\.\. --repa-encoder DIR`"):
        make_trainer(tmp_path, digits_dir, "missing", repa={"enabled": True})
    with pytest.raises(MoeditError, match=r"the shards' 'repa' features are 32 wide, but model.repa_dim = 16"):
        make_trainer(tmp_path, repa_digits, "width", repa={"enabled": True}, sections={"model": {"repa_dim": 16}})
    with pytest.raises(ConfigError, match=r"train.repa.depth = 3: must be in 1..model.depth = 2"):
        make_trainer(tmp_path, repa_digits, "deep", repa={"enabled": True, "depth": 3})
    with pytest.raises(ConfigError, match=r"train.repa.depth = 0: must be >= 1"):
        make_trainer(tmp_path, repa_digits, "shallow", repa={"enabled": True, "depth": 0})
    with pytest.raises(MoeditError, match=r"per-sample shape \[64, 32\]; REPA needs \(T, C\) with T = 16"):
        make_trainer(tmp_path, repa_digits, "grid", repa={"enabled": True}, sections={"model": {"patch_size": 2}})


# --- two ranks --------------------------------------------------------------------------------------
def _train_worker(tmp: str, data: str, name: str, *overrides: str) -> None:
    """Entry point of one training process (the engine test starts two); `overrides`: section.key=value."""
    from pathlib import Path

    from conftest import sections_from_overrides

    # data.split=sample: the ranks' batches together are the one process's batch
    sections = sections_from_overrides(overrides, {"data": {"split": "sample"}})
    micro = sections.pop("train", {}).get("micro_batch_size", 0)
    assert make_trainer(Path(tmp), Path(data), name, repa={"enabled": True, "depth": 1}, sections=sections,
                        micro_batch_size=micro).fit() == 0


@pytest.mark.parametrize("engine", [["parallel.engine=ddp"], ["parallel.engine=deepspeed", "deepspeed.zero_stage=2"]])
def test_two_processes_match_one_process_accumulating(engine, tmp_path, repa_digits):
    """The repa batch key and term travel through DDP and DeepSpeed: 2 ranks x 4 samples = 1 rank x 2 x 4."""
    run_one_then_two_ranks("test_repa", [str(tmp_path), str(repa_digits)], ["single", "train.micro_batch_size=4"],
                           ["two", *engine])
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert (meta["engine"], meta["world_size"]) == (engine[0].split("=")[1], 2)
    one, two = weights(tmp_path / "single", 4, "model.safetensors"), weights(tmp_path / "two", 4, "model.safetensors")
    assert any(k.startswith(PROJECTOR) for k in two)
    for name, tensor in one.items():
        if "threshold" not in name:  # accumulation: two EMA threshold updates per step (docs/training.md)
            assert (two[name] - tensor).abs().max() <= 1e-4 * (1 + tensor.abs().max()), name
    rows_one, rows_two = metrics(tmp_path / "single"), metrics(tmp_path / "two")
    for a, b in zip(rows_one, rows_two, strict=True):
        assert abs(a["loss/repa"] - b["loss/repa"]) <= 1e-5 and abs(a["loss"] - b["loss"]) <= 1e-5


def test_features_computed_from_pixels_during_training_match_the_shards(tmp_path, digits_dir, repa_digits):
    """train.repa.encoder = random:32 on plain digits computes each batch's targets from its clean
    pixels (no shard field, no gradient): the same features digits_repa stores (float16 there),
    so the runs log the same `loss/repa` to float16 precision; latent (non-pixel) data is refused."""
    on_the_fly = make_trainer(tmp_path, digits_dir, "fly", repa={"enabled": True, "encoder": "random:32"})
    assert "repa" not in on_the_fly.cfg.data.fields and on_the_fly.cfg.model.repa_dim == 32
    batch = on_the_fly._micro_batches()[0]
    assert batch["repa"].shape == (4, 64, 32) and not batch["repa"].requires_grad
    on_the_fly.close()
    assert make_trainer(tmp_path, digits_dir, "fly2", repa={"enabled": True, "encoder": "random:32"}).fit() == 0
    assert make_trainer(tmp_path, repa_digits, "shards", repa={"enabled": True}).fit() == 0
    fly, shards = metrics(tmp_path / "fly2"), metrics(tmp_path / "shards")
    for a, b in zip(fly, shards, strict=True):
        assert a["loss/repa"] == pytest.approx(b["loss/repa"], rel=2e-3, abs=1e-3)
        assert a["loss/mse"] == pytest.approx(b["loss/mse"], rel=1e-6)  # same images, noise and t

    from moedit.data.prepare import prepare_builtin

    latents = tmp_path / "synthetic"
    prepare_builtin("synthetic", latents, num_samples=64, latent_shape=(1, 8, 8), progress=False)
    with pytest.raises(MoeditError, match=r"features are computed from pixels during training, but .* holds latents "
                                          r"\(encoder type none\), not pixels"):
        make_trainer(tmp_path, latents, "latents", repa={"enabled": True, "encoder": "random:32"})
