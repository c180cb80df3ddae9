"""Parameter and FLOP accounting against published numbers and the official implementations' shapes."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from moedit.models import FLAVORS, build_model, get_flavor
from moedit.models.convert import convert_official_state_dict
from moedit.models.flops import activated_params, count_params, forward_gflops, train_gflops

OFFICIAL = json.loads(gzip.open(Path(__file__).parent / "data" / "models_official_state_dict_shapes.json.gz",
                                "rt").read())
NON_PARAMETERS = ("expert_threshold", "ema_decay")  # buffers in the official DiffMoE state dict


def official_param_count(name: str) -> int:
    return sum(math.prod(shape) for key, shape in OFFICIAL[name] if not key.endswith(NON_PARAMETERS))


def meta_state_shapes(flavor: str) -> dict[str, tuple]:
    model = build_model(get_flavor(flavor), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_published_dit_xl2_count_includes_pos_embed():
    pos_embed = 256 * 1152
    assert official_param_count("DiT-XL/2") == 675_129_632
    assert count_params(get_flavor("DiT-XL/2")) == 675_129_632
    assert count_params(get_flavor("DiT-XL/2")) - pos_embed != 675_129_632


@pytest.mark.parametrize("flavor", ["DiT-XL/2", "DiT-S/2", "DiffMoE-S-E16", "DiT-MoE-S/2-8E2A"])
def test_counts_equal_official_implementations(flavor):
    assert count_params(get_flavor(flavor)) == official_param_count(flavor)


@pytest.mark.parametrize("flavor", ["DiT-XL/2", "DiT-S/2", "DiffMoE-S-E16", "DiT-MoE-S/2-8E2A"])
def test_state_dict_maps_onto_official_names_and_shapes(flavor):
    """DiT: identical names; MoE: identical after the documented rename + expert stacking."""
    official = {key: torch.empty(shape, device="meta") for key, shape in OFFICIAL[flavor]}
    converted = {k: tuple(v.shape) for k, v in convert_official_state_dict(official).items()}
    assert converted == meta_state_shapes(flavor)
    if flavor.startswith("DiT-") and "MoE" not in flavor:
        assert set(converted) == set(official)


def test_analytic_counts_equal_instantiated_for_every_flavor():
    for name in FLAVORS:
        model = build_model(get_flavor(name), device="meta")  # nothing allocated (DiT-MoE-G is 16.5B)
        assert count_params(get_flavor(name)) == sum(p.numel() for p in model.parameters()), name


@pytest.mark.parametrize("flavor, gflops", [
    ("DiT-XL/2", 118.6), ("DiT-XL/4", 29.05), ("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.70),
])
def test_published_gflops(flavor, gflops):
    assert forward_gflops(get_flavor(flavor), "dit") == pytest.approx(gflops, rel=1e-3)


def test_ditmoe_convention_drops_exactly_the_attention_matmuls():
    cfg = get_flavor("DiT-XL/2")
    T, D = cfg.num_tokens, cfg.hidden_size
    diff = forward_gflops(cfg, "dit") - forward_gflops(cfg, "ditmoe")
    assert diff == pytest.approx(cfg.depth * 2 * T * T * D / 1e9, rel=1e-12)
    assert train_gflops(cfg) == pytest.approx(3 * forward_gflops(cfg))


def test_moe_activation_accounting():
    dense = get_flavor("Dense-DiT-L")
    for name in ("DiffMoE-L-E16", "EC-DiT-L-E16", "TC-DiT-L-E16"):
        cfg = get_flavor(name)
        E, D, n_moe = cfg.moe.num_experts, cfg.hidden_size, len(cfg.moe_blocks())
        router = E * D + ((D * D + D + D * E + E) if cfg.moe.router == "diffmoe" else 0)
        # at capacity 1 / top-1, the activated model is the dense model plus the routers
        assert activated_params(cfg) == count_params(dense) + n_moe * router
        assert forward_gflops(cfg) == pytest.approx(forward_gflops(dense) + n_moe * cfg.num_tokens * router_macs(cfg) / 1e9)
    cfg = get_flavor("DiffMoE-L-E16")
    one_expert_per_layer = len(cfg.moe_blocks()) * (2 * 1024 * 4096 + 4096 + 1024)
    assert activated_params(cfg, capacity=2.0) - activated_params(cfg) == one_expert_per_layer
    ditmoe = get_flavor("DiT-MoE-S/2-8E2A")  # top-2 of 8 SwiGLU experts of hidden 4D
    inactive = 12 * 6 * 3 * 384 * 1536
    assert activated_params(ditmoe) == count_params(ditmoe) - inactive


def router_macs(cfg) -> int:
    E, D = cfg.moe.num_experts, cfg.hidden_size
    return E * D + ((D * D + D * E) if cfg.moe.router == "diffmoe" else 0)


def test_ditmoe_g_size():
    cfg = get_flavor("DiT-MoE-G/2-16E2A")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.moe.num_experts) == (40, 1408, 16, 16)
    assert 16.4e9 < count_params(cfg) < 16.6e9
