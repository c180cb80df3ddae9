"""Collect runs for scaling fits: from a sweep of run directories or from a CSV table.

A run directory follows docs/DESIGN.md (config.yaml, model_info.json,
metrics.jsonl, DONE). Per run we keep the parameters N (activated and total),
training compute C = train FLOPs per image x images seen, data seen D (tokens and
images), the MoE shape (experts, granularity, capacity), one final loss and the
loss-vs-compute curve, and a signature of the training objective's t-sampling
distribution (runs with different signatures are not comparable).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from moedit.errors import MoeditError

# model_info.json key -> accepted spellings (the first is the one docs/DESIGN.md's writer should use).
INFO_KEYS = {
    "total_params": ("total_params", "params_total", "num_params"),
    "activated_params": ("activated_params", "active_params", "params_activated"),
    "train_flops_per_image": ("train_flops_per_image",),
    "train_gflops_per_image": ("train_gflops_per_image",),
    "tokens_per_image": ("tokens_per_image", "num_tokens"),
}
EVAL_LOSS_KEYS = ("eval/loss", "eval_loss")
# "auto" training loss: the diffusion objective's own terms (flow: mse; DDPM: mse + vb), without
# the MoE auxiliary terms that "loss" also holds; plain "loss" when those are not logged.
OBJECTIVE_TERMS = ("loss/mse", "loss/vb")
# DiT's GFLOPs count a multiply-add as one FLOP; scaling laws (C ~ 6 N D) count it as two.
FLOPS_PER_MAC = 2.0
# Diffusion-section keys that only affect sampling at inference, not the training loss.
INFERENCE_ONLY = ("sampler", "sample", "cfg", "guidance", "sde", "ddim")

CSV_REQUIRED = ("params", "flops", "loss")
CSV_OPTIONAL = ("name", "total_params", "tokens", "images", "experts", "granularity", "capacity", "t_sampling")


@dataclass(eq=False)
class Run:
    """One finished training run, reduced to what the scaling fits need."""

    name: str
    activated_params: float
    total_params: float
    flops: float
    """Training compute C in FLOPs."""
    loss: float
    loss_source: str
    """'eval' (last held-out eval loss) or 'train_ema:<key>' (EMA of the training loss)."""
    tokens: float | None = None
    images: float | None = None
    experts: int = 1
    granularity: float = 1.0
    capacity: float | None = None
    t_sampling: str = "unknown"
    curve_flops: np.ndarray | None = field(default=None, repr=False)
    curve_loss: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict:
        keys = ("name", "activated_params", "total_params", "flops", "tokens", "images", "experts",
                "granularity", "capacity", "loss", "loss_source", "t_sampling")
        return {k: getattr(self, k) for k in keys}


def collect(source: str | os.PathLike, *, loss_key: str = "auto", loss_ema: float = 0.9,
            include_unfinished: bool = False, columns: dict[str, str] | None = None,
            flops_per_param_token: float = 6.0) -> tuple[list[Run], list[dict]]:
    """Runs from a sweep directory or a CSV file -> (runs, skipped [{path, reason}])."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"scaling source {path} does not exist: give a sweep directory or a CSV of runs")
    if path.is_file():
        return read_runs_csv(path, columns=columns, flops_per_param_token=flops_per_param_token), []
    return collect_sweep(path, loss_key=loss_key, loss_ema=loss_ema, include_unfinished=include_unfinished)


def collect_sweep(root: Path, *, loss_key: str = "auto", loss_ema: float = 0.9,
                  include_unfinished: bool = False) -> tuple[list[Run], list[dict]]:
    runs, skipped = [], []
    for run_dir in find_run_dirs(root):
        if not (run_dir / "DONE").exists() and not include_unfinished:
            skipped.append({"path": str(run_dir), "reason": "no DONE file (unfinished; --include-unfinished keeps it)"})
            continue
        runs.append(read_run_dir(run_dir, root=root, loss_key=loss_key, loss_ema=loss_ema))
    if not runs:
        raise MoeditError(f"{root}: no finished run directories (config.yaml + model_info.json + metrics.jsonl "
                          f"+ DONE) found; skipped {len(skipped)}")
    return runs, skipped


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under root holding config.yaml, model_info.json and metrics.jsonl."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if {"config.yaml", "model_info.json", "metrics.jsonl"} <= set(filenames):
            found.append(Path(dirpath))
            dirnames[:] = []  # a run directory holds no further runs
        else:
            dirnames.sort()
    return sorted(found)


