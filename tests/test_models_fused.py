"""The fused MoE paths (moedit/models/kernels/moe.py) against the plain ones, and CUDA-graphed layers.

CPU: the gather-sum combine / dispatch backward and the bias-in-GELU give the same outputs and
gradients as index_add_ and baddbmm for every router, in float64 (the PyTorch versions of the
kernels). GPU (-m gpu, on the device machine): the Triton kernels against the same references, and
a CUDA-graphed layer against the eager one.
"""

from __future__ import annotations

import pytest
import torch

from moedit.models import ModelConfig, MoEConfig
from moedit.models.kernels import KernelOptions, set_kernel_options
from moedit.models.kernels.moe import BiasGelu, gather_sum, gather_sum_reference, inverse_map
from moedit.models.moe import MoELayer, RoutingContext

ROUTERS = {
    "diffmoe": dict(router="diffmoe"),
    "expert_choice": dict(router="expert_choice", capacity=2.0),
    "token_choice": dict(router="token_choice", top_k=2),
    "token_choice_capacity": dict(router="token_choice", top_k=2, capacity_factor=0.75),
    "token_choice_shared": dict(router="token_choice", top_k=1, num_shared_experts=1),
}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_layer(kind: str, dtype=torch.float64, device="cpu", ffn_type="gelu", hidden=32, experts=4):
    torch.manual_seed(0)
    cfg = ModelConfig(input_size=8, patch_size=2, hidden_size=hidden, depth=1, num_heads=4, num_classes=10,
                      ffn_type=ffn_type, moe=MoEConfig(num_experts=experts, every=1, first=0, **ROUTERS[kind]))
    layer = MoELayer(cfg, 0, num_noise_bins=10)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    for name, p in layer.experts.named_parameters():
        if name.endswith("_bias"):
            torch.nn.init.normal_(p, std=0.5)  # zero biases would hide a missing bias
    return layer.to(device, dtype).train()


def make_input(batch: int, tokens: int, hidden: int, dtype, device):
    x = torch.randn(batch, tokens, hidden, dtype=dtype, device=device)
    level = torch.rand(batch, device=device)
    ctx = RoutingContext(batch, level, (level * 10).long().clamp(max=9), torch.randint(0, 11, (batch,), device=device))
    return x, ctx


