"""Config loading: strict keys, types, overrides, round trip, and every file in configs/."""

from pathlib import Path

import pytest
import yaml

from moedit.configtools import ConfigError
from moedit.train.config import config_to_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": {"flavor": "tiny-diffmoe", "learn_sigma": False}, "train": {"steps": 3}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert config_to_dict(load_config(out)) == config_to_dict(cfg)


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*did you mean 'lr'"):
        load_config(write(tmp_path, {**BASE, "optim": {"lrr": 1e-3}}))
    with pytest.raises(ConfigError, match=r"unknown section 'optimm'.*'optim'"):
        load_config(write(tmp_path, {**BASE, "optimm": {}}))
    with pytest.raises(ConfigError, match=r"unknown key 'moe.num_expert'.*'num_experts'"):
        load_config(write(tmp_path, {**BASE, "moe": {"num_expert": 4}}))


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps = 'many': expected an integer"):
        load_config(write(tmp_path, {**BASE, "train": {"steps": "many"}}))
    with pytest.raises(ConfigError, match=r"optim.schedule = 'linear': must be one of"):
        load_config(write(tmp_path, {**BASE, "optim": {"schedule": "linear"}}))


def test_dotted_overrides_apply_last_with_yaml_scalars(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=2e-4", "train.steps=7", "moe.num_experts=8", "model.depth=4"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.steps == 7
    assert cfg.model.moe.num_experts == 8 and cfg.model.depth == 4
    cfg = load_config(write(tmp_path, BASE), ["model.flavor=tiny-dense"])
    assert cfg.model.moe is None


def test_section_validation_message_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lr = -1.0: must be > 0"):
        load_config(write(tmp_path, BASE), ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"top_k"):
        load_config(write(tmp_path, {"model": {"flavor": "tiny-tc", "learn_sigma": False}}), ["moe.top_k=99"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
