"""Run logging: JSONL for analysis, TensorBoard for eyes, a progress bar or plain lines for terminals."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from moedit.fileio import append_line, write_text


class RunLogger:
    """Only rank 0 makes one; every method is cheap and safe to call each log interval."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, progress: str):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.routing_path = run_dir / "routing.jsonl"
        self.total_steps = total_steps
        self.writer = None
        # Logs of an earlier attempt: a fresh start moves them aside, a resume drops their rows past
        # its checkpoint, so the logs always tell the story of the checkpoints (and say so).
        notes = _set_aside_earlier_attempt(run_dir) if not start_step else _drop_rows_after(run_dir, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.progress = progress
        self.bar = None
        if progress == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.start_time = time.time()
        self.start_step = start_step
        for note in notes:
            self.message(note)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        append_line(self.metrics_path, json.dumps(row), what="metrics")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        self._show(step, metrics)

    def log_routing(self, step: int, stats: dict[str, Any]) -> None:
        append_line(self.routing_path, json.dumps({"step": step, "stats": stats}), what="routing statistics")
        if self.writer is None:
            return
        for layer in stats["layers"]:
            counts = np.asarray(layer["tokens_per_expert"], dtype=float)
            if counts.sum() > 0:
                self.writer.add_scalar(f"routing/block{layer['block']}/max_over_mean", counts.max() / counts.mean(), step)
                self.writer.add_scalar(f"routing/block{layer['block']}/cv", counts.std() / counts.mean(), step)

    def log_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def log_heatmaps(self, step: int, stats: dict[str, Any]) -> None:
        if self.writer is None or not stats["layers"]:
            return
        for tag, image in routing_heatmaps(stats).items():
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def _show(self, step: int, metrics: dict[str, Any]) -> None:
        loss = metrics.get("loss", float("nan"))
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics.get('lr', 0):.2e}", refresh=False)
            self.bar.refresh()
        elif self.progress == "lines":
            elapsed = time.time() - self.start_time
            done = step - self.start_step
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            print(
                f"step {step}/{self.total_steps} loss {loss:.4f} lr {metrics.get('lr', 0):.2e} "
                f"img/s {metrics.get('images_per_s', 0):.1f} eta {eta:.0f}s",
                flush=True,
            )

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.progress != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


LOG_FILES = ("metrics.jsonl", "routing.jsonl")
EARLIER_LOGS = (*LOG_FILES, "tb", "samples")


def _set_aside_earlier_attempt(run_dir: Path) -> list[str]:
    """A run that starts at step 0 in a directory holding logs of an earlier attempt (which left no
    checkpoint to resume, or was told train.resume=never): move those logs to
    RUN/previous/<time>/ instead of overwriting them or letting TensorBoard overlay the two."""
    def holds_something(path: Path) -> bool:
        return any(path.iterdir()) if path.is_dir() else path.is_file() and path.stat().st_size > 0

    found = [name for name in EARLIER_LOGS if holds_something(run_dir / name)]
    if not found:
        return []
    rows = _steps(run_dir / "metrics.jsonl")
    target = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for name in found:
        (run_dir / name).rename(target / name)
    last = f", logged up to step {max(rows)}" if rows else ""
    return [f"{run_dir} held the logs of an earlier attempt ({', '.join(found)}{last}) and this run starts at "
            f"step 0: they were moved to {target}"]


def _drop_rows_after(run_dir: Path, step: int) -> list[str]:
    """A resumed run rewrites the logs' tail past its checkpoint: the JSONL files hold exactly one
    line per logged step (TensorBoard's events past it are purged by SummaryWriter(purge_step))."""
    dropped = sum(1 for s in _steps(run_dir / "metrics.jsonl") if s > step)
    for name in LOG_FILES:
        _truncate_after(run_dir / name, step)
    if not dropped:
        return []
    return [f"resuming at step {step}: dropped {dropped} metrics row(s) past it, logged by an attempt that "
            "ended before its next checkpoint"]


def _steps(path: Path) -> list[int]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            out.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step`. A line that does not parse (the half line of a process
    killed mid-write) is dropped. The file is replaced atomically; a full disk is a named error."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept), what="log")


def routing_heatmaps(stats: dict[str, Any]) -> dict[str, np.ndarray]:
    """RGB images (H, W, 3) of expert utilisation: layer x expert and noise-bin x expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = stats["layers"]
    util = []
    for layer in layers:
        counts = np.asarray(layer["tokens_per_expert"], dtype=float)
        util.append(counts / max(counts.mean(), 1e-12))
    by_noise = sum(np.asarray(layer["tokens_per_expert_by_noise"], dtype=float) for layer in layers)
    by_noise = by_noise / np.maximum(by_noise.mean(axis=1, keepdims=True), 1e-12)
    edges = stats.get("noise_bin_edges", [])
    images = {}
    for tag, matrix, ylabel, yticks in (
        ("routing/load_layer_x_expert", np.stack(util), "MoE block", [str(layer["block"]) for layer in layers]),
        ("routing/load_noise_x_expert", by_noise, "noise level bin", [f"{a:.2f}-{b:.2f}" for a, b in zip(edges[:-1], edges[1:])]),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
        im = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel(ylabel)
        if len(yticks) == matrix.shape[0] and matrix.shape[0] <= 16:
            ax.set_yticks(range(matrix.shape[0]), yticks)
        fig.colorbar(im, ax=ax, label="load / mean load")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        buf.seek(0)
        images[tag] = plt.imread(buf)[..., :3]
    return images
