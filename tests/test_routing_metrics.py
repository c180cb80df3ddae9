"""Routing metrics against hand-computed values (docs/routing_analysis.md definitions)."""

import math

import numpy as np
import pytest

from moedit.analysis.routing import metrics as rm


@pytest.mark.parametrize("num_experts", [2, 8, 16])
def test_balanced_load_has_zero_cv_and_maxvio(num_experts):
    tokens, top_k = 64 * num_experts, 2
    loads = [tokens * top_k // num_experts] * num_experts
    out = rm.load_balance(loads, ideal=tokens * top_k / num_experts)
    assert out["cv_population"] == 0.0 and out["cv_sample"] == 0.0
    assert out["max_violation"] == 0.0 and out["max_over_mean"] == 1.0
    assert out["dead_fraction"] == 0.0
    assert out["load_entropy_norm"] == pytest.approx(1.0, abs=1e-12)
    assert out["utilisation"] == [1.0] * num_experts


@pytest.mark.parametrize("num_experts", [2, 4, 16])
def test_one_expert_takes_everything(num_experts):
    tokens = 1000
    loads = [tokens] + [0] * (num_experts - 1)
    out = rm.load_balance(loads, ideal=tokens / num_experts)  # top-1
    assert out["dead_fraction"] == pytest.approx((num_experts - 1) / num_experts)
    # mean N/E; population std (N/E) sqrt(E-1); sample std is sqrt(E/(E-1)) larger
    assert out["cv_population"] == pytest.approx(math.sqrt(num_experts - 1))
    assert out["cv_sample"] == pytest.approx(math.sqrt(num_experts))
    assert out["max_violation"] == pytest.approx(num_experts - 1)
    assert out["max_over_mean"] == pytest.approx(num_experts)
    assert out["load_entropy_norm"] == 0.0


def test_hand_computed_load_metrics():
    # loads 1, 2, 3, 6: mean 3, population var 14/4, sample var 14/3; 6 tokens, top-2, 4 experts
    out = rm.load_balance([1, 2, 3, 6], ideal=6 * 2 / 4)
    assert out["cv_population"] == pytest.approx(math.sqrt(3.5) / 3)
    assert out["cv_sample"] == pytest.approx(math.sqrt(14 / 3) / 3)
    assert out["max_over_mean"] == pytest.approx(2.0)
    assert out["max_violation"] == pytest.approx(1.0)
    assert out["utilisation"] == pytest.approx([1 / 3, 2 / 3, 1.0, 2.0])


def test_mutual_information_closed_forms():
    bins = 5
    # deterministic bijection bin -> expert with equiprobable bins: MI = log(bins)
    table = np.eye(bins) * 40
    assert rm.mutual_information(table) == pytest.approx(math.log(bins))
    assert rm.normalised_mutual_information(table) == pytest.approx(1.0)
    # deterministic but non-uniform bins: MI = H(bins)
    weights = np.array([1, 2, 3, 4, 10])
    p = weights / weights.sum()
    assert rm.mutual_information(np.diag(weights)) == pytest.approx(-(p * np.log(p)).sum())
    # independent: the table is an outer product of its marginals
    independent = np.outer([10, 20, 30], [1, 3, 2, 2])
    assert rm.mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    # hand case: 2x2 [[2, 0], [1, 1]] (nats)
    joint = np.array([[0.5, 0.0], [0.25, 0.25]])
    expected = sum(joint[i, j] * math.log(joint[i, j] / (joint[i].sum() * joint[:, j].sum()))
                   for i in range(2) for j in range(2) if joint[i, j] > 0)
    assert rm.mutual_information([[2, 0], [1, 1]]) == pytest.approx(expected)
    assert rm.mutual_information(np.zeros((3, 3))) is None


def test_entropy_normalisation():
    assert rm.normalised_entropy(np.full(8, 1 / 8)) == pytest.approx(1.0)
    assert rm.normalised_entropy(np.eye(4)[0]) == 0.0
    assert rm.normalised_entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx(math.log(2) / math.log(4))
    with pytest.raises(ValueError, match="at least 2 experts"):
        rm.normalised_entropy([1.0])


def test_drop_rate_and_predictor_scores():
    # T = 4 tokens, top-2, E = 4: cap = ceil(8 / 4) = 2; loads 5,1,1,1 overflow by 3 of 8
    assert rm.drop_rate_from_loads([5, 1, 1, 1], tokens=4, top_k=2, capacity_factor=1.0) == 3 / 8
    assert rm.drop_rate_from_loads([5, 1, 1, 1], tokens=4, top_k=2, capacity_factor=2.0) == 1 / 8
    assert rm.drop_rate(30, tokens=100, top_k=2) == 0.15
    scores = rm.predictor_scores(tp=3, fp=1, fn=2, tn=4)
    assert scores["precision"] == 0.75 and scores["recall"] == 0.6
    assert scores["accuracy"] == 0.7 and scores["f1"] == pytest.approx(2 / 3)
    assert rm.predictor_scores(0, 0, 0, 5)["precision"] is None


def test_calibration_and_jaccard():
    # bin 2 predicts 0.25 and sees 1 of 4 positive (calibrated); bin 8 predicts 0.8, sees 0.5
    prob_sum = np.zeros(10)
    target_sum = np.zeros(10)
    count = np.zeros(10)
    prob_sum[2], target_sum[2], count[2] = 1.0, 1.0, 4
    prob_sum[8], target_sum[8], count[8] = 3.2, 2.0, 4
    cal = rm.calibration(prob_sum, target_sum, count)
    assert cal["ece"] == pytest.approx(0.5 * 0.0 + 0.5 * 0.3)
    assert cal["mean_prob"][2] == 0.25 and cal["frequency"][8] == 0.5 and cal["mean_prob"][0] is None
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 1, 0, 1], bool)
    assert rm.jaccard(a, b) == 2 / 4
    assert rm.jaccard(np.zeros(3, bool), np.zeros(3, bool)) is None