def run_step(layer, x, ctx, probe, combine: str, bias_gelu: str):
    assert set_kernel_options(layer, KernelOptions(combine=combine, bias_gelu=bias_gelu)) == 3
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = layer(xi, ctx)
    loss = (out * probe).sum() + sum(layer.last_aux.values())
    loss.backward()
    return [out, xi.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("kind", list(ROUTERS))
@pytest.mark.parametrize("ffn_type", ["gelu", "swiglu"])
def test_fused_paths_match_index_add_and_baddbmm_float64(kind, ffn_type):
    layer = make_layer(kind, ffn_type=ffn_type)
    x, ctx = make_input(4, 16, 32, torch.float64, "cpu")
    probe = torch.randn_like(x)
    thresholds = [b.clone() for b in layer.buffers()]
    plain = run_step(layer, x, ctx, probe, "index_add", "baddbmm")
    with torch.no_grad():
        for b, saved in zip(layer.buffers(), thresholds):
            b.copy_(saved)
    fused = run_step(layer, x, ctx, probe, "gather", "fused")
    assert len(plain) == len(fused)
    for a, b in zip(plain, fused):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_inverse_map_leaves_out_padding_and_sums_each_token():
    E, S = 3, 5
    token_index = torch.tensor([0, 2, 4, 2, 0, 0, 1, 3])  # expert 0: 0 2 4; expert 1: 2 0 (pad 0); expert 2: 1 3
    row_expert = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    valid = torch.tensor([True, True, True, True, True, False, True, True])
    inv = inverse_map(token_index, row_expert, valid, E, S)
    expected = torch.tensor([[0, -1, 1, -1, 2], [4, -1, 3, -1, -1], [-1, 6, -1, 7, -1]], dtype=torch.int32)
    assert torch.equal(inv, expected)
    rows = torch.randn(8, 6, dtype=torch.float64)
    weight = torch.rand(8, dtype=torch.float64)
    ref = torch.zeros(S, 6, dtype=torch.float64).index_add_(0, token_index[valid], (rows * weight[:, None])[valid])
    torch.testing.assert_close(gather_sum_reference(rows, inv, weight), ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(gather_sum(rows, inv), torch.zeros(S, 6, dtype=torch.float64).index_add_(
        0, token_index[valid], rows[valid]), rtol=0, atol=1e-15)


def test_bias_gelu_gradients_float64():
    h = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BiasGelu.apply, (h, bias))
    ref = torch.nn.functional.gelu(h + bias[:, None], approximate="tanh")
    torch.testing.assert_close(BiasGelu.apply(h, bias), ref, rtol=0, atol=0)


@pytest.mark.parametrize("tile", [None, (16, 64, 4)])
@pytest.mark.parametrize("experts", [16, 6])
def test_gather_sum_kernel_matches_the_reference(tile, experts, rerun_in_triton_interpreter):
    """The gather-sum kernel (Triton: CUDA, or the interpreter on CPU), float32 against the float64
    reference: plain, weighted, weighted with the experts' bias; tokens with no hit, one token taken by
    every expert, E not a power of two, sizes off the tiles (the default, and 16 tokens per program)."""
    pytest.importorskip("triton")
    if rerun_in_triton_interpreter():
        return
    options = KernelOptions(gather_sum_tile=tile) if tile else KernelOptions()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(experts)
    E, S, D = experts, 100, 72
    K = 2 * S // E  # capacity 2: many tokens taken twice or more
    scores = torch.rand(E, S, generator=g)
    scores[:, 7], scores[:, 3] = 2.0, -1.0  # token 7 taken by every expert, token 3 by none
    index = scores.topk(K, dim=1).indices  # (E, K) distinct tokens per expert
    row_expert = torch.arange(E).repeat_interleave(K)
    inv = inverse_map(index.reshape(-1), row_expert, None, E, S).to(device)
    rows = torch.randn(E * K, D, generator=g)
    weight, bias = torch.rand(E * K, generator=g), torch.randn(E, D, generator=g)
    assert int((inv >= 0).sum(0).max()) == E and int((inv >= 0).sum(0).min()) == 0
    for w, b in [(None, None), (weight, None), (weight, bias)]:
        ref = gather_sum_reference(rows.double(), inv.cpu(), None if w is None else w.double(),
                                   None if b is None else b.double())
        got = gather_sum(rows.to(device), inv, None if w is None else w.to(device), None if b is None else b.to(device),
                         options)
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-6, atol=1e-6)


