"""Synthetic run directories in the docs/DESIGN.md layout, for tests and report demos.

The routing statistics are drawn from a known generative story (experts that specialise in
noise levels, a balance that improves over training), not from a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml


def _snapshot(rng, router: str, blocks, num_experts: int, tokens: int, forwards: int,
              edges, num_classes: int, progress: float) -> dict:
    """One interval's snapshot_routing_stats dict; `progress` in [0, 1] sharpens balance."""
    bins = len(edges) - 1
    centers = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
    layers = []
    for index, block in enumerate(blocks):
        # expert e prefers noise levels near e / (E - 1): gives MI(expert; noise bin) > 0
        pref = np.exp(-((centers[:, None] - np.linspace(0, 1, num_experts)[None]) ** 2) / 0.08)
        if router == "diffmoe":
            assignments = tokens  # capacity 1: every expert takes exactly S / E per forward
            load_share = np.full(num_experts, 1.0 / num_experts)
        else:
            assignments = tokens * 2  # top-2
            skew = np.exp(-(1.0 - progress) * 3.0 * np.arange(num_experts) / num_experts)
            load_share = skew / skew.sum()
        loads = rng.multinomial(assignments, load_share)
        if router == "diffmoe":
            loads = np.full(num_experts, tokens // num_experts)
        if router != "diffmoe" and index == 0 and progress < 0.3:
            loads[-1] = 0  # an expert that is dead early in training
        by_noise = np.stack([rng.multinomial(n, pref[:, e] / pref[:, e].sum())
                             for e, n in enumerate(loads)], axis=1)  # (bins, E)
        by_class = np.stack([rng.multinomial(n, np.full(num_classes, 1.0 / num_classes))
                             for n in loads], axis=1)  # (classes, E)
        layer = {"block": block, "router": router, "num_experts": num_experts,
                 "tokens": tokens, "tokens_per_expert": loads.tolist(),
                 "tokens_per_expert_by_noise": by_noise.tolist(),
                 "tokens_per_expert_by_class": by_class.tolist(),
                 "dropped": 0, "entropy_sum": float(tokens * np.log(num_experts)
                                                    * (0.6 + 0.3 * progress)),
                 "entropy_count": tokens, "forwards": forwards,
                 "aux": {"balance": 0.0, "z": 0.0, "predictor": 0.0}}
        if router == "diffmoe":
            tp = int(tokens * 0.8 * (0.5 + 0.5 * progress))
            layer.update(capacity=1.0, predictor_tp=tp, predictor_fp=tokens - tp,
                         predictor_fn=tokens - tp, predictor_tn=tokens * (num_experts - 2) + tp,
                         capacity_used_sum=float(forwards), dropped=0)
            layer["aux"]["predictor"] = forwards * 0.6 * (1.2 - progress)
        else:
            layer.update(top_k=2, dropped=int(assignments * 0.05 * (1 - progress)),
                         predictor_tp=0, predictor_fp=0, predictor_fn=0, predictor_tn=0,
                         capacity_used_sum=0.0)
            layer["aux"]["balance"] = forwards * (1.0 + 0.5 * (1 - progress))
        layers.append(layer)
    return {"noise_bin_edges": list(edges), "layers": layers}


def make_run_dir(path: str | Path, router: str = "diffmoe", num_experts: int = 8,
                 intervals: int = 12, log_every: int = 50, num_classes: int = 10,
                 seed: int = 0, blocks=(1, 3, 5, 7)) -> Path:
    """Write config.yaml, model_info.json, metrics.jsonl and routing.jsonl under `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, 1, 11).round(6).tolist()
    batch, tokens_per_sample = 16, 16
    moe = {"router": router, "num_experts": num_experts, "every": 2}
    moe.update({"capacity": 1.0} if router == "diffmoe" else {"top_k": 2})
    config = {"model": {"flavor": f"synthetic-{router}", "depth": 8, "hidden": 64, "moe": moe},
              "diffusion": {"objective": "flow"}, "train": {"steps": intervals * log_every}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "model_info.json").write_text(json.dumps(
        {"flavor": config["model"]["flavor"], "total_params": 1_234_567,
         "activated_params": 456_789}))
    with open(path / "routing.jsonl", "w") as routing, open(path / "metrics.jsonl", "w") as log:
        for interval in range(intervals):
            step = (interval + 1) * log_every
            progress = interval / max(intervals - 1, 1)
            snap = _snapshot(rng, router, blocks, num_experts, log_every * batch * tokens_per_sample,
                             log_every, edges, num_classes, progress)
            routing.write(json.dumps({"step": step, "stats": snap}) + "\n")
            log.write(json.dumps({"step": step, "epoch": 0, "images_seen": step * batch,
                                  "loss": 1.0 / (1 + 0.01 * step), "lr": 1e-4}) + "\n")
    return path