def _layer(block, loads, **extra):
    layer = {"block": block, "router": "token_choice", "num_experts": len(loads), "top_k": 1,
             "tokens": int(sum(loads)), "tokens_per_expert": loads, "dropped": 0,
             "entropy_sum": 0.0, "entropy_count": 0, "forwards": 1, "aux": {"balance": 1.0}}
    layer.update(extra)
    return layer


def test_layer_metrics_from_snapshot():
    by_noise = [[10, 0], [0, 10]]  # expert = noise bin: MI log 2
    layer = _layer(3, [10, 10], tokens_per_expert_by_noise=by_noise, dropped=5,
                   entropy_sum=20 * math.log(2) * 0.5, entropy_count=20,
                   tokens_per_expert_by_class=[[5, 5], [5, 5]])
    layer["tokens"] = 25  # 5 of 25 assignments dropped, 20 kept
    out = rm.layer_metrics(layer)
    assert out["drop_rate"] == pytest.approx(5 / 25)
    assert out["router_entropy_norm"] == pytest.approx(0.5)
    assert out["mi_noise_nats"] == pytest.approx(math.log(2))
    assert out["mi_class_nats"] == pytest.approx(0.0, abs=1e-12)
    assert out["capacity_used"] is None  # token choice reports drops, not capacity
    assert out["max_violation"] == pytest.approx(10 / 12.5 - 1)


def test_merge_snapshots_sums_and_checks_layout():
    first = {"noise_bin_edges": [0, 1], "layers": [_layer(1, [1, 2]), _layer(3, [4, 0])]}
    second = {"noise_bin_edges": [0, 1], "layers": [_layer(1, [3, 0]), _layer(3, [1, 1])]}
    merged = rm.merge_snapshots([first, second])
    assert merged["layers"][0]["tokens_per_expert"].tolist() == [4, 2]
    assert merged["layers"][1]["tokens"] == 6
    assert merged["layers"][0]["aux"]["balance"] == 2.0
    assert merged["layers"][1]["forwards"] == 2
    other = {"noise_bin_edges": [0, 1], "layers": [_layer(1, [1, 2, 3])]}
    with pytest.raises(ValueError, match="MoE layers"):
        rm.merge_snapshots([first, other])
    with pytest.raises(ValueError, match="noise_bin_edges"):
        rm.merge_snapshots([first, {**second, "noise_bin_edges": [0, 0.5, 1]}])


def test_summary_takes_worst_layer_maxvio():
    layers = [rm.layer_metrics(_layer(1, [10, 10])), rm.layer_metrics(_layer(3, [20, 0]))]
    summary = rm.summarise_layers(layers)
    assert summary["max_violation_max"] == pytest.approx(1.0)
    assert summary["dead_fraction_mean"] == pytest.approx(0.25)
    assert summary["cv_population_mean"] == pytest.approx(0.5)
