"""Expert-routing metrics: pure functions on counts (numpy), no torch, no I/O.

Definitions follow docs/routing_analysis.md ("Metrics"):
- load c_e: tokens processed by expert e; ideal load = tokens * k / E, with k = top_k for
  token choice and the configured capacity for capacity routers (DiffMoE, expert choice);
  utilisation u_e = c_e / ideal.
- CV = std / mean of c_e, reported both with the population std (ddof=0, the experts are the
  whole population: the headline number) and the sample std (ddof=1).
- max/mean = max_e c_e / mean_e c_e; MaxVio = max_e u_e - 1; dead fraction = #{c_e == 0} / E.
- Router entropy: mean over tokens of H(scores) / log E (1 = uniform scores, 0 = one-hot).
- Mutual information between expert choice and a variable (noise bin, class) is the plug-in
  estimate from the (variable x expert) assignment counts, in nats.
- REPA similarity (probe of a REPA run): each token's cosine similarity s between its projected
  hidden state and its encoder feature is counted on SIMILARITY_CELLS cells over [-1, 1]; quantile
  bins of s are unions of cells (`quantile_bin_cells`), and `similarity_metrics` gives per layer the
  (bin x expert) load, each expert's mean s, Pearson r(s, experts per token) and MI(expert; s bin).
A metric that is undefined (no tokens, E = 1, empty table) is None, never NaN, so that the
JSON report stays valid.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# Per-layer count keys of snapshot_routing_stats that are summed over intervals / ranks.
SUMMED_SCALARS = (
    "tokens", "dropped", "entropy_sum", "entropy_count", "predictor_tp", "predictor_fp",
    "predictor_fn", "predictor_tn", "capacity_used_sum", "forwards",
)
SUMMED_ARRAYS = ("tokens_per_expert", "tokens_per_expert_by_noise", "tokens_per_expert_by_class")


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def load_balance(loads: Sequence[float], ideal: float | None = None) -> dict:
    """Balance metrics of one layer's per-expert loads c_e (E,).

    `ideal` is the load of a perfectly balanced router (tokens * k / E); when None the mean
    load is used, which makes MaxVio = max/mean - 1.
    """
    loads = np.asarray(loads, dtype=np.float64)
    num_experts = loads.size
    if num_experts == 0:
        raise ValueError("load_balance: empty load vector (a layer with 0 experts?)")
    total = loads.sum()
    mean = loads.mean()
    ideal = mean if ideal is None else float(ideal)
    out = {
        "cv_population": _ratio(loads.std(ddof=0), mean),
        "cv_sample": _ratio(loads.std(ddof=1), mean) if num_experts > 1 else None,
        "max_over_mean": _ratio(loads.max(), mean),
        "max_violation": float(loads.max() / ideal - 1.0) if ideal > 0 else None,
        "dead_fraction": float((loads == 0).sum()) / num_experts,
        "utilisation": (loads / ideal).tolist() if ideal > 0 else None,
        "load_entropy_norm": None,
    }
    if total > 0 and num_experts > 1:
        share = loads / total
        out["load_entropy_norm"] = float(entropy_nats(share) / math.log(num_experts))
    return out


def entropy_nats(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along `axis`; 0 log 0 = 0."""
    probs = np.asarray(probs, dtype=np.float64)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logs).sum(axis=axis)


def normalised_entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy / log(E) of probability vectors along `axis` (E = size of that axis)."""
    num = np.asarray(probs).shape[axis]
    if num < 2:
        raise ValueError(f"normalised_entropy: need at least 2 experts, got {num}")
    return entropy_nats(probs, axis) / math.log(num)


def mutual_information(table: np.ndarray) -> float | None:
    """Plug-in mutual information I(X; Y) in nats from a contingency table of counts (X, Y).

    Rows are the conditioning variable (noise bin or class), columns the experts; every
    (token, expert) assignment is one joint sample. Deterministic bijection between B
    equiprobable rows and B columns gives log(B); independence gives 0.
    """
    table = np.asarray(table, dtype=np.float64)
    total = table.sum()
    if table.ndim != 2 or total <= 0:
        return None
    joint = table / total
    row = joint.sum(axis=1, keepdims=True)  # (X, 1)
    col = joint.sum(axis=0, keepdims=True)  # (1, Y)
    mask = joint > 0
    ratio = joint[mask] / (row @ col)[mask]
    return max(0.0, float((joint[mask] * np.log(ratio)).sum()))  # clip -1e-17 rounding


def normalised_mutual_information(table: np.ndarray) -> float | None:
    """MI / min(H(X), H(Y)) in [0, 1]; None when either marginal is constant."""
    table = np.asarray(table, dtype=np.float64)
    mi = mutual_information(table)
    if mi is None:
        return None
    total = table.sum()
    h_rows = float(entropy_nats(table.sum(axis=1) / total))
    h_cols = float(entropy_nats(table.sum(axis=0) / total))
    den = min(h_rows, h_cols)
    return mi / den if den > 1e-12 else None


def jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    """|A n B| / |A u B| of two boolean masks of the same shape; None when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"jaccard: shapes differ {a.shape} vs {b.shape}")
    return _ratio(np.logical_and(a, b).sum(), np.logical_or(a, b).sum())


