"""MoE layers against naive per-token / per-expert loop references (float64), and router mechanics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moedit.models import ModelConfig, MoEConfig
from moedit.models.kernels import KernelOptions, set_kernel_options
from moedit.models.moe import MoELayer, RoutingContext
from moedit.models.stats import layer_snapshot

B, T, D = 2, 16, 8


def make_layer(seed: int = 0, ffn_type: str = "gelu", dtype=torch.float64, **moe_kw) -> MoELayer:
    torch.manual_seed(seed)
    moe = MoEConfig(**{"num_experts": 4, "first": 0, "every": 1, **moe_kw})
    cfg = ModelConfig(input_size=8, patch_size=2, hidden_size=D, depth=1, num_heads=2, num_classes=3,
                      mlp_ratio=2.0, ffn_type=ffn_type, moe=moe)
    layer = MoELayer(cfg, 0, num_noise_bins=4).to(dtype)
    # spread the gate so routing is far from ties and depends on the input
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    if layer.experts.ffn_type == "gelu":
        torch.nn.init.normal_(layer.experts.fc1_bias, std=0.1)
        torch.nn.init.normal_(layer.experts.fc2_bias, std=0.1)
    return layer


def ctx(batch: int = B) -> RoutingContext:
    level = torch.linspace(0.1, 0.9, batch)
    return RoutingContext(batch, level, (level * 4).long().clamp(max=3), torch.arange(batch) % 3)


def expert_ref(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    if ex.ffn_type == "gelu":
        h = F.gelu(x @ ex.fc1_weight[e].T + ex.fc1_bias[e], approximate="tanh")
        return h @ ex.fc2_weight[e].T + ex.fc2_bias[e]
    h = F.silu(x @ ex.gate_proj_weight[e].T) * (x @ ex.up_proj_weight[e].T)
    return h @ ex.down_proj_weight[e].T


def ref_expert_choice(layer: MoELayer, pool: torch.Tensor, K: int, groups: list[range]) -> torch.Tensor:
    """Each expert takes, within each group of pool rows, its K highest-scoring tokens."""
    probs = torch.softmax(pool @ layer.router.gate.weight.T, dim=-1)
    out = torch.zeros_like(pool)
    for e in range(layer.num_experts):
        for group in groups:
            ranked = sorted(group, key=lambda s: -float(probs[s, e].detach()))[:K]
            for s in ranked:
                out[s] = out[s] + probs[s, e] * expert_ref(layer, e, pool[s])
    return out


def ref_token_choice(layer: MoELayer, pool: torch.Tensor):
    cfg = layer.router.cfg
    logits = pool @ layer.router.gate.weight.T
    scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    E, S, k = layer.num_experts, pool.shape[0], cfg.top_k
    cap = math.ceil(S * k / E * cfg.capacity_factor) if cfg.capacity_factor else S * k
    load, dropped = [0] * E, 0
    out = torch.zeros_like(pool)
    for s in range(S):
        select = scores[s] + (layer.router.expert_bias if cfg.aux_free_bias else 0)
        chosen = sorted(range(E), key=lambda e: -float(select[e].detach()))[:k]
        weights = [scores[s, e] for e in chosen]
        total = sum(weights)
        for e, w in zip(chosen, weights):
            if load[e] >= cap:
                dropped += 1
                continue
            load[e] += 1
            out[s] = out[s] + (w / total if cfg.renormalize else w) * expert_ref(layer, e, pool[s])
    return out, dropped, load


def check_against_reference(layer: MoELayer, reference) -> None:
    """Outputs and gradients (input and every parameter) of layer and reference agree to 1e-5."""
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(B, T, D, dtype=torch.float64)
    out = layer(x, ctx())
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * probe).sum(), [x, *params], allow_unused=True)
    ref = reference(layer, x.reshape(B * T, D)).reshape(B, T, D)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *params], allow_unused=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 0.1
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn_type", ["gelu", "swiglu"])
def test_diffmoe_training_matches_naive_pool_expert_choice(ffn_type):
    layer = make_layer(ffn_type=ffn_type, router="diffmoe", capacity=1.0).train()
    K = int(B * T / 4 * 1.0)
    check_against_reference(layer, lambda l, pool: ref_expert_choice(l, pool, K, [range(B * T)]))


def test_expert_choice_per_sample_matches_naive():
    layer = make_layer(router="expert_choice", capacity=1.5).train()
    K = int(T / 4 * 1.5)
    groups = [range(b * T, (b + 1) * T) for b in range(B)]
    check_against_reference(layer, lambda l, pool: ref_expert_choice(l, pool, K, groups))


@pytest.mark.parametrize("kw", [
    dict(top_k=2, score_func="softmax"),
    dict(top_k=2, score_func="sigmoid", renormalize=True),
    dict(top_k=1, score_func="softmax", capacity_factor=0.5),
    dict(top_k=3, score_func="softmax", num_shared_experts=1, shared_expert_ratio=0.5, ffn_type="swiglu"),
])
def test_token_choice_matches_naive(kw):
    layer = make_layer(router="token_choice", **kw).train()
    shared = layer.shared_experts

    def reference(l, pool):
        out = ref_token_choice(l, pool)[0]
        return out + shared(pool) if shared is not None else out

    check_against_reference(layer, reference)


@pytest.mark.parametrize("ffn_type", ["gelu", "swiglu"])
def test_grouped_mm_and_padded_paths_agree(ffn_type):
    """The aligned torch._grouped_mm path (CUDA bf16 in training) equals the padded bmm path,
    also with an expert that gets no tokens."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    layer = make_layer(router="token_choice", top_k=2, ffn_type=ffn_type, dtype=torch.float32).train()
    with torch.no_grad():
        layer.router.gate.weight[3] = -10 * layer.router.gate.weight[0].abs()
    x = torch.randn(B, T, D).abs()
    probe = torch.randn(B, T, D)
    results = []
    for backend in ("padded", "grouped_mm"):
        set_kernel_options(layer, KernelOptions(grouped_gemm=backend))
        layer.zero_grad()
        out = layer(x, ctx())
        (out * probe).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in layer.parameters()])
    assert int(layer.router(x.reshape(-1, D), B).tokens_per_expert[3]) == 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_expert_choice_takes_exactly_k_tokens_per_expert():
    for router, capacity, K in (("diffmoe", 0.75, int(B * T / 4 * 0.75)), ("expert_choice", 1.0, B * (T // 4))):
        layer = make_layer(router=router, capacity=capacity).train()
        d = layer.router(torch.randn(B * T, D, dtype=torch.float64), B)
        assert d.tokens_per_expert.tolist() == [K] * 4 and d.capacity == K
        for e in range(4):  # K distinct tokens per expert
            assert d.token_index[e * K:(e + 1) * K].unique().numel() == K


def test_diffmoe_predictor_gets_no_backbone_gradient():
    layer = make_layer(router="diffmoe").train()
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    layer(x, ctx())
    loss = layer.last_aux["predictor"]
    grads = torch.autograd.grad(loss, [x, layer.router.gate.weight, *layer.router.capacity_predictor.parameters()],
                                allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert all(g is not None and g.abs().sum() > 0 for g in grads[2:])


def test_diffmoe_threshold_ema_update():
    layer = make_layer(router="diffmoe", threshold_decay=0.9, capacity=0.5).train()
    tau0 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    layer.router.expert_threshold.copy_(tau0)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        prob = torch.sigmoid(layer.router.capacity_predictor(x.reshape(-1, D)))  # (S, E)
        K = int(B * T / 4 * 0.5)
        kth = prob.sort(dim=0, descending=True).values[K - 1]  # K-th largest per expert
        layer(x, ctx())
    torch.testing.assert_close(layer.router.expert_threshold, 0.9 * tau0 + 0.1 * kth)
    layer.eval()
    layer(x, ctx())  # eval forwards leave thresholds alone
    torch.testing.assert_close(layer.router.expert_threshold, 0.9 * tau0 + 0.1 * kth)


@pytest.mark.parametrize("threshold, expected_capacity", [(0.0, 4.0), (1.0, 0.0)])
def test_diffmoe_dynamic_threshold_extremes(threshold, expected_capacity):
    layer = make_layer(router="diffmoe").eval()
    layer.router.expert_threshold.fill_(threshold)
    x = torch.randn(B, T, D, dtype=torch.float64)
    records = []
    layer.capture = records
    out = layer(x, ctx())
    selected = records[0]["selected"]
    assert bool(selected.all()) if threshold == 0 else not bool(selected.any())
    assert float(layer.last_capacity) == expected_capacity
    if threshold == 1.0:
        assert out.abs().max() == 0
    else:  # every expert on every token: the sum of all experts weighted by the softmax
        pool = x.reshape(-1, D)
        probs = torch.softmax(pool @ layer.router.gate.weight.T, -1)
        ref = sum(probs[:, e:e + 1] * expert_ref(layer, e, pool) for e in range(4))
        torch.testing.assert_close(out.reshape(-1, D), ref)


def test_diffmoe_inference_modes_use_their_capacity():
    layer = make_layer(router="diffmoe", inference_mode="static", inference_capacity=0.5).eval()
    x = torch.randn(B, T, D, dtype=torch.float64)
    layer(x, ctx())
    assert float(layer.last_capacity) == 0.5
    layer.router.cfg.inference_mode = "global_threshold"
    layer.router.cfg.global_threshold = 0.5
    with torch.no_grad():
        prob = torch.sigmoid(layer.router.capacity_predictor(x.reshape(-1, D)))
    layer(x, ctx())
    assert float(layer.last_capacity) == pytest.approx(float((prob > 0.5).sum()) / (B * T))


def test_balance_loss_hand_built():
    layer = make_layer(router="token_choice", top_k=1, num_experts=2).train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = layer.router.gate.weight[1, 1] = 1.0
    x = torch.zeros(1, 4, D, dtype=torch.float64)
    x[0, :3, 0] = 2.0  # three tokens prefer expert 0 ...
    x[0, 3, 1] = 2.0  # ... one prefers expert 1
    layer(x, ctx(1))
    hi, lo = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    mean_prob = [(3 * hi + lo) / 4, (3 * lo + hi) / 4]
    f = [2 * 3 / 4, 2 * 1 / 4]  # E * share of assignments
    expected = f[0] * mean_prob[0] + f[1] * mean_prob[1]
    balance = float(layer.last_aux["balance"].detach())
    assert balance == pytest.approx(expected, rel=1e-12)
    assert balance == pytest.approx(1.19039853, rel=1e-6)


def test_aux_free_bias_moves_load_toward_uniform():
    layer = make_layer(router="token_choice", top_k=1, aux_free_bias=True, aux_free_rate=0.003).train()
    with torch.no_grad():
        layer.router.gate.weight.mul_(0.3)
        layer.router.gate.weight[0, 0] = 1.5  # expert 0 dominates
    router = layer.router

    def batch() -> torch.Tensor:
        x = torch.randn(256, D, dtype=torch.float64)
        x[:, 0] = 1.0
        return x

    def imbalance() -> float:  # max load / ideal load over 8 held-out batches, bias frozen
        router.eval()
        load = sum(router(batch(), 1).tokens_per_expert for _ in range(8))
        router.train()
        return float(load.max()) / (8 * 256 / 4)

    start = imbalance()
    for _ in range(200):
        router(batch(), 1)  # each training forward nudges the bias
    assert start > 2.5 and imbalance() < 1.2
    assert router.expert_bias[0] < 0 < router.expert_bias[1:].min()


def test_dropped_tokens_are_counted_and_pass_through():
    layer = make_layer(router="token_choice", top_k=2, capacity_factor=0.25).train()
    with torch.no_grad():
        layer.router.gate.weight[0].add_(5.0)  # overload one expert
    x = torch.randn(B, T, D, dtype=torch.float64)
    x[..., :] = x.abs()
    _, dropped, load = ref_token_choice(layer, x.reshape(-1, D))
    cap = math.ceil(B * T * 2 / 4 * 0.25)
    assert dropped > 0 and max(load) == cap
    layer.reset_stats()
    layer(x, ctx())
    layer(x, ctx())
    stats = layer_snapshot(layer)
    assert stats["dropped"] == 2 * dropped
    assert stats["tokens_per_expert"] == [2 * c for c in load]


def test_counting_sort_by_expert_matches_stable_argsort():
    from moedit.models.routers import _stable_sort_by_expert

    torch.manual_seed(1)
    expert = torch.randint(0, 6, (300,))
    expert[expert == 4] = 5  # an expert with no assignment
    order, counts = _stable_sort_by_expert(expert, 7)
    assert torch.equal(order, torch.argsort(expert, stable=True))
    assert counts.tolist() == [int((expert == e).sum()) for e in range(7)]


def test_diffmoe_predictor_loss_and_hits_match_naive_selection():
    layer = make_layer(router="diffmoe", capacity=0.75).train()
    tau = torch.tensor([0.3, 0.5, 0.6, 0.45], dtype=torch.float64)
    layer.router.expert_threshold.copy_(tau)
    x = torch.randn(B, T, D, dtype=torch.float64)
    pool = x.reshape(-1, D)
    S, E, K = B * T, 4, int(B * T / 4 * 0.75)
    with torch.no_grad():
        logits = layer.router.capacity_predictor(pool)  # (S, E)
        probs = torch.softmax(pool @ layer.router.gate.weight.T, -1)
        target = torch.zeros(S, E, dtype=torch.float64)
        for e in range(E):  # naive top-K per expert
            for s in sorted(range(S), key=lambda s: -float(probs[s, e]))[:K]:
                target[s, e] = 1.0
        d = layer.router(pool, B)
    bce = -(target * torch.log(torch.sigmoid(logits)) + (1 - target) * torch.log(1 - torch.sigmoid(logits))).mean()
    torch.testing.assert_close(d.aux["predictor"], bce)
    predicted = torch.sigmoid(logits) > tau
    assert d.predictor_hits.tolist() == [float((predicted & target.bool()).sum()), float(predicted.sum())]
    per_sample = target.view(B, T, E).sum(1)  # (B, E)
    assert torch.equal(d.tokens_per_sample, per_sample.long())


@pytest.mark.parametrize("ffn_type", ["gelu", "swiglu"])
def test_expert_weight_grads_keep_parameter_layout(ffn_type):
    """Weight grads come out in the (E, out, in) layout: no strided copy in AccumulateGrad."""
    layer = make_layer(ffn_type=ffn_type, router="diffmoe").train()
    layer(torch.randn(B, T, D, dtype=torch.float64), ctx()).sum().backward()
    assert all(p.grad.is_contiguous() for p in layer.experts.parameters())
