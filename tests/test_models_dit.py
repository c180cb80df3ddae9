"""The DiT backbone and the model-level MoE API: adaLN-Zero, shapes, stats, capture, config errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from moedit.models import FLAVORS, ModelConfig, MoEConfig, build_model, get_flavor, override
from moedit.models.stats import capture_routing, last_capacity, routing_stat_tensors, snapshot_routing_stats

TINY = [name for name in FLAVORS if name.startswith("tiny-") and FLAVORS[name].condition == "class"]  # text: test_models_text.py


def inputs(cfg: ModelConfig, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, cfg.num_classes, (batch,), generator=g)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Leave the zero init so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", TINY)
def test_output_is_exactly_zero_at_init(name):
    cfg = get_flavor(name)
    model = build_model(cfg)
    out = model(*inputs(cfg))
    assert out.shape == (8, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)
    assert torch.equal(out, torch.zeros_like(out))


def test_unpatchify_inverts_patchify_order():
    cfg = dataclasses.replace(get_flavor("tiny-dense"), learn_sigma=False)
    model = build_model(cfg)
    x = torch.randn(2, 4, 16, 16)
    p = cfg.patch_size
    # token t = row-major patch; within a token the layout is (p, q, c)
    tokens = x.reshape(2, 4, 8, p, 8, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), x)


def test_attention_matches_naive_softmax():
    cfg = dataclasses.replace(get_flavor("tiny-dense"), qk_norm=True)
    attn = build_model(cfg).blocks[0].attn.double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    qkv = attn.qkv(x).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), ref)


def test_position_embedding_is_fixed_sincos():
    model = build_model(get_flavor("tiny-dense"))
    pe = model.pos_embed[0]  # (T, D), T = 8 x 8
    assert not model.pos_embed.requires_grad
    row, col, D = 2, 5, 32
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                          torch.cos(row * omega)]).float()
    torch.testing.assert_close(pe[row * 8 + col], expected)
    assert pe.shape == (64, D)


def test_model_embeds_the_labels_it_is_given_in_training_mode():
    # Label dropout is the trainer's (drawn from the micro-batch generator, the same on every
    # engine: tests/megatron/test_engines_agree.py); the model itself must not drop labels.
    model = build_model(dataclasses.replace(get_flavor("tiny-dense"), class_dropout_prob=0.5)).train()
    x, t, y = torch.randn(8, 4, 16, 16), torch.rand(8), torch.arange(8) % 10
    torch.manual_seed(0)
    a = model(x, t, y)
    torch.manual_seed(1)
    assert torch.equal(model(x, t, y), a)


def test_bad_input_shape_raises():
    model = build_model(get_flavor("tiny-dense"))
    with pytest.raises(ValueError, match=r"expected \(B, 4, 16, 16\)"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("build, field, valid", [
    (lambda: MoEConfig(num_experts=0), "moe.num_experts", ">= 1"),
    (lambda: MoEConfig(capacity=0), "moe.capacity", "(0, num_experts=16]"),
    (lambda: MoEConfig(capacity=-1.0), "moe.capacity", "(0, num_experts=16]"),
    (lambda: MoEConfig(num_experts=4, top_k=5), "moe.top_k", "[1, num_experts=4]"),
    (lambda: MoEConfig(router="switch"), "moe.router", "diffmoe, token_choice, expert_choice"),
    (lambda: MoEConfig(threshold_decay=1.0), "moe.threshold_decay", "[0, 1)"),
    (lambda: ModelConfig(input_size=30, patch_size=4), "model.input_size", "multiple of patch_size=4"),
    (lambda: ModelConfig(patch_size=3), "model.patch_size", "1, 2, 4, 8"),
    (lambda: ModelConfig(hidden_size=384, num_heads=5), "model.num_heads", "divide hidden_size=384"),
    (lambda: ModelConfig(moe=MoEConfig(granularity=5)), "moe.granularity", "divide the dense FFN hidden size 4608"),
    (lambda: ModelConfig(depth=2, moe=MoEConfig(first=2)), "moe.first", "[0, depth=2)"),
])
def test_bad_config_names_field_and_range(build, field, valid):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(field + " = ") and valid in str(info.value)


def test_expert_choice_capacity_too_small_for_pool_raises():
    cfg = override(get_flavor("tiny-ec"), {"moe.capacity": 0.01})
    with pytest.raises(ValueError, match="moe.capacity = 0.01"):
        build_model(cfg)(*inputs(cfg))


def test_overrides_and_flavor_copies():
    cfg = override(get_flavor("DiT-XL/2"), ["input_size=64", "qk_norm=true", "moe.router=token_choice"])
    assert (cfg.input_size, cfg.qk_norm, cfg.moe.router, cfg.num_tokens) == (64, True, "token_choice", 1024)
    get_flavor("tiny-diffmoe").moe.num_experts = 99  # copies: the registry is untouched
    assert FLAVORS["tiny-diffmoe"].moe.num_experts == 4
    with pytest.raises(ValueError, match="unknown field"):
        override(cfg, ["hiden_size=3"])


def test_models_overrides_parse_as_training_overrides_do():
    """One parser: `moedit models --flavor F k=v` and `moedit train CFG model.k=v` read the same text alike."""
    from moedit.train.config import config_from_dict

    from moedit.configtools import apply_overrides

    texts = ["moe.z_loss_coef=1e-3", "moe.capacity=2", "qk_norm=yes", "class_dropout_prob=0", "learn_sigma=false"]
    models = override(get_flavor("tiny-diffmoe"), texts)
    data = apply_overrides({"model": {"flavor": "tiny-diffmoe"}},
                           [t if t.startswith("moe.") else "model." + t for t in texts])
    assert config_from_dict(data).model == models
    assert (models.moe.z_loss_coef, models.moe.capacity, models.qk_norm) == (1e-3, 2.0, True)
    with pytest.raises(ValueError, match=r"moe.capacity = 'lots': expected a number"):
        override(models, ["moe.capacity=lots"])


def test_fine_grained_and_shared_experts_shapes():
    cfg = override(get_flavor("tiny-diffmoe"), {"moe.granularity": 4, "moe.num_experts": 8,
                                                "moe.num_shared_experts": 2, "moe.shared_expert_ratio": 1.0})
    layer = build_model(cfg).blocks[1].mlp
    assert layer.experts.fc1_weight.shape == (8, 32, 32)  # expert hidden = 4 * 32 / 4
    assert layer.shared_experts.fc1.weight.shape == (64, 32)  # two fused shared experts


def test_routing_stats_are_sums_snapshot_and_reset():
    cfg = get_flavor("tiny-diffmoe")
    model = build_model(cfg)
    perturb(model)
    x, t, y = inputs(cfg)
    model(x, t, y)
    model(x, t, y)
    snap = snapshot_routing_stats(model)
    assert snap["noise_bin_edges"] == pytest.approx([i / 10 for i in range(11)])
    (layer,) = snap["layers"]
    S, E, K = 8 * 64, 4, 8 * 64 // 4
    assert (layer["block"], layer["router"], layer["num_experts"], layer["capacity"]) == (1, "diffmoe", 4, 1.0)
    assert layer["tokens"] == 2 * S and layer["forwards"] == 2
    assert layer["tokens_per_expert"] == [2 * K] * E
    # by-noise counts: each sample's tokens land in the bin of its noise level 1 - t (flow)
    bins = torch.bucketize(1 - t, torch.tensor([i / 10 for i in range(1, 10)]), right=True)
    by_noise = torch.tensor(layer["tokens_per_expert_by_noise"])
    assert by_noise.sum() == 2 * K * E
    assert set(torch.nonzero(by_noise.sum(1)).flatten().tolist()) <= set(bins.tolist())
    assert torch.tensor(layer["tokens_per_expert_by_class"]).sum(0).tolist() == [2 * K] * E
    confusion = [layer[f"predictor_{k}"] for k in ("tp", "fp", "fn", "tn")]
    assert sum(confusion) == 2 * S * E and confusion[0] + confusion[2] == 2 * K * E
    assert layer["capacity_used_sum"] == pytest.approx(2.0)
    assert layer["aux"]["predictor"] > 0 and layer["entropy_count"] == 2 * S
    assert all(int(t.abs().sum()) == 0 for t in routing_stat_tensors(model))  # reset
    json.dumps(snap)  # plain Python numbers


def test_time_convention_maps_ddpm_steps_to_noise_bins():
    cfg = get_flavor("tiny-ec")
    model = build_model(cfg)
    model.set_time_convention("ddpm", 1000)
    x, _, y = inputs(cfg, batch=2)
    model(x, torch.tensor([0.0, 999.0]), y)  # clean -> bin 0, pure noise -> bin 9
    by_noise = snapshot_routing_stats(model)["layers"][0]["tokens_per_expert_by_noise"]
    assert [sum(row) for row in by_noise] == [64] + [0] * 8 + [64]
    with pytest.raises(ValueError, match="time convention"):
        model.set_time_convention("edm")


def test_capture_and_last_capacity_in_eval():
    cfg = get_flavor("tiny-diffmoe")
    model = build_model(cfg).eval()
    perturb(model)
    x, t, y = inputs(cfg)
    with capture_routing(model) as records:
        model(x, t, y)
    (rec,) = records
    assert rec["selected"].shape == (8 * 64, 4) and rec["scores"].shape == (8 * 64, 4)
    assert torch.equal(rec["noise_level"], (1 - t).repeat_interleave(64))
    assert torch.equal(rec["labels"], y.repeat_interleave(64))
    # thresholds start at 0: dynamic inference sends every token to every expert
    assert bool(rec["selected"].all()) and last_capacity(model) == {1: 4.0}
    model(x, t, y)  # outside the context nothing is recorded
    assert len(records) == 1


def test_model_aux_losses_thresholds_and_coefs():
    cfg = override(get_flavor("tiny-ditmoe"), {"moe.z_loss_coef": 0.001})
    model = build_model(cfg)
    perturb(model)
    model(*inputs(cfg))
    layers = model.moe_layers()
    aux = model.aux_losses()
    assert set(aux) == {"balance", "z"} and model.aux_loss_coefs() == {"balance": 0.01, "z": 0.001}
    torch.testing.assert_close(aux["balance"], sum(l.last_aux["balance"] for l in layers))
    assert model.threshold_buffers() == []
    diffmoe = build_model(get_flavor("tiny-diffmoe"))
    (tau,) = diffmoe.threshold_buffers()
    assert tau is diffmoe.blocks[1].mlp.router.expert_threshold and tau.shape == (4,)


def test_diffmoe_predictor_gradient_stays_in_predictor():
    cfg = get_flavor("tiny-diffmoe")
    model = build_model(cfg)
    perturb(model)
    model(*inputs(cfg))
    model.aux_losses()["predictor"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert has_grad == ("capacity_predictor" in name), name


def test_gate_init_std():
    model = build_model(override(get_flavor("DiffMoE-S-E16"), {"depth": 2}))
    gate = model.blocks[1].mlp.router.gate.weight
    assert abs(float(gate.detach().std()) - 0.006) < 0.0005


@pytest.mark.parametrize("name", ["tiny-diffmoe", "tiny-tc", "tiny-ec", "tiny-ditmoe"])
def test_training_step_reduces_loss(name):
    """30 Adam steps on a fixed batch fit it (loss -21% or more, 10% asked): gradients reach every routed path."""
    torch.manual_seed(0)  # the init and target from the global generator: else they depend on the tests before
    cfg = get_flavor(name)
    model = build_model(cfg)
    perturb(model, seed=1)
    x, t, y = inputs(cfg)
    target = torch.randn(8, 8, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_stat_sums_stay_float64_when_model_is_cast():
    cfg = get_flavor("tiny-tc")
    model = build_model(cfg).to(torch.bfloat16)
    layer = model.moe_layers()[0]
    assert layer.stat_scalars.dtype == torch.float64 and layer.experts.fc1_weight.dtype == torch.bfloat16
    x, t, y = inputs(cfg)
    model(x.to(torch.bfloat16), t, y)
    snap = snapshot_routing_stats(model)["layers"][0]
    assert snap["tokens"] == 8 * 64 and snap["forwards"] == 1 and sum(snap["tokens_per_expert"]) == 8 * 64