def read_run_dir(run_dir: Path, *, root: Path | None = None, loss_key: str = "auto", loss_ema: float = 0.9) -> Run:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    info = json.loads((run_dir / "model_info.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    flops_per_image = _info_value(info, "train_flops_per_image", run_dir, default=None)
    if flops_per_image is None:
        gmacs = _info_value(info, "train_gflops_per_image", run_dir, default=None)
        if gmacs is None:
            raise MoeditError(f"{run_dir / 'model_info.json'}: no 'train_gflops_per_image' (multiply-adds, DiT "
                              f"convention) or 'train_flops_per_image' (FLOPs); keys are {sorted(info)}")
        flops_per_image = gmacs * 1e9 * FLOPS_PER_MAC
    total = _info_value(info, "total_params", run_dir)
    activated = _info_value(info, "activated_params", run_dir, default=total)
    tokens_per_image = _info_value(info, "tokens_per_image", run_dir, default=None)
    if tokens_per_image is None:
        tokens_per_image = _tokens_from_config(config)

    images = images_seen(records, config, run_dir)
    loss, source, curve_loss = final_loss(records, run_dir, loss_key=loss_key, loss_ema=loss_ema)
    moe = _moe_shape(config, info)
    keep = np.isfinite(images) & (images > 0) & np.isfinite(curve_loss)
    name = str(run_dir.relative_to(root)) if root is not None else run_dir.name
    return Run(
        name=name or run_dir.name, activated_params=float(activated), total_params=float(total),
        flops=float(flops_per_image * images[-1]), loss=loss, loss_source=source,
        tokens=None if tokens_per_image is None else float(tokens_per_image * images[-1]),
        images=float(images[-1]), t_sampling=t_sampling_signature(config), curve_flops=flops_per_image * images[keep],
        curve_loss=curve_loss[keep], **moe,
    )


def images_seen(records: list[dict], config: dict, run_dir: Path) -> np.ndarray:
    """Images seen at each metrics line: `images_seen` if logged, else step x train.global_batch_size."""
    batch = (config.get("train") or {}).get("global_batch_size")
    out = []
    for r in records:
        if r.get("images_seen") is not None:
            out.append(float(r["images_seen"]))
        elif r.get("step") is not None and batch:
            out.append(float(r["step"]) * float(batch))
        else:
            out.append(np.nan)
    if not np.isfinite(out[-1]):
        raise MoeditError(f"{run_dir / 'metrics.jsonl'}: last line has neither 'images_seen' nor 'step' with "
                          "train.global_batch_size in config.yaml; cannot compute the training FLOPs")
    return np.array(out)


def read_metrics(path: Path) -> list[dict]:
    records = []
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MoeditError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or truncate the line") from exc
    if not records:
        raise MoeditError(f"{path} is empty: the run logged no metrics")
    return records


def final_loss(records: list[dict], run_dir: Path, *, loss_key: str = "auto",
               loss_ema: float = 0.9) -> tuple[float, str, np.ndarray]:
    """(final loss, its source, EMA-smoothed training-loss curve per metrics line).

    The last held-out eval loss wins when logged (it is measured at a fixed t-grid,
    free of minibatch noise). Otherwise the final loss is the bias-corrected EMA
    of the training loss over log lines (decay loss_ema per line).
    """
    if not 0.0 <= loss_ema < 1.0:
        raise ValueError(f"loss_ema = {loss_ema}: use a decay in [0, 1)")
    key = loss_key
    if loss_key == "auto":
        present = [k for k in OBJECTIVE_TERMS if any(k in r for r in records)]
        key = "+".join(present) if "loss/mse" in present else "loss"
    parts = key.split("+") if loss_key == "auto" else [key]
    raw = np.array([sum(r.get(k, np.nan) for k in parts) for r in records], dtype=np.float64)
    if not np.isfinite(raw).any():
        raise MoeditError(f"{run_dir / 'metrics.jsonl'}: no finite values for loss key '{key}' "
                          f"(keys seen: {sorted(records[-1])}); choose one with --loss-key")
    smooth = ema(raw, loss_ema)
    for eval_key in EVAL_LOSS_KEYS:
        evals = [r[eval_key] for r in records if eval_key in r and r[eval_key] is not None]
        if evals:
            return float(evals[-1]), "eval", smooth
    last = smooth[np.isfinite(smooth)][-1]
    return float(last), f"train_ema:{key}", smooth


def ema(values: np.ndarray, decay: float) -> np.ndarray:
    """Bias-corrected exponential moving average; NaN entries are skipped (carry the last value)."""
    out = np.full_like(values, np.nan)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = decay * acc + (1.0 - decay) * v
            weight = decay * weight + (1.0 - decay)
        if weight > 0:
            out[i] = acc / weight
    return out


def t_sampling_signature(config: dict) -> str:
    """Canonical JSON of the diffusion section without inference-only keys."""
    section = config.get("diffusion") or {}
    if not isinstance(section, dict):
        return json.dumps(section)
    kept = {k: v for k, v in section.items() if not any(tag in k.lower() for tag in INFERENCE_ONLY)}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def check_single_distribution(runs: list[Run], force: bool = False) -> str | None:
    """Raise unless all runs share one t-sampling signature (or force); return it or None if mixed."""
    groups: dict[str, list[str]] = {}
    for run in runs:
        groups.setdefault(run.t_sampling, []).append(run.name)
    if len(groups) <= 1:
        return next(iter(groups), None)
    if force:
        return None
    lines = "; ".join(f"{sig} ({len(names)} runs, e.g. {names[0]})" for sig, names in groups.items())
    raise MoeditError(f"runs mix {len(groups)} diffusion t-sampling settings, whose losses are not comparable: "
                      f"{lines}. Fit one setting at a time, or pass --force")


def read_runs_csv(path: Path, *, columns: dict[str, str] | None = None,
                  flops_per_param_token: float = 6.0) -> list[Run]:
    """Runs from a CSV: required columns params (N), flops (C), loss; see CSV_OPTIONAL.

    `columns` maps our names to the file's (e.g. {"params": "Model Size"}). Without a
    tokens column, D = C / (flops_per_param_token * N) (Chinchilla's C = 6 N D).
    """
    columns = dict(columns or {})
    unknown = set(columns) - set(CSV_REQUIRED) - set(CSV_OPTIONAL)
    if unknown:
        raise ValueError(f"--column: unknown name(s) {sorted(unknown)}; known: {list(CSV_REQUIRED + CSV_OPTIONAL)}")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        rows = list(reader)
    col = {name: columns.get(name, name) for name in CSV_REQUIRED + CSV_OPTIONAL}
    for name in CSV_REQUIRED:
        if col[name] not in header:
            raise MoeditError(f"{path}: missing column '{col[name]}' (for {name}); columns are {header}. "
                              f"Rename it or map it with --column {name}=<column>")
    runs = []
    for i, row in enumerate(rows):
        def num(name, default=None, row=row):
            text = row.get(col[name], "") if col[name] in header else ""
            if text is None or text.strip() == "":
                return default
            try:
                return float(text)
            except ValueError as exc:
                raise MoeditError(f"{path} row {i + 2}: column '{col[name]}' = {text!r} is not a number") from exc

        params, flops = num("params"), num("flops")
        tokens = num("tokens")
        if tokens is None and params and flops:
            tokens = flops / (flops_per_param_token * params)
        runs.append(Run(
            name=row.get(col["name"]) or f"row{i + 2}", activated_params=params, total_params=num("total_params", params),
            flops=flops, loss=num("loss"), loss_source="csv", tokens=tokens, images=num("images"),
            experts=int(num("experts", 1)), granularity=num("granularity", 1.0), capacity=num("capacity"),
            t_sampling=row.get(col["t_sampling"]) or "unknown",
        ))
    return runs


def validate_runs(runs: list[Run], *, need: tuple[str, ...] = ("activated_params", "flops", "loss")) -> None:
    """Every value the fits take a log of must be positive and finite."""
    for attr in need:
        bad = [r.name for r in runs if getattr(r, attr) is None or not math.isfinite(getattr(r, attr))
               or getattr(r, attr) <= 0]
        if bad:
            raise MoeditError(f"{len(bad)} run(s) have a missing, non-finite or non-positive {attr} "
                              f"(e.g. {bad[:3]}); scaling fits take its logarithm: fix or drop them")


def drop_highest_loss(runs: list[Run], count: int) -> list[Run]:
    """Drop the `count` runs with the highest loss (Besiroglu et al. drop 5 from the Chinchilla data)."""
    if count <= 0:
        return list(runs)
    order = sorted(range(len(runs)), key=lambda i: runs[i].loss)
    keep = sorted(order[:len(runs) - count])
    return [runs[i] for i in keep]


def _info_value(info: dict, key: str, run_dir: Path, default=KeyError):
    for spelling in INFO_KEYS[key]:
        if info.get(spelling) is not None:
            return float(info[spelling])
    if default is KeyError:
        raise MoeditError(f"{run_dir / 'model_info.json'}: no '{INFO_KEYS[key][0]}' (also tried "
                          f"{list(INFO_KEYS[key][1:])}); keys are {sorted(info)}")
    return default


def _tokens_from_config(config: dict) -> float | None:
    model = config.get("model") or {}
    size, patch = model.get("input_size"), model.get("patch_size")
    if isinstance(size, (int, float)) and isinstance(patch, (int, float)) and patch > 0:
        return float((size // patch) ** 2)
    return None


def _moe_shape(config: dict, info: dict) -> dict:
    # The trainer writes `moe` as a top-level section (null for dense models); accept model.moe too.
    moe = config.get("moe") or (config.get("model") or {}).get("moe") or {}
    experts = info.get("num_experts", moe.get("num_experts", 1))
    granularity = info.get("granularity", moe.get("granularity", 1))
    # Token choice sizes expert buffers by capacity_factor; expert-choice routers by capacity.
    key = "capacity_factor" if moe.get("router") == "token_choice" else "capacity"
    capacity = info.get("capacity", moe.get(key))
    return {"experts": int(experts or 1), "granularity": float(granularity or 1),
            "capacity": None if capacity is None else float(capacity)}