def _options_reach_every_layer(monkeypatch) -> None:
    import moedit.models.experts as experts_module
    import moedit.models.moe as moe_module
    import moedit.models.routers as routers_module
    from moedit.models import build_model
    from moedit.models.kernels import triton_usable, use_kernel_options

    calls: dict[str, int] = {}

    def counted(name: str, fn):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    # each fused path, counted where its caller looks it up
    for module, name in ((moe_module, "GatherCombine"), (experts_module, "BiasGelu"), (routers_module, "DiffMoETail")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, type(name, (), {"apply": staticmethod(counted(name, fn.apply))}))
    monkeypatch.setattr(routers_module, "gate_and_predictor", counted("gate_and_predictor",
                                                                      routers_module.gate_and_predictor))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    depth = 3
    cfg = ModelConfig(input_size=8, patch_size=2, hidden_size=32, depth=depth, num_heads=4, num_classes=10,
                      moe=MoEConfig(router="diffmoe", num_experts=4, every=1, first=0))
    reference = KernelOptions(combine="index_add", bias_gelu="baddbmm", fused_router_tail=False, fused_predictor=False,
                              compiled_adaln=False)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    holders = [m for m in model.modules() if hasattr(m, "kernel_options")]
    assert len(holders) == 4 * depth  # each block, its MoE layer, its router and its experts
    assert all(m.kernel_options == KernelOptions() for m in holders)
    assert set_kernel_options(model, reference) == 4 * depth
    assert all(m.kernel_options is reference for m in holders)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero would zero the MoE layers' contribution to the output
            p.normal_(0.0, 0.2)
    x = torch.randn(2, cfg.in_channels, 8, 8, device=device)
    t, y = torch.rand(2, device=device), torch.tensor([1, 2], device=device)

    def step() -> tuple[dict[str, int], list[torch.Tensor]]:
        calls.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same random draws, if the model makes any
        xi = x.clone().requires_grad_()
        out = model(xi, t, y)
        out.square().mean().backward()
        return dict(calls), [out.detach(), xi.grad]

    usable = triton_usable(x)  # CUDA, or Triton's interpreter: the defaults take every fused path
    ref_calls, ref_out = step()
    assert ref_calls == {}
    forced = KernelOptions(combine="gather", bias_gelu="fused")  # their PyTorch versions where Triton does not run
    assert set_kernel_options(model, forced) == 4 * depth
    assert all(m.kernel_options is forced for m in holders)
    got_calls, got_out = step()
    fused_router = {"DiffMoETail": depth, "gate_and_predictor": depth} if usable else {}
    assert got_calls == {"GatherCombine": depth, "BiasGelu": depth, **fused_router}
    for a, b in zip(ref_out, got_out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with use_kernel_options(model, KernelOptions()):
        default_calls, default_out = step()
        assert default_calls == ({"GatherCombine": depth, "BiasGelu": depth, **fused_router} if usable else {})
    assert all(m.kernel_options is forced for m in holders)  # restored after the block
    for a, b in zip(ref_out, default_out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with use_kernel_options(model, reference):
        assert step()[0] == {}


def test_kernel_options_reach_every_moe_layer(monkeypatch, rerun_in_triton_interpreter):
    """Options set by set_kernel_options and by use_kernel_options reach every MoE
    layer's combine, experts and router: the fused paths run once per layer exactly where the options
    (and, for "auto", the device) say, and give the reference's outputs and input gradients. Off CUDA
    it runs here (the PyTorch versions of the gather-sum and bias-GELU) and again under Triton's
    interpreter (the fused DiffMoE tail and predictor too)."""
    _options_reach_every_layer(monkeypatch)
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    rerun_in_triton_interpreter()


def test_kernel_options_given_at_construction_and_checked():
    cfg = ModelConfig(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10,
                      moe=MoEConfig(router="diffmoe", num_experts=4, every=1, first=0))
    options = KernelOptions(combine="index_add", fused_predictor=False)
    layer = MoELayer(cfg, 0, num_noise_bins=10, kernel_options=options)
    assert layer.kernel_options is layer.router.kernel_options is layer.experts.kernel_options is options
    assert MoELayer(cfg, 0, num_noise_bins=10).router.kernel_options == KernelOptions()
    with pytest.raises(ValueError, match="combine"):
        KernelOptions(combine="triton")
    with pytest.raises(ValueError, match="gather_sum_tile"):
        KernelOptions(gather_sum_tile=(3, 1024, 4))
    with pytest.raises(ValueError, match="fused_router_tail"):
        KernelOptions(fused_router_tail="auto")
    with pytest.raises(TypeError):
        set_kernel_options(torch.nn.Linear(2, 2), {"combine": "gather"})
    assert KernelOptions().replace(combine="gather") == KernelOptions(combine="gather")


# ----- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["diffmoe", "token_choice", "token_choice_capacity"])
def test_triton_paths_match_plain_paths_on_cuda(kind, dtype):
    pytest.importorskip("triton")
    layer = make_layer(kind, dtype, "cuda", hidden=256, experts=8)
    x, ctx = make_input(8, 64, 256, dtype, "cuda")
    probe = torch.randn_like(x)
    saved = [b.clone() for b in layer.buffers()]
    plain = run_step(layer, x, ctx, probe, "index_add", "baddbmm")
    with torch.no_grad():
        for b, s in zip(layer.buffers(), saved):
            b.copy_(s)
    fused = run_step(layer, x, ctx, probe, "auto", "auto")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(plain, fused):
        err = (a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-12)
        assert err < tol, err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_triton_gather_sum_and_bias_gelu_kernels(dtype):
    pytest.importorskip("triton")
    torch.manual_seed(1)
    E, S, K, D = 8, 1000, 150, 300  # sizes off the block sizes
    index = torch.rand(E, S, device="cuda").topk(K, dim=1).indices  # (E, K) distinct tokens per expert
    row_expert = torch.arange(E, device="cuda").repeat_interleave(K)
    inv = inverse_map(index.reshape(-1), row_expert, None, E, S)
    rows = torch.randn(E * K, D, device="cuda", dtype=dtype)
    weight = torch.rand(E * K, device="cuda", dtype=torch.float32 if dtype != torch.float64 else dtype)
    ref = gather_sum_reference(rows.double(), inv, weight.double())
    got = gather_sum(rows, inv, weight).double()
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    assert (got - ref).norm() / ref.norm() < tol
    out_bias = torch.randn(E, D, device="cuda", dtype=dtype)  # the experts' output bias, added per expert row
    ref = gather_sum_reference(rows.double(), inv, weight.double(), out_bias.double())
    assert (gather_sum(rows, inv, weight, out_bias).double() - ref).norm() / ref.norm() < tol
    h = torch.randn(E, K, D, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(E, D, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn_like(h)
    out = BiasGelu.apply(h, bias)
    out.backward(g)
    h64, b64 = h.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref_out = torch.nn.functional.gelu(h64 + b64[:, None], approximate="tanh")
    ref_out.backward(g.double())
    for a, b in [(out, ref_out), (h.grad, h64.grad), (bias.grad, b64.grad)]:
        assert (a.double() - b).norm() / b.norm() < tol


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["diffmoe", "token_choice_capacity"])
def test_cuda_graphed_layer_matches_eager(kind):
    from moedit.models.kernels.cuda_graph import graph_moe_layer

    eager = make_layer(kind, torch.float32, "cuda", hidden=256, experts=8)
    graphed = make_layer(kind, torch.float32, "cuda", hidden=256, experts=8)
    graphed.load_state_dict(eager.state_dict())
    x, ctx = make_input(8, 64, 256, torch.float32, "cuda")
    graph_moe_layer(graphed, x, ctx)
    assert all(torch.equal(a, b) for a, b in zip(eager.buffers(), graphed.buffers()))  # warm-up undone
    for step in range(3):
        x, ctx2 = make_input(8, 64, 256, torch.float32, "cuda")
        ctx2 = RoutingContext(8, ctx2.noise_level, ctx2.noise_bin, ctx2.labels)
        probe = torch.randn_like(x)
        results = []
        for layer in (eager, graphed):
            xi = x.clone().requires_grad_()
            out = layer(xi, ctx2)
            ((out * probe).sum() + sum(layer.last_aux.values())).backward()
            results.append([out, xi.grad] + [p.grad for p in layer.parameters()] + list(layer.buffers()))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="captured for x"):
        graphed(torch.randn(4, 64, 256, device="cuda"), ctx)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_step_matches_eager_steps():
    from moedit.models.kernels.cuda_graph import CUDAGraphStep

    eager = make_layer("diffmoe", torch.float32, "cuda", hidden=256, experts=8)
    graphed = make_layer("diffmoe", torch.float32, "cuda", hidden=256, experts=8)
    graphed.load_state_dict(eager.state_dict())
    x, ctx = make_input(8, 64, 256, torch.float32, "cuda")
    probe = torch.randn_like(x)
    static_x = x.clone().requires_grad_()

    def step(layer, inp):
        out = layer(inp, ctx)
        ((out * probe).sum() + sum(layer.last_aux.values())).backward()
        return out

    replay = CUDAGraphStep(lambda: step(graphed, static_x), restore=(graphed,))
    for p in graphed.parameters():
        p.grad.zero_()  # the warm-up steps accumulated here; replays add to the captured buffers
    static_x.grad.zero_()
    x_grad_sum = torch.zeros_like(x)
    for _ in range(3):
        new_x = torch.randn_like(x)
        with torch.no_grad():
            static_x.copy_(new_x)
        out = replay()
        xi = new_x.clone().requires_grad_()
        ref = step(eager, xi)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        x_grad_sum += xi.grad
    torch.testing.assert_close(static_x.grad, x_grad_sum, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.buffers(), graphed.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
