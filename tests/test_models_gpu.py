"""CUDA checks of the MoE hot path (run on the device machine: pytest -m gpu tests/test_models_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from moedit.models import ModelConfig, MoEConfig, build_model, get_flavor, override
from moedit.models.kernels import KernelOptions, set_kernel_options
from moedit.models.moe import MoELayer, RoutingContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROUTERS = {
    "diffmoe": dict(router="diffmoe"),
    "expert_choice": dict(router="expert_choice"),
    "token_choice": dict(router="token_choice", top_k=2),
    "token_choice_capacity": dict(router="token_choice", top_k=2, capacity_factor=1.0, aux_free_bias=True),
}


def layer_and_input(kind: str, ffn_type: str = "gelu"):
    torch.manual_seed(0)
    cfg = ModelConfig(input_size=16, patch_size=2, hidden_size=256, depth=1, num_heads=4, num_classes=10,
                      ffn_type=ffn_type, moe=MoEConfig(num_experts=8, every=1, first=0, **ROUTERS[kind]))
    layer = MoELayer(cfg, 0, num_noise_bins=10)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.1)
    x = torch.randn(8, 64, 256)
    level = torch.rand(8)
    ctx = RoutingContext(8, level, (level * 10).long().clamp(max=9), torch.randint(0, 11, (8,)))
    return layer, x, ctx


def to_cuda(ctx: RoutingContext) -> RoutingContext:
    return RoutingContext(ctx.batch_size, ctx.noise_level.cuda(), ctx.noise_bin.cuda(), ctx.labels.cuda())


@pytest.mark.parametrize("kind", list(ROUTERS))
@pytest.mark.parametrize("ffn_type", ["gelu", "swiglu"])
def test_training_forward_backward_has_no_host_sync(kind, ffn_type):
    layer, x, ctx = layer_and_input(kind, ffn_type)
    layer = layer.cuda().to(torch.bfloat16).train()
    x = x.cuda().to(torch.bfloat16).requires_grad_()
    ctx = to_cuda(ctx)
    layer(x, ctx).float().square().mean().backward()  # warm-up (lazy CUDA/cuBLAS init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x, ctx)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("ffn_type", ["gelu", "swiglu"])
def test_grouped_mm_matches_padded_bmm_in_bf16(ffn_type):
    """Same rows and counts (one expert empty, uneven groups): outputs and grads agree."""
    from moedit.models.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 512, ffn_type).cuda().to(torch.bfloat16)
    counts = torch.tensor([37, 0, 100, 3, 64, 1, 250, 57], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn_like(x)
    results = []
    for backend in ("padded", "grouped_mm"):
        set_kernel_options(experts, KernelOptions(grouped_gemm=backend))
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        out = experts.forward_grouped(xi, counts)
        out.backward(probe)
        results.append([out.float(), xi.grad.float()] + [p.grad.float() for p in experts.parameters()])
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm().clamp_min(1e-6)) < 2e-2


def test_tiny_model_step_on_cuda_without_sync():
    cfg = override(get_flavor("tiny-diffmoe"), {"hidden_size": 64})
    model = build_model(cfg).cuda()
    x = torch.randn(8, 4, 16, 16, device="cuda")
    t = torch.rand(8, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, y).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, t, y).square().mean() + model.aux_losses()["predictor"]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_adaln_block_matches_eager(autocast):
    """The compiled LayerNorm + modulation and gated residuals (KernelOptions.compiled_adaln, the
    default) train the same model as the eager ops: outputs and every gradient agree to float32
    (bf16 autocast: bf16) rounding. A dense model: the pieces do not touch the FFN, and an
    expert-choice router would turn a last-bit difference in one score at its capacity boundary into
    a different token set (a whole expert's output apart), which is not what this test asks."""
    torch.manual_seed(0)
    cfg = ModelConfig(input_size=16, patch_size=2, hidden_size=192, depth=2, num_heads=3, num_classes=10)
    model = build_model(cfg).cuda().train()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero's zero init would hide the blocks
            p.normal_(0.0, 0.05)
    x = torch.randn(4, 4, 16, 16, device="cuda")
    t, y = torch.rand(4, device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda")

    def run(compiled: bool):
        set_kernel_options(model, KernelOptions(compiled_adaln=compiled))
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t, y)
        out.float().square().mean().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = run(False)
    fused_out, fused_grads = run(True)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_out, eager_out, **tol)
    assert fused_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        scale = eager_grads[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(fused_grads[name] / scale, eager_grads[name] / scale, **tol, msg=name)
