"""Parameter and FLOP accounting against published numbers and the official implementations' shapes."""

from __future__ import annotations

import dataclasses
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
    text = [name for name in FLAVORS if FLAVORS[name].condition == "text"]
    assert len(text) == 20 and "DiffMoE-L-E16-T" in text and "tiny-diffmoe-t" in text  # cross-attention counted too
    for name in FLAVORS:
        model = build_model(get_flavor(name), device="meta")  # nothing allocated (DiT-MoE-G is 16.5B)
        assert count_params(get_flavor(name)) == sum(p.numel() for p in model.parameters()), name


@pytest.mark.parametrize("overrides", [{}, {"text_pooled": True}, {"qk_norm": True, "text_len": 77}])
def test_text_flavor_counts_equal_instantiated_with_options(overrides):
    for name in ("DiffMoE-S-E16-T", "Dense-DiT-S-T", "tiny-ec-t"):
        cfg = dataclasses.replace(get_flavor(name), **overrides)
        model = build_model(cfg, device="meta")
        assert count_params(cfg) == sum(p.numel() for p in model.parameters()), (name, overrides)


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


def shape_table() -> dict[str, dict[str, str]]:
    """docs/models.md's "DiffMoE family shapes" table: flavor -> {column: cell}."""
    lines = (Path(__file__).parent.parent / "docs" / "models.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| flavor | depth | hidden | heads |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


FAMILY = [name for name in FLAVORS if name.startswith(("DiffMoE-", "TC-DiT-", "EC-DiT-", "Dense-DiT-"))
          and FLAVORS[name].condition == "class"]  # the text variants (-T) share these shapes


def test_shape_table_covers_the_whole_diffmoe_family():
    assert sorted(shape_table()) == sorted(FAMILY) and len(FAMILY) == 16


@pytest.mark.parametrize("name", FAMILY)
def test_flavor_heads_and_shape_match_the_documented_table(name):
    row, cfg = shape_table()[name], get_flavor(name)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (int(row["depth"]), int(row["hidden"]), int(row["heads"]))
    assert (cfg.patch_size, cfg.input_size, cfg.ffn_type, cfg.mlp_ratio) == (2, 32, "gelu", 4.0)
    assert row["source"]
    if row["router"] == "dense":
        assert cfg.moe is None and row["experts"] == row["MoE blocks"] == "-" and row["capacity predictor"] == "no"
        return
    first, second, _, last = row["MoE blocks"].split(",")  # "1,3,...,11"
    blocks = cfg.moe_blocks()
    assert (blocks[0], blocks[1] - blocks[0], blocks[-1]) == (int(first), int(second) - int(first), int(last))
    assert (cfg.moe.router, cfg.moe.num_experts) == (row["router"], int(row["experts"]))
    assert (row["capacity predictor"] == "yes") == (cfg.moe.router == "diffmoe")
    assert cfg.moe.granularity == 1 and cfg.moe.num_shared_experts == 0


def test_diffmoe_s_e16_has_the_official_16_heads_and_heads_change_no_count():
    """config/000_DiffMoE_S_E16_Flow.yaml: num_heads 16 (DiT-S has 6); heads change neither parameters nor FLOPs."""
    s_e16, dit_s = get_flavor("DiffMoE-S-E16"), get_flavor("DiT-S/2")
    assert (s_e16.num_heads, dit_s.num_heads, get_flavor("Dense-DiT-S").num_heads) == (16, 6, 16)
    six = dataclasses.replace(s_e16, num_heads=6)
    assert count_params(s_e16) == count_params(six) == official_param_count("DiffMoE-S-E16") == 140_265_344
    assert forward_gflops(s_e16) == forward_gflops(six)
    assert count_params(get_flavor("Dense-DiT-S")) == count_params(dit_s)
