"""Compact per-token routing traces (npz) written by the probe and replayed for analysis.

Layout (format "moedit-routing-trace-v1"), N = tokens over all forwards, L = MoE layers:
    format             str
    blocks, num_experts, routers        (L,)
    forward_tokens     (F,) int64   tokens S of each forward (tokens are stored forward by forward)
    forward_step       (F,) int64   sampling-step index within a trajectory, -1 for fixed levels
    forward_stream     (F,) int64   which batch / trajectory the forward belongs to
    capacity           (F, L) float32   last_capacity per layer, NaN when not reported
    noise_level        (N,) float16;  labels (N,) int32 (-1 = unconditional)
    selected_<l>       (N, ceil(E/8)) uint8   bit-packed (S, E) selection masks
    scores_<l>, predictor_<l>  (N, E) float16   only with scores=True
    repa_similarity    (N,) float32, repa_depth ()   only for a REPA probe (each token's REPA similarity)
Bit-packing keeps a 16-expert decision at 2 bytes per token and layer.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from moedit.analysis.routing.accumulate import RoutingAccumulator, _numpy
from moedit.errors import MoeditError

FORMAT = "moedit-routing-trace-v1"


class TraceWriter:
    """Collects forwards in memory (this is the one part whose memory grows with samples)."""

    def __init__(self, scores: bool = False, repa_depth: int = 0):
        self.scores, self.repa_depth = scores, repa_depth
        self.layers: list[tuple[int, int, str]] | None = None  # (block, E, router)
        self.forwards: list[tuple[int, int, int]] = []  # (tokens, step, stream)
        self.capacity: list[list[float]] = []
        self.noise: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.arrays: dict[str, list[np.ndarray]] = {}

    def add(self, records: list[dict], capacities: dict | None, step: int | None, stream: int, similarity=None):
        layers = [(int(r["block"]), int(r["num_experts"]), str(r["router"])) for r in records]
        if self.layers is None:
            self.layers = layers
        elif layers != self.layers:
            raise ValueError("trace: the MoE layers changed between forwards")
        tokens = int(records[0]["selected"].shape[0])
        self.forwards.append((tokens, -1 if step is None else step, stream))
        self.capacity.append([float((capacities or {}).get(b, np.nan)) for b, _, _ in layers])
        self.noise.append(_numpy(records[0]["noise_level"]).astype(np.float16).reshape(-1))
        self.labels.append(_numpy(records[0]["labels"]).astype(np.int32).reshape(-1))
        if similarity is not None:
            self.arrays.setdefault("repa_similarity", []).append(_numpy(similarity).astype(np.float32).reshape(-1))
        for index, record in enumerate(records):
            selected = _numpy(record["selected"]).astype(bool)  # (S, E)
            self.arrays.setdefault(f"selected_{index}", []).append(np.packbits(selected, axis=1))
            if self.scores:
                for key, name in (("scores", "scores"), ("predictor_prob", "predictor")):
                    if record.get(key) is not None:
                        value = _numpy(record[key]).astype(np.float16)
                        self.arrays.setdefault(f"{name}_{index}", []).append(value)

    def save(self, path: str | Path) -> Path:
        if self.layers is None:
            raise MoeditError(f"trace {path}: nothing was recorded (no MoE forwards ran)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blocks, experts, routers = zip(*self.layers)
        forwards = np.asarray(self.forwards, dtype=np.int64)  # (F, 3)
        data = {"format": np.array(FORMAT), "blocks": np.asarray(blocks, dtype=np.int64),
                "num_experts": np.asarray(experts, dtype=np.int64), "routers": np.asarray(routers),
                "forward_tokens": forwards[:, 0], "forward_step": forwards[:, 1],
                "forward_stream": forwards[:, 2],
                "capacity": np.asarray(self.capacity, dtype=np.float32),
                "noise_level": np.concatenate(self.noise), "labels": np.concatenate(self.labels)}
        data.update({key: np.concatenate(parts) for key, parts in self.arrays.items()})
        if "repa_similarity" in data:
            data["repa_depth"] = np.array(self.repa_depth, dtype=np.int64)
        np.savez_compressed(path, **data)
        return path


def _corrupt(path, reason: str) -> MoeditError:
    return MoeditError(f"trace {path} is corrupt or not a moedit routing trace ({reason}); "
                       "re-create it with `moedit analyze routing RUN --probe --trace FILE`")


def load_trace(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate a trace; any defect is a one-line MoeditError."""
    path = Path(path)
    if not path.is_file():
        raise MoeditError(f"trace {path} is not a file (write one with --probe --trace FILE)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    if str(data.get("format", "")) != FORMAT:
        raise _corrupt(path, f"format is {str(data.get('format', 'missing'))!r}, expected {FORMAT}")
    required = ("blocks", "num_experts", "routers", "forward_tokens", "forward_step",
                "forward_stream", "capacity", "noise_level", "labels")
    missing = [key for key in required if key not in data]
    if missing:
        raise _corrupt(path, f"missing arrays {', '.join(missing)}")
    layers, forwards = data["blocks"].size, data["forward_tokens"].size
    tokens = int(data["forward_tokens"].sum())
    if data["noise_level"].shape != (tokens,) or data["labels"].shape != (tokens,):
        raise _corrupt(path, f"noise_level/labels do not hold {tokens} tokens")
    if "repa_similarity" in data and data["repa_similarity"].shape != (tokens,):
        raise _corrupt(path, f"repa_similarity does not hold {tokens} tokens")
    if data["capacity"].shape != (forwards, layers):
        raise _corrupt(path, f"capacity has shape {data['capacity'].shape}")
    for index, experts in enumerate(data["num_experts"]):
        expected = {f"selected_{index}": (tokens, (int(experts) + 7) // 8),
                    f"scores_{index}": (tokens, int(experts)),
                    f"predictor_{index}": (tokens, int(experts))}
        for key, shape in expected.items():
            if key.startswith("selected") or key in data:
                if key not in data or data[key].shape != shape:
                    got = data[key].shape if key in data else "missing"
                    raise _corrupt(path, f"{key} is {got}, expected {shape}")
    return data


def iter_trace(data: dict[str, np.ndarray]):
    """Yield (records, capacities, step, stream, similarity) per forward, in the capture format
    (similarity: the tokens' REPA similarity (S,), or None)."""
    offset = 0
    for forward, tokens in enumerate(data["forward_tokens"]):
        rows = slice(offset, offset + int(tokens))
        offset += int(tokens)
        records = []
        for index, (block, experts) in enumerate(zip(data["blocks"], data["num_experts"])):
            packed = data[f"selected_{index}"][rows]
            records.append({
                "block": int(block), "router": str(data["routers"][index]),
                "num_experts": int(experts),
                "selected": np.unpackbits(packed, axis=1, count=int(experts)).astype(bool),
                "scores": _float(data.get(f"scores_{index}"), rows),
                "noise_level": data["noise_level"][rows].astype(np.float32),
                "labels": data["labels"][rows].astype(np.int64),
                "predictor_prob": _float(data.get(f"predictor_{index}"), rows)})
        capacity = {int(b): float(c) for b, c in zip(data["blocks"], data["capacity"][forward])
                    if np.isfinite(c)}
        step = int(data["forward_step"][forward])
        similarity = data["repa_similarity"][rows] if "repa_similarity" in data else None
        yield records, capacity, (None if step < 0 else step), int(data["forward_stream"][forward]), similarity


def _float(array: np.ndarray | None, rows: slice) -> np.ndarray | None:
    return None if array is None else array[rows].astype(np.float32)


def analyse_trace(path: str | Path, edges, predictor_threshold: float = 0.5,
                  top_k: int | None = None, capacity: float | None = None, similarity_bins: int = 5) -> dict:
    """Replay a trace through the accumulator; returns the probe result dict."""
    data = load_trace(path)
    routers = {str(r) for r in data["routers"]}
    if top_k is None and capacity is None and "token_choice" not in routers:
        capacity = 1.0  # capacity routers are trained at C = 1 unless told otherwise
    accumulator = RoutingAccumulator(edges, top_k=top_k, capacity=capacity,
                                     predictor_threshold=predictor_threshold, similarity_bins=similarity_bins)
    for records, capacities, step, stream, similarity in iter_trace(data):
        accumulator.update(records, capacities, step=step, stream=stream, similarity=similarity)
    result = accumulator.result()
    if "repa" in result:
        result["repa"].update(depth=int(data.get("repa_depth", 0)), field=None, encoder=None)
    result.update(mode="trace", source=str(path))
    return result
