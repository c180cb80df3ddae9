"""Read a run directory's routing logs (docs/DESIGN.md "Run directory") for the routing report.

routing.jsonl holds one line per log interval, `{"step", "stats": <snapshot_routing_stats>}`,
with every count summed over the interval; metrics.jsonl holds the scalar training log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from moedit.analysis.routing import metrics as rm
from moedit.errors import MoeditError

LAYER_KEYS = ("block", "num_experts", "tokens", "tokens_per_expert")


@dataclass
class RunLogs:
    """Everything the report reads from one run directory."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    routing: list[tuple[int, dict]] = field(default_factory=list)  # (step, snapshot)
    metrics: list[dict] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict]:
    """Parse a JSONL file; a broken line is an error naming the file and line number.

    A truncated LAST line is skipped: a run killed mid-write leaves one, and the rest is good.
    """
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise MoeditError(f"{path}:{number}: not valid JSON ({exc.msg}); "
                              "fix or delete that line") from None
        if not isinstance(row, dict):
            raise MoeditError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _check_snapshot(snapshot: object, where: str) -> dict:
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("layers"), list):
        raise MoeditError(f"{where}: 'stats' must be a snapshot_routing_stats dict with 'layers'")
    for layer in snapshot["layers"]:
        missing = [key for key in LAYER_KEYS if key not in layer]
        if missing:
            raise MoeditError(f"{where}: a routing layer lacks key(s) {', '.join(missing)}")
        if len(layer["tokens_per_expert"]) != int(layer["num_experts"]):
            raise MoeditError(f"{where}: block {layer['block']} has {layer['num_experts']} "
                              f"experts but {len(layer['tokens_per_expert'])} load counts")
    return snapshot


def read_run(path: str | Path, require_routing: bool = True) -> RunLogs:
    """Load config, model info and logs of a run directory.

    Raises MoeditError when the directory is missing, or when `require_routing` and the run
    has no routing statistics (a dense model, or routing logging was off).
    """
    path = Path(path)
    if not path.is_dir():
        raise MoeditError(f"run directory {path} does not exist (pass the RUN directory that "
                          "`moedit train` wrote)")
    run = RunLogs(path=path, name=path.resolve().name)
    config_file = path / "config.yaml"
    if config_file.is_file():
        try:
            run.config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MoeditError(f"{config_file}: not valid YAML ({exc})") from None
    info_file = path / "model_info.json"
    if info_file.is_file():
        try:
            run.model_info = json.loads(info_file.read_text())
        except json.JSONDecodeError as exc:
            raise MoeditError(f"{info_file}: not valid JSON ({exc.msg})") from None
    if (path / "metrics.jsonl").is_file():
        run.metrics = read_jsonl(path / "metrics.jsonl")
    routing_file = path / "routing.jsonl"
    if routing_file.is_file():
        for number, row in enumerate(read_jsonl(routing_file), start=1):
            if "step" not in row or "stats" not in row:
                raise MoeditError(f"{routing_file}:{number}: expected keys 'step' and 'stats'")
            snapshot = _check_snapshot(row["stats"], f"{routing_file}:{number}")
            if snapshot["layers"]:
                run.routing.append((int(row["step"]), snapshot))
    if require_routing and not run.routing:
        raise MoeditError(
            f"run {path} has no routing statistics ({routing_file.name} missing or without MoE "
            "layers): a dense model, or a run without routing logging; use --probe on a MoE "
            "checkpoint instead")
    return run


def read_samples(path: str | Path) -> dict:
    """The routing statistics a `moedit sample` JSON recorded: {"file", "routing": snapshot,
    "num_samples", "prompts"}; a text run's layers carry tokens_per_expert_by_prompt."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoeditError(f"--samples {path}: no such file (give the JSON `moedit sample` wrote)") from None
    except json.JSONDecodeError as exc:
        raise MoeditError(f"--samples {path}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or "routing" not in data:
        raise MoeditError(f"--samples {path}: no routing statistics (not a JSON of `moedit sample`, or one "
                          "written before it recorded them)")
    routing = _check_snapshot(data["routing"], str(path))
    if not routing["layers"]:
        raise MoeditError(f"--samples {path}: the sampled model has no MoE layers")
    return {"file": str(path), "routing": routing, "num_samples": data.get("num_samples"),
            "prompts": data.get("prompts")}


def merged_window(run: RunLogs, last: int | None) -> tuple[dict, dict]:
    """Sum the last `last` intervals (all when None); returns (snapshot, window info)."""
    rows = run.routing if not last else run.routing[-last:]
    merged = rm.merge_snapshots([snap for _, snap in rows], str(run.path / "routing.jsonl"))
    window = {"first_step": rows[0][0], "last_step": rows[-1][0], "intervals": len(rows)}
    return merged, window


def history(run: RunLogs) -> dict:
    """Per-interval load-balance metrics over training steps (each interval on its own)."""
    steps, rows = [], []
    for step, snapshot in run.routing:
        metrics = [rm.layer_metrics(layer) for layer in snapshot["layers"]]
        steps.append(step)
        rows.append({"summary": rm.summarise_layers(metrics),
                     "cv_population": [m["cv_population"] for m in metrics],
                     "aux": _aux_means(snapshot)})
    out = {"steps": steps}
    keys = ("cv_population_mean", "max_violation_max", "dead_fraction_mean",
            "router_entropy_norm_mean", "drop_rate_mean", "capacity_used_mean",
            "mi_noise_nats_mean")
    for key in keys:
        out[key] = [row["summary"][key] for row in rows]
    out["cv_population_by_layer"] = [row["cv_population"] for row in rows]  # [interval][layer]
    for term in sorted({t for row in rows for t in row["aux"]}):
        out[f"aux_{term}"] = [row["aux"].get(term) for row in rows]
    out["loss_steps"], out["loss"] = _loss_curve(run.metrics)
    return out


def _aux_means(snapshot: dict) -> dict:
    """Aux losses per forward, summed over layers (the logged aux values are interval sums)."""
    totals: dict[str, float] = {}
    for layer in snapshot["layers"]:
        forwards = layer.get("forwards") or 0
        for term, value in (layer.get("aux") or {}).items():
            if forwards and value is not None:
                totals[term] = totals.get(term, 0.0) + float(value) / forwards
    return totals


def _loss_curve(metrics: list[dict]) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for row in metrics:
        if "step" in row and isinstance(row.get("loss"), (int, float)):
            if np.isfinite(row["loss"]):
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    return steps, losses


def describe_model(run: RunLogs) -> dict:
    """Flavor, router and expert counts for report headers (from model_info and config)."""
    model_cfg = run.config.get("model") or {}
    moe_cfg = model_cfg.get("moe") or {}
    first = run.routing[-1][1]["layers"][0] if run.routing else {}
    return {
        "flavor": run.model_info.get("flavor", model_cfg.get("flavor")),
        "router": first.get("router", moe_cfg.get("router")),
        "num_experts": first.get("num_experts", moe_cfg.get("num_experts")),
        "top_k": first.get("top_k", moe_cfg.get("top_k")),
        "capacity": first.get("capacity", moe_cfg.get("capacity")),
        "moe_layers": len(run.routing[-1][1]["layers"]) if run.routing else None,
        "total_params": run.model_info.get("total_params"),
        "activated_params": run.model_info.get("activated_params"),
    }
