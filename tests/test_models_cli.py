"""`moedit models`: the table and JSON agree with the accounting functions; overrides apply."""

from __future__ import annotations

import json

import pytest

from moedit.cli import main
from moedit.models import FLAVORS, get_flavor, override
from moedit.models.flops import count_params, forward_gflops


def test_json_lists_every_flavor_with_its_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["flavor"] for r in rows] == list(FLAVORS)
    xl = rows[list(FLAVORS).index("DiT-XL/2")]
    assert xl["total_params"] == 675_129_632 and xl["fwd_gflops_dit"] == pytest.approx(118.6, rel=1e-3)


def test_flavor_with_overrides(capsys):
    assert main(["models", "--flavor", "DiffMoE-S-E16", "input_size=64", "moe.num_experts=8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = override(get_flavor("DiffMoE-S-E16"), {"input_size": 64, "moe.num_experts": 8})
    assert info["num_experts"] == 8 and info["input_size"] == 64
    assert info["total_params"] == count_params(cfg)
    assert info["fwd_gflops_ditmoe"] == pytest.approx(forward_gflops(cfg, "ditmoe"))
    assert info["fwd_gflops_dit"] > 4 * forward_gflops(get_flavor("DiffMoE-S-E16"))  # 4x tokens, attention T^2


def test_table_and_errors(capsys):
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(FLAVORS) and table[0].startswith("flavor")
    assert main(["models", "--flavor", "DiT-XL/2", "patch_size=3"]) == 2
    assert "model.patch_size = 3" in capsys.readouterr().err
    assert main(["models", "--flavor", "DiT-XXL/2"]) == 2
    assert "not in the registry" in capsys.readouterr().err