def drop_rate(dropped: float, tokens: float, top_k: int) -> float | None:
    """Dropped (token, expert) assignments / (tokens * k) for token choice."""
    return _ratio(dropped, tokens * top_k)


def drop_rate_from_loads(loads: Sequence[float], tokens: int, top_k: int,
                         capacity_factor: float) -> float:
    """Drop rate of ONE forward from its pre-capacity loads: sum_e max(0, c_e - cap) / (T k),
    cap = ceil(T k / E * capacity_factor). Not valid on loads summed over many forwards."""
    loads = np.asarray(loads, dtype=np.float64)
    cap = math.ceil(tokens * top_k / loads.size * capacity_factor)
    return float(np.maximum(loads - cap, 0.0).sum() / (tokens * top_k))


def predictor_scores(tp: float, fp: float, fn: float, tn: float) -> dict:
    """Precision, recall, F1 and accuracy of the capacity predictor's binary decisions."""
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": _ratio(tp + tn, tp + fp + fn + tn)}


def calibration(prob_sum: Sequence[float], target_sum: Sequence[float],
                count: Sequence[float]) -> dict:
    """Reliability table and expected calibration error from per-bin sums.

    Bin b holds the predictions with probability in [b/n, (b+1)/n): mean predicted probability
    prob_sum/count against the observed frequency target_sum/count. ECE is the count-weighted
    mean absolute gap.
    """
    prob_sum, target_sum, count = (np.asarray(v, dtype=np.float64)
                                   for v in (prob_sum, target_sum, count))
    total = count.sum()
    filled = count > 0
    mean_prob = np.where(filled, prob_sum / np.maximum(count, 1), np.nan)
    freq = np.where(filled, target_sum / np.maximum(count, 1), np.nan)
    ece = None
    if total > 0:
        ece = float((count[filled] * np.abs(mean_prob[filled] - freq[filled])).sum() / total)
    return {"bin_edges": np.linspace(0, 1, count.size + 1).tolist(),
            "mean_prob": [_finite_or_none(v) for v in mean_prob],
            "frequency": [_finite_or_none(v) for v in freq],
            "count": count.astype(np.int64).tolist(), "ece": ece}


def ideal_load(layer: dict) -> float | None:
    """tokens * k / E, with k = top_k or the configured capacity; None when unknown."""
    k = layer.get("top_k", layer.get("capacity"))
    if k is None:
        return None
    return float(layer["tokens"]) * float(k) / int(layer["num_experts"])


def layer_metrics(layer: dict) -> dict:
    """All metrics of one layer from a snapshot_routing_stats layer dict (summed counts)."""
    num_experts = int(layer["num_experts"])
    loads = np.asarray(layer["tokens_per_expert"], dtype=np.float64)
    if loads.shape != (num_experts,):
        raise ValueError(f"block {layer.get('block')}: tokens_per_expert has shape "
                         f"{loads.shape}, expected ({num_experts},)")
    out = {key: layer.get(key) for key in ("block", "router", "num_experts", "top_k",
                                           "capacity", "tokens")}
    out["load"] = loads.tolist()
    out.update(load_balance(loads, ideal_load(layer)))
    entropy_count = layer.get("entropy_count") or 0
    out["router_entropy_norm"] = None
    if entropy_count and num_experts > 1:
        out["router_entropy_norm"] = layer["entropy_sum"] / entropy_count / math.log(num_experts)
    out["drop_rate"] = None
    if layer.get("top_k") is not None:
        out["drop_rate"] = drop_rate(layer.get("dropped") or 0, layer["tokens"], layer["top_k"])
    out["capacity_used"] = None  # token choice has top-k, not a capacity to report
    if layer.get("top_k") is None:
        out["capacity_used"] = _ratio(layer.get("capacity_used_sum") or 0,
                                      layer.get("forwards") or 0)
    counts = [layer.get(f"predictor_{name}") or 0 for name in ("tp", "fp", "fn", "tn")]
    out["predictor"] = predictor_scores(*counts) if sum(counts) > 0 else None
    for name, key in (("noise", "tokens_per_expert_by_noise"),
                      ("class", "tokens_per_expert_by_class"),
                      ("prompt", "tokens_per_expert_by_prompt")):
        table = layer.get(key)
        out[f"mi_{name}_nats"] = mutual_information(table) if table is not None else None
        out[f"mi_{name}_norm"] = (normalised_mutual_information(table)
                                  if table is not None else None)
    return out


