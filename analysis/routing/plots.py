"""Figures of the routing report, rendered to PNG bytes with matplotlib's Agg canvas.

No pyplot: figures are built on `matplotlib.figure.Figure` so nothing touches global state
(the trainer may be drawing its own heatmaps in the same process).
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_PANELS = 32  # per-layer grids beyond this show evenly spaced layers only


def to_png(fig: Figure, dpi: int = 90) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _matrix(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def layer_expert_heatmap(layers: list[dict], title: str) -> bytes:
    """Utilisation u_e = c_e / ideal, MoE layer x expert."""
    util = _matrix([m["utilisation"] or [np.nan] * m["num_experts"] for m in layers])
    fig = Figure(figsize=(min(2 + 0.45 * util.shape[1], 14), 1.5 + 0.35 * util.shape[0]))
    ax = fig.add_subplot()
    image = ax.imshow(util, aspect="auto", cmap="viridis", vmin=0,
                      vmax=max(2.0, np.nanmax(util) if np.isfinite(util).any() else 2.0))
    ax.set_xlabel("expert index")
    ax.set_ylabel("MoE layer (transformer block)")
    ax.set_yticks(range(len(layers)), [str(m["block"]) for m in layers])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="utilisation c_e / ideal load (1 = balanced)")
    return to_png(fig)


def _grid(count: int) -> tuple[int, int]:
    cols = min(4, count)
    return math.ceil(count / cols), cols


def _pick(layers: list[dict]) -> list[dict]:
    if len(layers) <= MAX_PANELS:
        return layers
    index = np.linspace(0, len(layers) - 1, MAX_PANELS).round().astype(int)
    return [layers[i] for i in sorted(set(index))]


def table_heatmaps(layers: list[dict], key: str, row_label: str, row_ticks: list[str] | None,
                   title: str) -> bytes | None:
    """Per-layer grid of (row variable x expert) heatmaps of routing shares.

    Each row is normalised to the share of that row's assignments going to each expert,
    times E, so 1 means "this expert gets its fair share of tokens from this noise bin/class".
    """
    layers = [m for m in _pick(layers) if m.get(key) is not None]
    if not layers:
        return None
    rows, cols = _grid(len(layers))
    num_rows = len(layers[0][key])
    fig = Figure(figsize=(4.2 * cols, 0.6 + min(0.28 * num_rows + 1.4, 8) * rows))
    for panel, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, panel + 1)
        table = np.asarray(layer[key], dtype=float)  # (rows, E)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = table / table.sum(axis=1, keepdims=True) * table.shape[1]
        image = ax.imshow(share, aspect="auto", cmap="magma", vmin=0,
                          vmax=max(2.0, np.nanmax(share) if np.isfinite(share).any() else 2.0),
                          interpolation="nearest")
        ax.set_title(f"block {layer['block']}", fontsize=9)
        ax.set_xlabel("expert index", fontsize=8)
        ax.set_ylabel(row_label, fontsize=8)
        if row_ticks and len(row_ticks) == num_rows and num_rows <= 20:
            ax.set_yticks(range(num_rows), row_ticks, fontsize=6)
        fig.colorbar(image, ax=ax, label="share x E (1 = fair share)")
    fig.suptitle(title)
    fig.tight_layout()
    return to_png(fig)


def history_plot(histories: list[tuple[str, dict]]) -> bytes | None:
    """Load-balance metrics over training steps, one line per run."""
    panels = [("cv_population_mean", "CV of expert load\n(population std / mean, mean over layers)"),
              ("max_violation_max", "MaxVio (max over layers)"),
              ("dead_fraction_mean", "dead-expert fraction\n(mean over layers)"),
              ("router_entropy_norm_mean", "router entropy / log E\n(mean over layers)"),
              ("drop_rate_mean", "drop rate (fraction of assignments)"),
              ("capacity_used_mean", "capacity used (mean over layers)"),
              ("loss", "training loss")]
    panels = [(k, label) for k, label in panels
              if any(any(v is not None for v in h.get(k, [])) for _, h in histories)]
    if not panels or not any(h["steps"] for _, h in histories):
        return None
    rows, cols = math.ceil(len(panels) / 3), min(3, len(panels))
    fig = Figure(figsize=(5 * cols, 3.4 * rows))
    for index, (key, label) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, index + 1)
        for name, hist in histories:
            steps = hist["loss_steps"] if key == "loss" else hist["steps"]
            values = [np.nan if v is None else v for v in hist.get(key, [])]
            if values:
                ax.plot(steps, values, marker="." if len(values) < 50 else None, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if len(histories) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("load balance over training (each point = one log interval)")
    fig.tight_layout()
    return to_png(fig)


def capacity_curves(runs: list[tuple[str, list[dict]]]) -> bytes | None:
    """Capacity actually used vs noise level, per layer (one run) or layer-mean (several)."""
    series = []
    for name, layers in runs:
        curves = [(m["block"], m["capacity_by_noise_level"]) for m in layers
                  if m.get("capacity_by_noise_level", {}).get("noise_level")]
        if curves:
            series.append((name, curves))
    if not series:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for name, curves in series:
        if len(series) == 1:
            for block, curve in curves:
                ax.plot(curve["noise_level"], curve["capacity"], marker=".", label=f"block {block}")
        levels = curves[0][1]["noise_level"]
        if all(c["noise_level"] == levels for _, c in curves):
            mean = np.mean([c["capacity"] for _, c in curves], axis=0)
            ax.plot(levels, mean, color="black" if len(series) == 1 else None, linewidth=2.5,
                    label=f"{name}: mean over layers")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="training capacity C = 1")
    ax.set_xlabel("noise level (0 = clean data, 1 = pure noise)")
    ax.set_ylabel("capacity used (tokens processed / (S/E))")
    ax.set_title("DiffMoE dynamic capacity vs noise level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return to_png(fig)


def class_capacity_plot(layers: list[dict]) -> bytes | None:
    """Capacity used per class (mean experts per token), layer mean with min/max band."""
    tables = [m["capacity_by_class"] for m in layers if m.get("capacity_by_class")]
    if not tables or len({len(t) for t in tables}) != 1:
        return None
    values = _matrix(tables)  # (L, classes)
    seen = np.isfinite(values).any(axis=0)  # classes that occurred in the probe
    if not seen.any():
        return None
    values, classes = values[:, seen], np.nonzero(seen)[0]
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    ax.fill_between(classes, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.3,
                    label="min..max over layers")
    ax.plot(classes, np.nanmean(values, 0), marker="." if len(classes) <= 100 else None,
            label="mean over layers")
    ax.set_xlabel("class label")
    ax.set_ylabel("capacity used (experts per token)")
    ax.set_title("capacity per class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_png(fig)


def calibration_plot(layers: list[dict]) -> bytes | None:
    """Reliability diagram of the capacity predictor, one line per layer."""
    layers = [m for m in layers if m.get("calibration")]
    if not layers:
        return None
    fig = Figure(figsize=(5, 4.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    for m in layers:
        cal = m["calibration"]
        pairs = [(p, f) for p, f in zip(cal["mean_prob"], cal["frequency"]) if p is not None]
        if pairs:
            ax.plot(*zip(*pairs), marker=".", label=f"block {m['block']} (ECE {cal['ece']:.3f})")
    ax.set_xlabel("predicted probability of selection")
    ax.set_ylabel("observed frequency (training top-K)")
    ax.set_title("capacity-predictor calibration")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return to_png(fig)


def step_consistency_plot(layers: list[dict]) -> bytes | None:
    """Jaccard overlap of each expert's tokens between adjacent sampling steps."""
    layers = [m for m in layers if m.get("adjacent_steps")]
    if not layers:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for m in layers:
        steps = m["adjacent_steps"]
        ax.plot(steps["noise_level"], [np.nan if v is None else v for v in steps["jaccard"]],
                label=f"block {m['block']}")
    ax.set_xlabel("noise level at step i (sampling runs from 1 to 0)")
    ax.set_ylabel("Jaccard(step i, step i+1), mean over experts")
    ax.set_ylim(0, 1.02)
    ax.set_title("routing consistency between adjacent sampling steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return to_png(fig)


def comparison_plot(summaries: list[tuple[str, dict]]) -> bytes | None:
    """Side-by-side bars of the headline metrics of several runs."""
    keys = [("cv_population_mean", "CV (population)"), ("max_violation_max", "MaxVio"),
            ("dead_fraction_mean", "dead fraction"), ("router_entropy_norm_mean", "entropy / log E"),
            ("mi_noise_nats_mean", "MI(expert; noise bin) [nats]")]
    keys = [(k, label) for k, label in keys if any(s.get(k) is not None for _, s in summaries)]
    if len(summaries) < 2 or not keys:
        return None
    fig = Figure(figsize=(3.2 * len(keys), 3.6))
    for index, (key, label) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), index + 1)
        values = [np.nan if s.get(key) is None else s[key] for _, s in summaries]
        ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
        ax.set_xticks(range(len(values)), [name for name, _ in summaries], rotation=30,
                      ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.set_xlabel("run")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("run comparison (final logging window)")
    fig.tight_layout()
    return to_png(fig)
