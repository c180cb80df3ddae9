"""DiffMoE's fused training tail (moedit/models/kernels/router_tail.py) against the unfused router.

Same layer, weights and batch through both: routing (each expert's token set), combine weights,
layer output, predictor BCE, hit counts, threshold update, per-sample counts, the entropy
statistic and every gradient. Float32, 1e-5. Runs on CUDA, or on CPU through Triton's
interpreter where Triton is installed (scripts/env.sh installs it next to the CPU torch; skipped
without it).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from moedit.models import ModelConfig, MoEConfig  # noqa: E402
from moedit.models.kernels import KernelOptions, set_kernel_options  # noqa: E402
from moedit.models.moe import MoELayer, RoutingContext  # noqa: E402
from moedit.models.stats import layer_snapshot  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(num_experts: int, hidden: int, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    moe = MoEConfig(router="diffmoe", num_experts=num_experts, first=0, every=1, capacity=1.0)
    cfg = ModelConfig(input_size=8, patch_size=2, hidden_size=hidden, depth=1, num_heads=2, num_classes=3,
                      mlp_ratio=2.0, moe=moe)
    layer = MoELayer(cfg, 0, num_noise_bins=4).to(DEVICE)
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)  # routing far from ties
    layer.router.expert_threshold.uniform_(0.3, 0.7)  # so the hit counts are not trivial
    return layer.train()


def _run(layer: MoELayer, x: torch.Tensor, ctx: RoutingContext, fused: bool) -> dict:
    set_kernel_options(layer, KernelOptions(fused_router_tail=fused, fused_predictor=fused))
    layer.reset_stats()
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    decisions = []
    hook = layer.router.register_forward_hook(lambda module, args, decision: decisions.append(decision))
    out = layer(x, ctx)
    hook.remove()
    decision = decisions[0]
    (out.pow(2).mean() + layer.last_aux["predictor"]).backward()
    E = layer.num_experts
    sets = [sorted(decision.token_index.view(E, -1)[e].tolist()) for e in range(E)]
    return {"fused_ran": decision.entropy_sum is not None, "sets": sets, "weight_sorted": decision.weight.view(E, -1).sort(dim=1).values.detach(),
            "out": out.detach(), "predictor": layer.last_aux["predictor"].detach(),
            "hits": decision.predictor_hits, "per_sample": decision.tokens_per_sample,
            "threshold": layer.router.expert_threshold.clone(), "stats": layer_snapshot(layer),
            "grads": {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
            "x_grad": x.grad.clone()}


@pytest.mark.parametrize("num_experts, hidden, tokens", [(4, 16, 64), (16, 32, 96), (6, 16, 80)])
def test_fused_tail_matches_unfused_router(num_experts, hidden, tokens, rerun_in_triton_interpreter):
    if rerun_in_triton_interpreter():
        return
    batch = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens // batch, hidden, generator=g).to(DEVICE)
    level = torch.tensor([0.2, 0.8], device=DEVICE)
    ctx = RoutingContext(batch, level, (level * 4).long(), torch.tensor([0, 2], device=DEVICE))
    results = []
    for fused in (False, True):
        layer = _layer(num_experts, hidden, seed=0)
        results.append(_run(layer, x, ctx, fused))
        # the second forward runs with the updated thresholds: the hit counts depend on them
        results[-1]["second"] = _run(layer, x, ctx, fused)
    for ref, got in ((results[0], results[1]), (results[0]["second"], results[1]["second"])):
        assert got["fused_ran"] and not ref["fused_ran"]
        assert got["sets"] == ref["sets"]
        torch.testing.assert_close(got["weight_sorted"], ref["weight_sorted"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["predictor"], ref["predictor"], rtol=1e-5, atol=1e-7)
        assert torch.equal(got["hits"], ref["hits"]) and torch.equal(got["per_sample"], ref["per_sample"])
        torch.testing.assert_close(got["threshold"], ref["threshold"], rtol=1e-6, atol=1e-7)
        assert got["stats"]["tokens_per_expert_by_noise"] == ref["stats"]["tokens_per_expert_by_noise"]
        assert got["stats"]["predictor_tp"] == ref["stats"]["predictor_tp"]
        assert got["stats"]["entropy_sum"] == pytest.approx(ref["stats"]["entropy_sum"], rel=1e-5)
        assert got["grads"].keys() == ref["grads"].keys()
        for name in ref["grads"]:
            torch.testing.assert_close(got["grads"][name], ref["grads"][name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got["x_grad"], ref["x_grad"], rtol=1e-5, atol=1e-6)


def test_fused_tail_is_the_default_and_falls_back_where_it_cannot_run():
    from moedit.models.kernels.router_tail import fused_tail_usable

    layer = _layer(4, 16, seed=0)
    assert layer.router.kernel_options.fused_router_tail is True and layer.router.kernel_options == KernelOptions()
    assert not fused_tail_usable(torch.zeros(2, 2, dtype=torch.float64, device=DEVICE))  # float64: the reference path
    x = torch.randn(2, 8, 16, device=DEVICE)
    level = torch.tensor([0.2, 0.8], device=DEVICE)
    ctx = RoutingContext(2, level, (level * 4).long(), None)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert (_run(layer, x, ctx, fused=True)["fused_ran"]) == (DEVICE == "cuda" or interpreted)
    layer.router.cfg.z_loss_coef = 1e-3  # the fused tail has no z-loss: the reference path runs
    assert not _run(layer, x, ctx, fused=True)["fused_ran"]


@pytest.mark.parametrize("chunk", [None, 32])  # None: each row in one chunk; 32: the chunked loop
def test_selection_takes_the_top_k_with_ties_to_the_lowest_token(chunk, rerun_in_triton_interpreter):
    if rerun_in_triton_interpreter():
        return
    from moedit.models.kernels.router_tail import DiffMoETail

    options = KernelOptions(router_select_chunk=chunk) if chunk else KernelOptions()
    S, E, K = 100, 4, 25
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(S, E, generator=g)
    logits[::3] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # 34 equal top scores of expert 0: its K-th is a tie
    pred = torch.randn(S, E, generator=g)
    pred[10:40, 1] = 3.0  # 30 equal top probabilities of predictor 1
    thresholds = torch.rand(E, generator=g)
    logits, pred, thresholds = logits.to(DEVICE), pred.to(DEVICE), thresholds.to(DEVICE)
    weight, loss, index, inverse, kth, stats, stacked = DiffMoETail.apply(logits, pred, thresholds, K, options)

    probs, q = logits.softmax(dim=1).t(), torch.sigmoid(pred).t()  # (E, S)
    torch.testing.assert_close(kth, torch.cat([probs, q]).topk(K, dim=1).values[:, -1], rtol=1e-6, atol=0)
    target = torch.zeros(E, S, device=DEVICE)
    for e in range(E):
        # reference: stable sort by score, descending, so equal scores keep token order
        order = torch.sort(stacked[e], descending=True, stable=True).indices[:K].sort().values
        assert index[e].tolist() == order.tolist(), e  # K tokens, in token order
        torch.testing.assert_close(weight[e], probs[e, order], rtol=1e-6, atol=0)
        target[e, order] = 1.0
        rows = torch.full((S,), -1, dtype=torch.int32, device=DEVICE)
        rows[order] = torch.arange(e * K, (e + 1) * K, dtype=torch.int32, device=DEVICE)
        assert torch.equal(inverse[e], rows)
    assert kth[0] == stacked[0, 0] and kth[E + 1] == stacked[E + 1, 10]  # the ties were at the K-th values
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred.t(), target)
    torch.testing.assert_close(loss, bce, rtol=1e-5, atol=1e-7)
    predicted = q > thresholds[:, None]
    assert stats[1].item() == (predicted & (target > 0)).sum().item() and stats[2].item() == predicted.sum().item()
    entropy = torch.special.entr(probs).sum(dtype=torch.float64)
    torch.testing.assert_close(stats[0], entropy, rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [None, 32])
def test_selection_with_nan_scores_still_takes_k_valid_tokens(chunk, rerun_in_triton_interpreter):
    """A non-finite batch (train.on_nonfinite=skip) gives NaN scores. Every NaN bit pattern counts as
    a score of 0: each expert still selects K distinct tokens (finite scores first), writes every
    index slot and the inverse map, and keeps the NaN weights, so the step is flagged and skipped. On
    an H100 the kernel wrote 0x7FFFFFFF NaNs: the rows selected nothing, and the combine read
    unwritten indices (a device-side assert)."""
    if rerun_in_triton_interpreter():
        return
    from moedit.models.kernels.router_tail import select

    options = KernelOptions(router_select_chunk=chunk) if chunk else KernelOptions()
    S, E, K = 100, 3, 25
    g = torch.Generator().manual_seed(4)
    stacked = torch.rand(2 * E, S, generator=g)
    bits = stacked.view(torch.int32)
    bits[0, :] = 0x7FFFFFFF  # a whole score row NaN, CUDA's pattern
    bits[1, ::2] = -0x400000  # 0xFFC00000: NaN with the sign bit, on every other token
    bits[2, 5:90] = 0x7FC00000  # 85 NaN tokens: 15 finite ones, then the lowest NaN tokens
    bits[E, :] = 0x7FFFFFFF  # a predictor row: its K-th value must not be NaN's pattern either
    stacked = stacked.to(DEVICE)
    pred = torch.randn(S, E, generator=g).to(DEVICE)
    weight, index, inverse, kth, _ = select(stacked, pred, torch.full((E,), 0.5, device=DEVICE), K, options)

    finite = stacked.isfinite()
    for e in range(E):
        chosen = index[e].tolist()
        assert chosen == sorted(set(chosen)) and len(chosen) == K and 0 <= chosen[0] and chosen[-1] < S, e
        score = torch.where(finite[e], stacked[e], torch.zeros_like(stacked[e]))  # NaN reads as 0
        expected = torch.sort(score, descending=True, stable=True).indices[:K].sort().values
        assert chosen == expected.tolist(), e
        assert torch.equal(weight[e].isnan(), ~finite[e, index[e]]), e  # NaN weights flag the step
        rows = torch.full((S,), -1, dtype=torch.int32, device=DEVICE)
        rows[index[e]] = torch.arange(e * K, (e + 1) * K, dtype=torch.int32, device=DEVICE)
        assert torch.equal(inverse[e], rows), e
    assert kth[0] == 0 and kth[E] == 0 and torch.isfinite(kth).all()
