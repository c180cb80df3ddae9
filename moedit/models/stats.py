"""Routing statistics: list, snapshot and reset the MoE layers' buffers; per-token capture.

Every statistic is a sum kept in a module buffer (moe.py), so reducing across data-parallel
ranks is one all-reduce SUM (`moedit.engines.reduce_routing_stats`, the only place that does it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from moedit.models.moe import SCALAR_SLOTS, RoutingStats


def _moe_layers(model: nn.Module) -> list[RoutingStats]:
    return [m for m in model.modules() if isinstance(m, RoutingStats)]


def routing_stat_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every routing-statistics buffer of the model (all sums), in a fixed order."""
    return [b for layer in _moe_layers(model) for b in layer.stat_buffers()]


def mutable_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Buffers a training forward updates in place: routing statistics, DiffMoE thresholds and
    aux-loss-free biases (the trainer restores them when it skips a non-finite step)."""
    owned = {id(t): t for t in routing_stat_tensors(model)}
    for name, buffer in model.named_buffers():
        if name.rsplit(".", 1)[-1] in ("expert_threshold", "expert_bias"):
            owned.setdefault(id(buffer), buffer)
    return list(owned.values())


def reset_routing_stats(model: nn.Module) -> None:
    for layer in _moe_layers(model):
        layer.reset_stats()


def layer_snapshot(layer: RoutingStats) -> dict:
    """One layer's statistics as plain Python numbers (one entry of the snapshot's "layers")."""
    v = dict(zip(SCALAR_SLOTS, layer.stat_scalars.tolist()))
    tp, predicted, target, total = (v["predictor_tp"], v["predictor_predicted"], v["predictor_target"],
                                    v["predictor_total"])
    by_class = layer.stat_tokens_per_expert_by_class
    snap = {
        "block": layer.block_index,
        "router": layer.router_name,
        "num_experts": layer.num_experts,
        "tokens": int(v["tokens"]),
        "tokens_per_expert": layer.stat_tokens_per_expert.tolist(),
        "tokens_per_expert_by_noise": layer.stat_tokens_per_expert_by_noise.tolist(),
        "tokens_per_expert_by_class": by_class.tolist() if by_class.shape[0] else None,
        "dropped": int(v["dropped"]),
        "entropy_sum": v["entropy_sum"],
        "entropy_count": int(v["entropy_count"]),
        "predictor_tp": int(tp),
        "predictor_fp": int(predicted - tp),
        "predictor_fn": int(target - tp),
        "predictor_tn": int(total - predicted - target + tp),
        "capacity_used_sum": v["capacity_used_sum"],
        "forwards": int(v["forwards"]),
        "aux": {name: v[f"aux_{name}"] for name in ("balance", "z", "predictor")},
    }
    if layer.router_name == "token_choice":
        snap["top_k"] = layer.top_k
    else:
        snap["capacity"] = layer.capacity
    return snap


def snapshot_routing_stats(model: nn.Module, reset: bool = True) -> dict:
    """Plain-Python routing statistics of every MoE layer (format in docs/DESIGN.md)."""
    edges = list(getattr(model, "noise_bin_edges", [0.0, 1.0]))
    layers = [layer_snapshot(layer) for layer in _moe_layers(model)]
    if reset:
        reset_routing_stats(model)
    return {"noise_bin_edges": edges, "layers": layers}


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[dict]]:
    """Record per-token routing of every MoE layer for each forward run inside the block."""
    records: list[dict] = []
    layers = _moe_layers(model)
    for layer in layers:
        layer.capture = records
    try:
        yield records
    finally:
        for layer in layers:
            layer.capture = None


def last_capacity(model: nn.Module) -> dict[int, float]:
    """{block: capacity} of each MoE layer's latest forward: tokens processed / S (1.0 = C of 1)."""
    return {layer.block_index: float(layer.last_capacity) for layer in _moe_layers(model)
            if layer.last_capacity is not None}
