"""Megatron layouts are validated before allocation: each bad layout raises ValueError naming the key and
the numbers; good ones derive the data degree and micro-batch. Needs no megatron-core."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from moedit.configtools import ConfigError
from moedit.engines.megatron.layout import Layout, resolve_layout
from moedit.models import get_flavor
from moedit.engines.config import ParallelConfig
from moedit.train.config import config_from_dict

# DiffMoE-S-E16 with DiT-S's 6 heads (the flavor has the official 16): the cases below need a count TP=4 splits badly
DIFFMOE_S = dataclasses.replace(get_flavor("DiffMoE-S-E16"), num_heads=6)  # D 384, depth 12, FFN 1536, T 256, E 16
DENSE_S = get_flavor("DiT-S/2")


def megatron(**kwargs) -> ParallelConfig:
    return ParallelConfig(engine="megatron", **kwargs)


def test_layout_module_imports_no_megatron():
    import subprocess

    code = ("import sys; import moedit.engines.megatron.layout; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'megatron'], 'imported megatron'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("world, kwargs, data, expert_data", [
    (8, dict(tensor=2, pipeline=2, expert=2, sequence_parallel=True), 2, 2),
    (8, dict(tensor=2, pipeline=2, expert=4, sequence_parallel=True), 2, 1),  # EP spans the TP ranks
    (2, dict(expert=2), 2, 1),
    (2, dict(pipeline=2, num_microbatches=2), 1, 1),
    (4, dict(tensor=2, sequence_parallel=True), 2, 4),
    (1, dict(), 1, 1),
])
def test_good_layouts_derive_data_degree(world, kwargs, data, expert_data):
    layout = resolve_layout(megatron(**kwargs), DIFFMOE_S, world, global_batch=16)
    assert layout.data == data and layout.expert_data == expert_data
    assert layout.world_size == world
    assert layout.micro_batch == 16 // (data * layout.num_microbatches)
    assert layout.global_batch == 16


def test_micro_batch_given_and_virtual_pipeline():
    layout = resolve_layout(megatron(pipeline=2, virtual_pipeline=3, micro_batch=2, num_microbatches=4),
                            DIFFMOE_S, 4, global_batch=16)
    assert layout == Layout(tensor=1, pipeline=2, expert=1, expert_tensor=1, data=2, sequence_parallel=False,
                            virtual_pipeline=3, micro_batch=2, num_microbatches=4, world_size=4)


def test_sequence_parallel_is_ignored_without_tensor_parallelism():
    assert resolve_layout(megatron(sequence_parallel=True), DIFFMOE_S, 2, 8).sequence_parallel is False
    assert resolve_layout(megatron(tensor=2, sequence_parallel=True), DIFFMOE_S, 2, 8).sequence_parallel is True


def test_dense_model_with_tensor_parallel_needs_no_sequence_parallel():
    assert resolve_layout(megatron(tensor=3), DENSE_S, 3, 8).data == 1  # 6 heads, FFN 1536


BAD = [
    # (model, world, global batch, parallel kwargs, fragments the message must contain)
    (DIFFMOE_S, 4, 16, dict(tensor=4, sequence_parallel=True),
     ["parallel.tensor = 4", "model.num_heads = 6", "{1, 2}"]),
    (DIFFMOE_S, 4, 16, dict(expert=3), ["parallel.expert = 3", "3 x 1 x 1 = 3", "world size 4", "{1, 2, 4}"]),
    (DIFFMOE_S, 6, 12, dict(expert=6), ["parallel.expert = 6", "moe.num_experts = 16", "{1, 2}"]),
    (DIFFMOE_S, 5, 16, dict(pipeline=5), ["parallel.pipeline = 5", "model.depth = 12", "{1, 2, 3, 4, 6, 12}"]),
    (DIFFMOE_S, 4, 16, dict(pipeline=2, virtual_pipeline=4, num_microbatches=2),
     ["pipeline x virtual_pipeline = 2 x 4 = 8", "model.depth = 12"]),
    (DIFFMOE_S, 6, 12, dict(tensor=2, pipeline=2, sequence_parallel=True),
     ["world size 6", "parallel.tensor x parallel.pipeline = 2 x 2 = 4"]),
    (DIFFMOE_S, 4, 16, dict(pipeline=4, expert=2), ["parallel.expert = 2", "2 x 1 x 4 = 8", "world size 4"]),
    (DIFFMOE_S, 4, 16, dict(tensor=2, expert=2), ["parallel.sequence_parallel = false", "parallel.tensor = 2"]),
    (DIFFMOE_S, 2, 16, dict(tensor=2), ["parallel.sequence_parallel = false", "MoE"]),
    (DIFFMOE_S, 2, 16, dict(expert_tensor=2), ["parallel.expert_tensor = 2", "only 1"]),
    (DIFFMOE_S, 4, 18, dict(num_microbatches=2), ["train.global_batch_size = 18", "4 x 2 = 8"]),
    (DIFFMOE_S, 4, 16, dict(micro_batch=2, num_microbatches=1),
     ["train.global_batch_size = 16", "4 x 2 x 1 = 8", "parallel.num_microbatches=2"]),
    (DIFFMOE_S, 4, 18, dict(micro_batch=4), ["train.global_batch_size = 18", "4 x 4 x 1 = 16"]),
    (DIFFMOE_S, 2, 16, dict(virtual_pipeline=2), ["parallel.virtual_pipeline = 2", "parallel.pipeline > 1"]),
    (DIFFMOE_S, 2, 16, dict(pipeline=2, virtual_pipeline=2, num_microbatches=3),
     ["parallel.num_microbatches = 3", "parallel.pipeline = 2"]),
    (DENSE_S, 2, 16, dict(expert=2), ["parallel.expert = 2", "dense"]),
    (dataclasses.replace(DENSE_S, hidden_size=36, num_heads=2, mlp_ratio=0.75), 2, 16, dict(tensor=2),
     ["parallel.tensor = 2", "dense FFN hidden size 27"]),
    (dataclasses.replace(DIFFMOE_S, input_size=30), 4, 16, dict(tensor=2, sequence_parallel=True),
     ["parallel.tensor = 2", "225 tokens", "{1, 3}"]),
]


@pytest.mark.parametrize("model, world, batch, kwargs, fragments", BAD)
def test_bad_layouts_name_the_key_and_numbers(model, world, batch, kwargs, fragments):
    with pytest.raises(ValueError) as info:
        resolve_layout(megatron(**kwargs), model, world, global_batch=batch)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("tensor", 2), ("pipeline", 2), ("expert", 2), ("expert_tensor", 2), ("sequence_parallel", True),
    ("virtual_pipeline", 2), ("micro_batch", 4), ("num_microbatches", 2),
])
@pytest.mark.parametrize("engine", ["auto", "local", "ddp", "deepspeed"])
def test_megatron_keys_need_the_megatron_engine(engine, key, value):
    with pytest.raises(ValueError, match=rf"parallel\.{key} = .*parallel\.engine=megatron"):
        ParallelConfig(engine=engine, **{key: value})


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(tensor=0), "parallel.tensor = 0: must be an integer >= 1"),
    (dict(num_microbatches=0), "parallel.num_microbatches = 0"),
    (dict(micro_batch=0), "parallel.micro_batch = 0"),
    (dict(virtual_pipeline=1), "parallel.virtual_pipeline = 1: must be >= 2"),
])
def test_parallel_field_ranges(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        megatron(**kwargs)


def test_config_loading_with_megatron_keys():
    base = {"model": {"flavor": "DiffMoE-S-E16"}, "diffusion": {"objective": "ddpm"}}
    cfg = config_from_dict({**base, "parallel": {"engine": "megatron", "expert": 2, "num_microbatches": 2}})
    assert (cfg.parallel.expert, cfg.parallel.num_microbatches, cfg.parallel.micro_batch) == (2, 2, None)
    with pytest.raises(ConfigError, match="parallel.tensor = 2: only parallel.engine = megatron"):
        config_from_dict({**base, "parallel": {"engine": "ddp", "tensor": 2}})
    with pytest.raises(ConfigError, match="train.micro_batch_size = 4 with parallel.engine = megatron"):
        config_from_dict({**base, "parallel": {"engine": "megatron"}, "train": {"micro_batch_size": 4}})