def summarise_layers(layers: Iterable[dict]) -> dict:
    """Model-level summary: mean over layers (max for MaxVio, the worst layer matters)."""
    layers = list(layers)
    keys_mean = ("cv_population", "cv_sample", "max_over_mean", "dead_fraction",
                 "router_entropy_norm", "load_entropy_norm", "drop_rate", "capacity_used",
                 "mi_noise_nats", "mi_class_nats", "mi_prompt_nats")
    out = {}
    for key in keys_mean:
        values = [m[key] for m in layers if m.get(key) is not None]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
    vios = [m["max_violation"] for m in layers if m.get("max_violation") is not None]
    out["max_violation_max"] = float(max(vios)) if vios else None
    out["num_layers"] = len(layers)
    return out


def merge_snapshots(snapshots: Sequence[dict], source: str = "routing stats") -> dict:
    """Sum several snapshot_routing_stats dicts (intervals or ranks) into one.

    Layers must match (same blocks and expert counts) and so must the noise-bin edges.
    """
    if not snapshots:
        raise ValueError(f"{source}: no routing snapshots to merge")
    first = snapshots[0]
    merged = {"noise_bin_edges": list(first.get("noise_bin_edges") or []),
              "layers": [_copy_layer(layer) for layer in first["layers"]]}
    for index, snap in enumerate(snapshots[1:], start=1):
        if list(snap.get("noise_bin_edges") or []) != merged["noise_bin_edges"]:
            raise ValueError(f"{source}: entry {index} has different noise_bin_edges")
        if len(snap["layers"]) != len(merged["layers"]):
            raise ValueError(f"{source}: entry {index} has {len(snap['layers'])} MoE layers, "
                             f"entry 0 has {len(merged['layers'])}")
        for acc, layer in zip(merged["layers"], snap["layers"]):
            _add_layer(acc, layer, f"{source}: entry {index}")
    return merged


def _copy_layer(layer: dict) -> dict:
    out = dict(layer)
    for key in SUMMED_ARRAYS:
        if layer.get(key) is not None:
            out[key] = np.asarray(layer[key], dtype=np.float64)
    out["aux"] = dict(layer.get("aux") or {})
    return out


def _add_layer(acc: dict, layer: dict, where: str) -> None:
    if (acc["block"], acc["num_experts"]) != (layer["block"], layer["num_experts"]):
        raise ValueError(f"{where}: layer block {layer['block']} with {layer['num_experts']} "
                         f"experts does not match block {acc['block']} ({acc['num_experts']})")
    for key in SUMMED_SCALARS:
        if layer.get(key) is not None:
            acc[key] = (acc.get(key) or 0) + layer[key]
    for key in SUMMED_ARRAYS:
        if layer.get(key) is None or acc.get(key) is None:
            continue
        value = np.asarray(layer[key], dtype=np.float64)
        if value.shape != acc[key].shape:
            raise ValueError(f"{where}: block {layer['block']} {key} has shape {value.shape}, "
                             f"expected {acc[key].shape}")
        acc[key] = acc[key] + value
    for key, value in (layer.get("aux") or {}).items():
        acc["aux"][key] = acc["aux"].get(key, 0.0) + float(value)


# ----- REPA similarity (docs/routing_analysis.md, "REPA similarity") ----------------------------------
SIMILARITY_CELLS = 200
"""Cells of width 0.01 over [-1, 1] on which per-token REPA similarities are counted (fixed-size
counters); similarity bins are unions of whole cells, so their edges are multiples of 0.01."""
MOMENTS = ("n", "sum_s", "sum_ss", "sum_k", "sum_kk", "sum_sk")
"""Running sums over tokens of similarity s and experts per token k, for Pearson r(s, k)."""


def similarity_cell(similarity: np.ndarray) -> np.ndarray:
    """Cell index of each cosine similarity: floor((s + 1) / 2 * SIMILARITY_CELLS), s = 1 in the last."""
    cells = np.floor((np.asarray(similarity, dtype=np.float64) + 1.0) * (SIMILARITY_CELLS / 2))
    return np.clip(cells, 0, SIMILARITY_CELLS - 1).astype(np.int64)


