"""On-the-fly aggregation of per-token routing decisions (the offline probe's records).

Input is the capture contract of docs/DESIGN.md: per MoE layer per forward a dict with
`selected` (S, E) bool, `scores` (S, E), `noise_level` (S,), `labels` (S,) and
`predictor_prob` (S, E) or None; for a REPA run the probe adds each token's REPA similarity (S,)
per forward (`update(..., similarity=)`). Everything is reduced to fixed-size counters as it arrives,
so memory does not grow with the number of samples; the only per-token state kept is the
previous forward's selection per layer and stream (for adjacent-step consistency).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moedit.analysis.routing import metrics as rm

CALIBRATION_BINS = 10


def _numpy(value) -> np.ndarray | None:
    """Tensors (any device) or arrays -> numpy on CPU."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
        return value.numpy()
    return np.asarray(value)


def noise_bin_index(noise_level: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each noise level in [edges[b], edges[b+1]); values outside go to the end bins."""
    bins = len(edges) - 1
    return np.clip(np.searchsorted(edges, noise_level, side="right") - 1, 0, bins - 1)


@dataclass
class _Layer:
    """Counters of one MoE layer; every field is a sum over forwards."""

    block: int
    router: str
    num_experts: int
    num_bins: int
    tokens: int = 0
    forwards: int = 0
    dropped: float = 0.0
    entropy_sum: float = 0.0
    entropy_count: int = 0
    load: np.ndarray = None  # (E,)
    by_noise: np.ndarray = None  # (bins, E) assignments
    tokens_by_noise: np.ndarray = None  # (bins,)
    by_class: np.ndarray = None  # (classes, E), grown on demand
    tokens_by_class: np.ndarray = None  # (classes,)
    experts_per_token: np.ndarray = None  # (E + 1,) histogram of #experts a token received
    confusion: np.ndarray = None  # (4,) tp fp fn tn against the training top-K selection
    calib: np.ndarray = None  # (3, CALIBRATION_BINS) prob sum, target sum, count
    capacity_by_level: dict = field(default_factory=dict)  # noise level -> [sum, forwards]
    next_inter: np.ndarray = None  # (E, E_next) |A_e n B_f| with the next MoE layer
    next_sizes: np.ndarray = None  # (2, E) sizes |A_e| (this) and |B_f| (next; E_next == E)
    active_inter_union: np.ndarray = None  # (2,) tokens with >= 1 expert here and next
    step_pairs: dict = field(default_factory=dict)  # step -> [inter (E,), union (E,), noise, n]
    similarity_load: np.ndarray = None  # (SIMILARITY_CELLS, E) assignments per REPA-similarity cell
    similarity_sum: np.ndarray = None  # (E,) sum of the similarity over each expert's assignments
    similarity_moments: np.ndarray = None  # (6,) rm.MOMENTS over tokens: s and experts per token k

    def __post_init__(self):
        experts = self.num_experts
        self.load = np.zeros(experts)
        self.by_noise = np.zeros((self.num_bins, experts))
        self.tokens_by_noise = np.zeros(self.num_bins)
        self.by_class = np.zeros((0, experts))
        self.tokens_by_class = np.zeros(0)
        self.experts_per_token = np.zeros(experts + 1)
        self.confusion = np.zeros(4)
        self.calib = np.zeros((3, CALIBRATION_BINS))
        self.next_inter = np.zeros((experts, experts))
        self.next_sizes = np.zeros((2, experts))
        self.active_inter_union = np.zeros(2)
        self.similarity_load = np.zeros((rm.SIMILARITY_CELLS, experts))
        self.similarity_sum = np.zeros(experts)
        self.similarity_moments = np.zeros(len(rm.MOMENTS))


class RoutingAccumulator:
    """Aggregates capture records forward by forward.

    `top_k` (token choice) or `capacity` (capacity routers) sets the ideal load tokens*k/E;
    `predictor_threshold` turns predictor probabilities into decisions for precision/recall;
    `similarity_bins` is the number of quantile bins of the REPA similarity (when it is given).
    """

    def __init__(self, noise_bin_edges, top_k: int | None = None, capacity: float | None = None,
                 predictor_threshold: float = 0.5, train_capacity: float = 1.0, similarity_bins: int = 5):
        self.edges = np.asarray(noise_bin_edges, dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size < 2 or np.any(np.diff(self.edges) <= 0):
            raise ValueError(f"noise_bin_edges must be increasing with >= 2 entries, "
                             f"got {list(self.edges)}")
        self.top_k, self.capacity = top_k, capacity
        self.predictor_threshold = predictor_threshold
        self.train_capacity = train_capacity
        if similarity_bins < 1:
            raise ValueError(f"--repa-bins = {similarity_bins}: need at least 1 similarity bin")
        self.similarity_bins = similarity_bins
        self.similarity_tokens: np.ndarray | None = None  # (SIMILARITY_CELLS,) tokens; None: no REPA
        self.layers: dict[int, _Layer] = {}
        self.forwards = 0
        # block -> (stream, step, selected): only the latest stream is kept, so this state is
        # one forward's masks however many trajectories run
        self._prev: dict[int, tuple[int, int, np.ndarray]] = {}

    def _layer(self, record: dict) -> _Layer:
        block = int(record["block"])
        layer = self.layers.get(block)
        if layer is None:
            layer = _Layer(block, str(record.get("router", "?")), int(record["num_experts"]),
                           self.edges.size - 1)
            self.layers[block] = layer
        elif layer.num_experts != int(record["num_experts"]):
            raise ValueError(f"block {block}: num_experts changed from {layer.num_experts} "
                             f"to {record['num_experts']}")
        return layer

    def update(self, records: list[dict], capacities: dict | None = None,
               step: int | None = None, stream: int = 0, similarity=None):
        """Add one model forward: `records` holds one capture dict per MoE layer, in order.

        `step`/`stream` identify a sampling step of one batch (trajectory mode) so that
        consecutive steps of the same stream are compared; `capacities` is last_capacity();
        `similarity` (S,): each token's REPA similarity, in the records' token order.
        """
        if not records:
            return
        self.forwards += 1
        cells = None
        if similarity is not None:
            similarity = _numpy(similarity).astype(np.float64).reshape(-1)  # (S,)
            cells = rm.similarity_cell(similarity)
            if self.similarity_tokens is None:
                self.similarity_tokens = np.zeros(rm.SIMILARITY_CELLS)
            self.similarity_tokens += np.bincount(cells, minlength=rm.SIMILARITY_CELLS)
        previous = None  # (layer, selected) of the previous MoE layer in this forward
        for record in records:
            layer = self._layer(record)
            selected = _numpy(record["selected"]).astype(bool)  # (S, E)
            if selected.ndim != 2 or selected.shape[1] != layer.num_experts:
                raise ValueError(f"block {layer.block}: selected has shape {selected.shape}, "
                                 f"expected (S, {layer.num_experts})")
            noise = _numpy(record["noise_level"]).astype(np.float64).reshape(-1)  # (S,)
            labels = _numpy(record["labels"]).astype(np.int64).reshape(-1)  # (S,)
            self._count(layer, selected, noise, labels, _numpy(record.get("scores")))
            if cells is not None:
                if similarity.shape[0] != selected.shape[0]:
                    raise ValueError(f"block {layer.block}: {similarity.shape[0]} REPA similarities for "
                                     f"{selected.shape[0]} routed tokens")
                self._similarity(layer, selected, similarity, cells)
            if record.get("predictor_prob") is not None and record.get("scores") is not None:
                self._predictor(layer, _numpy(record["predictor_prob"]),
                                _numpy(record["scores"]))
            if capacities and layer.block in capacities:
                key = round(float(noise.mean()), 4)
                entry = layer.capacity_by_level.setdefault(key, [0.0, 0])
                entry[0] += float(capacities[layer.block])
                entry[1] += 1
            if previous is not None and previous[1].shape[0] == selected.shape[0]:
                self._between_layers(previous[0], previous[1], selected)
            if step is not None:
                self._between_steps(layer, selected, noise, step, stream)
            previous = (layer, selected)

    def _count(self, layer: _Layer, selected, noise, labels, scores):
        tokens, experts = selected.shape
        layer.tokens += tokens
        layer.forwards += 1
        layer.load += selected.sum(axis=0)
        per_token = selected.sum(axis=1)  # (S,) experts each token received
        layer.experts_per_token += np.bincount(per_token, minlength=experts + 1)
        if self.top_k is not None:
            layer.dropped += float(tokens * self.top_k - per_token.sum())
        bins = noise_bin_index(noise, self.edges)  # (S,)
        rows, cols = np.nonzero(selected)
        layer.by_noise += np.bincount(bins[rows] * experts + cols,
                                      minlength=layer.num_bins * experts).reshape(-1, experts)
        layer.tokens_by_noise += np.bincount(bins, minlength=layer.num_bins)
        if labels.size == tokens and labels.min(initial=0) >= 0:
            classes = int(labels.max(initial=-1)) + 1
            if classes > layer.by_class.shape[0]:
                grow = classes - layer.by_class.shape[0]
                layer.by_class = np.vstack([layer.by_class, np.zeros((grow, experts))])
                layer.tokens_by_class = np.concatenate([layer.tokens_by_class, np.zeros(grow)])
            size = layer.by_class.shape[0]
            layer.by_class += np.bincount(labels[rows] * experts + cols,
                                          minlength=size * experts).reshape(-1, experts)
            layer.tokens_by_class += np.bincount(labels, minlength=size)
        if scores is not None and experts > 1:
            probs = np.clip(scores.astype(np.float64), 0, None)
            probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-30)
            layer.entropy_sum += float(rm.entropy_nats(probs).sum())
            layer.entropy_count += tokens

    @staticmethod
    def _similarity(layer: _Layer, selected, similarity, cells):
        experts = layer.num_experts
        rows, cols = np.nonzero(selected)
        layer.similarity_load += np.bincount(cells[rows] * experts + cols,
                                             minlength=rm.SIMILARITY_CELLS * experts).reshape(-1, experts)
        layer.similarity_sum += np.bincount(cols, weights=similarity[rows], minlength=experts)
        k = selected.sum(axis=1).astype(np.float64)  # (S,) experts per token
        layer.similarity_moments += [k.size, similarity.sum(), (similarity ** 2).sum(), k.sum(),
                                     (k ** 2).sum(), (similarity * k).sum()]

    def _predictor(self, layer: _Layer, prob, scores):
        """Score the predictor against the selection training would make: each expert's
        top-K tokens by router score, K = int(S / E * train_capacity)."""
        tokens, experts = scores.shape
        k = int(tokens / experts * self.train_capacity)
        target = np.zeros_like(scores, dtype=bool)
        if k > 0:
            top = np.argpartition(-scores, k - 1, axis=0)[:k]  # (K, E)
            target[top, np.arange(experts)] = True
        decision = prob > self.predictor_threshold
        layer.confusion += [np.sum(decision & target), np.sum(decision & ~target),
                            np.sum(~decision & target), np.sum(~decision & ~target)]
        index = np.clip((prob * CALIBRATION_BINS).astype(np.int64), 0, CALIBRATION_BINS - 1)
        layer.calib[0] += np.bincount(index.ravel(), weights=prob.ravel(),
                                      minlength=CALIBRATION_BINS)
        layer.calib[1] += np.bincount(index.ravel(), weights=target.ravel().astype(np.float64),
                                      minlength=CALIBRATION_BINS)
        layer.calib[2] += np.bincount(index.ravel(), minlength=CALIBRATION_BINS)

    def _between_layers(self, layer: _Layer, this, following):
        if following.shape[1] != layer.num_experts:
            return  # expert counts differ between layers: the E x E table does not apply
        a, b = this.astype(np.float64), following.astype(np.float64)
        layer.next_inter += a.T @ b  # (E, E): tokens selected by expert e here and f next
        layer.next_sizes += [a.sum(axis=0), b.sum(axis=0)]
        active_a, active_b = this.any(axis=1), following.any(axis=1)
        layer.active_inter_union += [np.sum(active_a & active_b), np.sum(active_a | active_b)]

    def _between_steps(self, layer: _Layer, selected, noise, step: int, stream: int):
        prev = self._prev.get(layer.block)
        if (prev is not None and prev[0] == stream and prev[1] == step - 1
                and prev[2].shape == selected.shape):
            entry = layer.step_pairs.setdefault(step - 1, [np.zeros(layer.num_experts),
                                                           np.zeros(layer.num_experts), 0.0, 0])
            entry[0] += np.logical_and(prev[2], selected).sum(axis=0)
            entry[1] += np.logical_or(prev[2], selected).sum(axis=0)
            entry[2] += float(noise.mean())
            entry[3] += 1
        self._prev[layer.block] = (stream, step, selected)

    def result(self) -> dict:
        """Per-layer metrics (same keys as the log metrics plus probe-only ones)."""
        blocks = sorted(self.layers)
        layers = [self._layer_result(self.layers[b], self.layers.get(n))
                  for b, n in zip(blocks, blocks[1:] + [None])]
        out = {"noise_bin_edges": self.edges.tolist(), "forwards": self.forwards,
               "samples": None, "layers": layers,
               "summary": rm.summarise_layers(layers)}
        if self.similarity_tokens is not None:
            out["repa"] = self.similarity_result()
        return out

    def similarity_result(self) -> dict:
        """The REPA-similarity section (docs/routing_analysis.md): bins shared by every layer (the
        similarity is one number per token), then each layer's rm.similarity_metrics."""
        tokens = self.similarity_tokens
        boundaries = rm.quantile_bin_cells(tokens, self.similarity_bins)
        layers = []
        for block in sorted(self.layers):
            layer = self.layers[block]
            metrics = rm.similarity_metrics(layer.similarity_load, tokens, layer.similarity_sum,
                                            layer.similarity_moments, boundaries)
            layers.append({"block": block, "router": layer.router, "num_experts": layer.num_experts, **metrics})
        moments = dict(zip(rm.MOMENTS, next(iter(self.layers.values())).similarity_moments)) if self.layers else {}
        return {"bins": len(boundaries) - 1 if boundaries else 0, "requested_bins": self.similarity_bins,
                "cell_width": 2.0 / rm.SIMILARITY_CELLS,
                "similarity_edges": [rm.cell_edge(c) for c in boundaries],
                "tokens_by_bin": [float(tokens[a:b].sum()) for a, b in zip(boundaries, boundaries[1:])],
                "tokens": float(tokens.sum()),
                "mean_similarity": rm._ratio(moments.get("sum_s", 0.0), moments.get("n", 0.0)),
                "layers": layers}

    def snapshot_layer(self, layer: _Layer) -> dict:
        """The layer's counters in snapshot_routing_stats form (for rm.layer_metrics)."""
        tp, fp, fn, tn = layer.confusion
        out = {"block": layer.block, "router": layer.router, "num_experts": layer.num_experts,
               "tokens": layer.tokens, "tokens_per_expert": layer.load,
               "tokens_per_expert_by_noise": layer.by_noise,
               "tokens_per_expert_by_class": layer.by_class if layer.by_class.size else None,
               "dropped": layer.dropped, "entropy_sum": layer.entropy_sum,
               "entropy_count": layer.entropy_count, "predictor_tp": tp, "predictor_fp": fp,
               "predictor_fn": fn, "predictor_tn": tn, "forwards": layer.forwards,
               "capacity_used_sum": sum(v[0] for v in layer.capacity_by_level.values()),
               "aux": {}}
        if self.top_k is not None:
            out["top_k"] = self.top_k
        elif self.capacity is not None:
            out["capacity"] = self.capacity
        return out

    def _layer_result(self, layer: _Layer, following: _Layer | None) -> dict:
        out = rm.layer_metrics(self.snapshot_layer(layer))
        if not layer.capacity_by_level:
            out["capacity_used"] = None
        out["tokens_per_expert_by_noise"] = layer.by_noise.tolist()
        out["tokens_per_expert_by_class"] = layer.by_class.tolist() if layer.by_class.size else None
        with np.errstate(invalid="ignore", divide="ignore"):
            by_bin = layer.by_noise.sum(axis=1) / layer.tokens_by_noise
            by_class = layer.by_class.sum(axis=1) / layer.tokens_by_class
        out["capacity_by_noise_bin"] = [rm._finite_or_none(v) for v in by_bin]
        out["capacity_by_class"] = [rm._finite_or_none(v) for v in by_class]
        levels = sorted(layer.capacity_by_level)
        out["capacity_by_noise_level"] = {
            "noise_level": levels,
            "capacity": [layer.capacity_by_level[v][0] / layer.capacity_by_level[v][1]
                         for v in levels]}
        out["experts_per_token_hist"] = layer.experts_per_token.astype(np.int64).tolist()
        out["calibration"] = (rm.calibration(*layer.calib) if layer.calib[2].sum() else None)
        out["next_layer"] = self._next_layer_consistency(layer, following)
        out["adjacent_steps"] = _step_consistency(layer)
        return out

    @staticmethod
    def _next_layer_consistency(layer: _Layer, following: _Layer | None) -> dict | None:
        sizes_a, sizes_b = layer.next_sizes
        if following is None or layer.next_sizes.sum() == 0:
            return None
        union = sizes_a[:, None] + sizes_b[None, :] - layer.next_inter  # (E, E)
        with np.errstate(invalid="ignore", divide="ignore"):
            jac = np.where(union > 0, layer.next_inter / union, np.nan)
        inter, active_union = layer.active_inter_union
        return {"next_block": following.block,
                # expert e here vs expert e in the next layer (indices are arbitrary between
                # layers, so the best-matching expert is the more meaningful number)
                "jaccard_same_index": rm._finite_or_none(np.nanmean(np.diag(jac))),
                "jaccard_best_match": rm._finite_or_none(np.nanmean(np.nanmax(jac, axis=1))),
                "jaccard_active_tokens": rm._ratio(inter, active_union)}


def _step_consistency(layer: _Layer) -> dict | None:
    """Pooled Jaccard of each expert's token set between sampling steps i and i+1."""
    if not layer.step_pairs:
        return None
    steps = sorted(layer.step_pairs)
    jaccard, noise = [], []
    for step in steps:
        inter, union, noise_sum, count = layer.step_pairs[step]
        valid = union > 0
        jaccard.append(float((inter[valid] / union[valid]).mean()) if valid.any() else None)
        noise.append(noise_sum / count)
    values = [v for v in jaccard if v is not None]
    return {"step": steps, "noise_level": noise, "jaccard": jaccard,
            "mean": float(np.mean(values)) if values else None}


def uniform_edges(num_bins: int) -> list[float]:
    """`num_bins` equal noise-level bins over [0, 1]."""
    if num_bins < 1:
        raise ValueError(f"--noise-bins = {num_bins}: need at least 1 bin")
    return np.linspace(0.0, 1.0, num_bins + 1).tolist()