def cell_edge(cell: int) -> float:
    """Similarity at the lower edge of `cell` (cell SIMILARITY_CELLS: 1.0)."""
    return round(-1.0 + 2.0 * cell / SIMILARITY_CELLS, 6)


def quantile_bin_cells(tokens_by_cell: Sequence[float], bins: int) -> list[int]:
    """Cell boundaries [c_0, ..., c_B] of up to `bins` quantile bins of similarity: c_0 is the lowest
    occupied cell, c_B one past the highest, and c_q (0 < q < bins) the first cell index with
    #{tokens in cells < c_q} >= q / bins of all tokens. Repeated boundaries merge, so tied
    similarities give fewer bins; every bin holds tokens. [] when there are none."""
    if bins < 1:
        raise ValueError(f"similarity bins = {bins}: need at least 1")
    tokens = np.asarray(tokens_by_cell, dtype=np.float64)
    occupied = np.nonzero(tokens)[0]
    if occupied.size == 0:
        return []
    cumulative = np.concatenate([[0.0], np.cumsum(tokens)])  # [c] = tokens in cells < c
    total = cumulative[-1]
    cuts = [int(np.searchsorted(cumulative, q * total / bins, side="left")) for q in range(1, bins)]
    low, high = int(occupied[0]), int(occupied[-1]) + 1
    return sorted({low, high, *(c for c in cuts if low < c < high)})


def pearson_from_moments(moments: Sequence[float]) -> float | None:
    """Pearson correlation of s and k from MOMENTS sums; None when either is constant."""
    n, sum_s, sum_ss, sum_k, sum_kk, sum_sk = (float(v) for v in moments)
    if n < 2:
        return None
    mean_s, mean_k = sum_s / n, sum_k / n
    var_s, var_k = sum_ss / n - mean_s ** 2, sum_kk / n - mean_k ** 2
    if var_s <= 1e-12 or var_k <= 1e-12 * max(1.0, mean_k ** 2):
        return None
    r = (sum_sk / n - mean_s * mean_k) / math.sqrt(var_s * var_k)
    return float(min(1.0, max(-1.0, r)))


def similarity_metrics(load_by_cell: np.ndarray, tokens_by_cell: Sequence[float],
                       similarity_sum: Sequence[float], moments: Sequence[float], boundaries: list[int]) -> dict:
    """One MoE layer against the REPA similarity s of its tokens.

    load_by_cell (cells, E): (token, expert) assignments per similarity cell; tokens_by_cell (cells,);
    similarity_sum (E,): sum of s over each expert's assignments; moments: MOMENTS over tokens;
    boundaries: quantile_bin_cells. Returns per bin b and expert e: load_by_bin[b][e] (sums over bins
    to the layer's load), share_by_bin (row-normalised, x E: 1 = the expert's fair share of the bin),
    experts_per_token_by_bin (assignments / tokens of the bin); mean_similarity_by_expert (sum of s
    over e's tokens / c_e); corr_similarity_experts = Pearson r(s, experts per token); mi_nats and
    mi_norm = MI(expert; s bin) from load_by_bin as `mutual_information`."""
    load_by_cell = np.asarray(load_by_cell, dtype=np.float64)
    tokens_by_cell = np.asarray(tokens_by_cell, dtype=np.float64)
    pairs = list(zip(boundaries, boundaries[1:]))
    load = np.array([load_by_cell[a:b].sum(axis=0) for a, b in pairs]).reshape(len(pairs), -1)  # (bins, E)
    tokens = np.array([tokens_by_cell[a:b].sum() for a, b in pairs])  # (bins,)
    experts = load_by_cell.shape[1]
    assigned = load.sum(axis=1)  # (bins,)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = load / assigned[:, None] * experts
        per_token = assigned / tokens
        mean_by_expert = np.asarray(similarity_sum, dtype=np.float64) / load_by_cell.sum(axis=0)
    return {"tokens": float(tokens_by_cell.sum()), "load_by_bin": load.tolist(), "tokens_by_bin": tokens.tolist(),
            "share_by_bin": [[_finite_or_none(v) for v in row] for row in share],
            "experts_per_token_by_bin": [_finite_or_none(v) for v in per_token],
            "mean_similarity_by_expert": [_finite_or_none(v) for v in mean_by_expert],
            "corr_similarity_experts": pearson_from_moments(moments),
            "mi_nats": mutual_information(load) if load.size else None,
            "mi_norm": normalised_mutual_information(load) if load.size else None}
