"""MoE FFN layer vs a dense FFN with the same activated FLOPs: fwd+bwd time ratio and TFLOP/s.

    python benchmarks/moe_layer.py                      # CUDA, bf16, DiffMoE-L shapes
    python benchmarks/moe_layer.py --device cpu --small # a quick check without a GPU

DiffMoE-L shapes: D = 1024, expert hidden 4D, S = 8192 tokens in the pool (32 images x 256
tokens), E in {8, 16}, capacity 1. Each MoE layer at capacity 1 / top-1 does the dense FFN's
expert FLOPs, so ratio = t(MoE) / t(dense) is the routing + dispatch + combine overhead
(DiffMoE's includes its capacity predictor). TFLOP/s counts the expert (= dense) matmul FLOPs,
2 per multiply-add, 3x forward for fwd+bwd. CUDA timing uses CUDA events around `--iters`
iterations after `--warmup`; the routing-statistics updates run as in training.

Two parameter settings, each with its own dense baseline:
- `bf16 params` (the headline): parameters and activations in bf16, as a Megatron/DeepSpeed bf16
  trainer runs its micro-batches (fp32 master weights live in the optimizer, which runs once per
  step, outside this measurement).
- `fp32 params + autocast` (`--autocast`): fp32 parameters under torch.autocast(bf16), as plain
  PyTorch AMP trains. Every forward then casts each weight to bf16 (E x the dense weights for an
  MoE layer) and the backward accumulates fp32 grads, so memory-bound copies enter the ratio.

`--cuda-graph layer` captures each layer (the dense FFN too) for its fixed shapes
(moedit.models.kernels.cuda_graph.graph_moe_layer; torch.cuda.make_graphed_callables for the dense FFN):
one replay per forward and one per backward, callable from eager code; autograd then copies the
static weight gradients into `.grad`. `--cuda-graph step` captures the whole timed step (forward,
backward, fresh `.grad`) with moedit.models.kernels.cuda_graph.CUDAGraphStep: one replay per step, no
copies, as a trainer that graphs its whole step would run. Either way wall time approaches the GPU
kernel time on a launch-bound host. `--combine`, `--bias-gelu`, `--unfused-router` and `--unfused-predictor`
set the MoE layer's KernelOptions (default auto: the fused Triton paths on CUDA) to compare against the
plain PyTorch ones.
"""

from __future__ import annotations

import argparse
import time

import torch

from moedit.models.config import ModelConfig, MoEConfig
from moedit.models.kernels import KernelOptions
from moedit.models.kernels.cuda_graph import CUDAGraphStep, graph_moe_layer
from moedit.models.layers import GeluMLP
from moedit.models.moe import MoELayer, RoutingContext

LAYERS = {  # label -> MoEConfig fields (every = 1, first = 0 added below)
    "diffmoe": dict(router="diffmoe", capacity=1.0),
    "token_choice top-1": dict(router="token_choice", top_k=1, balance_coef=0.01),
    "token_choice top-1 cf=1.25": dict(router="token_choice", top_k=1, balance_coef=0.01, capacity_factor=1.25),
    "expert_choice": dict(router="expert_choice", capacity=1.0),
}


def build_layer(kind: str, D: int, E: int, tokens_per_image: int, options: KernelOptions | None = None) -> MoELayer:
    side = int(round((tokens_per_image) ** 0.5)) * 2  # latent side at p = 2
    cfg = ModelConfig(input_size=side, patch_size=2, hidden_size=D, depth=1, num_heads=max(1, D // 64),
                      moe=MoEConfig(num_experts=E, every=1, first=0, **LAYERS[kind]))
    return MoELayer(cfg, 0, num_noise_bins=10, kernel_options=options)


def make_context(batch: int, device: torch.device) -> RoutingContext:
    level = torch.rand(batch, device=device)
    bins = (level * 10).long().clamp(max=9)
    return RoutingContext(batch, level, bins, torch.randint(0, 1000, (batch,), device=device))


def time_fwd_bwd(step, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of step() (forward + backward)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def make_step(module, x: torch.Tensor, probe: torch.Tensor, ctx=None, autocast: bool = False):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = module(x, ctx) if ctx is not None else module(x)
        # as in training, the backward includes the layer's auxiliary losses (DiffMoE: the capacity
        # predictor's BCE, whose backward runs the predictor's; token choice: the balance loss)
        loss = (out * probe).sum()
        for aux in getattr(module, "last_aux", {}).values():
            loss = loss + aux
        loss.backward()
        for p in params:  # as an optimizer's zero_grad(set_to_none=True) would
            p.grad = None
        x.grad = None

    return step


def compile_routing(layer: MoELayer) -> None:
    """torch.compile only the router and the statistics update (many small kernels: launch-bound);
    the expert GEMMs, dispatch and combine stay eager."""
    layer.router.forward = torch.compile(layer.router.forward)
    layer._record = torch.compile(layer._record)


def time_layers(args, x, probe, ctx, param_dtype, autocast: bool) -> dict[tuple[str, int], float]:
    """Seconds per fwd+bwd of the dense FFN (key ("dense FFN", 1)) and of each MoE layer."""
    device = x.device
    D, S, experts, tokens_per_image = args.shapes
    dense = GeluMLP(D, 4 * D).to(device, param_dtype)
    if args.cuda_graph == "layer" and not autocast:
        dense = torch.cuda.make_graphed_callables(dense, (x.detach().clone().requires_grad_(),))
    dense_step = make_step(dense, x, probe, autocast=autocast)
    if args.cuda_graph == "step" and not autocast:
        dense_step = CUDAGraphStep(dense_step)
    times = {("dense FFN", 1): time_fwd_bwd(dense_step, device, args.warmup, args.iters)}
    if args.kernel_time and device.type == "cuda" and not autocast:
        args.kernel_ms[("dense FFN", 1)] = kernel_ms(dense_step)
    options = KernelOptions(combine=args.combine, bias_gelu=args.bias_gelu, fused_router_tail=not args.unfused_router,
                            fused_predictor=not args.unfused_predictor)
    for E in experts:
        for kind in LAYERS:
            if args.layer and args.layer not in kind:
                continue
            layer = build_layer(kind, D, E, tokens_per_image, options).to(device, param_dtype).train()
            if args.cuda_graph == "layer" and not autocast:
                graph_moe_layer(layer, x, ctx)
            if args.compile:
                torch._dynamo.reset()  # each layer shape is its own graph; do not hit the recompile limit
                layer = torch.compile(layer)
            elif args.compile_router:
                torch._dynamo.reset()
                compile_routing(layer)
            step = make_step(layer, x, probe, ctx, autocast=autocast)
            if args.cuda_graph == "step" and not autocast:
                step = CUDAGraphStep(step, restore=(layer,))
            times[(kind, E)] = time_fwd_bwd(step, device, args.warmup, args.iters)
            if args.kernel_time and device.type == "cuda" and not autocast:
                args.kernel_ms[(kind, E)] = kernel_ms(step)
            if args.profile and device.type == "cuda":
                profile(step, kind, E)
    return times


def kernel_ms(step, iters: int = 5) -> float:
    """Milliseconds of GPU kernel time per step (the sum over its kernels, from the profiler):
    where it is well below the wall time per step, the host's kernel launches are the limit."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / iters / 1e3


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    args.kernel_ms = {}
    bf16 = device.type == "cuda" and not args.fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    if args.small:
        D, tokens_per_image, batch, experts = 128, 64, 8, (4, 8)
    else:
        D, tokens_per_image, batch, experts = 1024, 256, 32, (8, 16)
    if args.experts:
        experts = (args.experts,)
    S, F = batch * tokens_per_image, 4 * D
    args.shapes = (D, S, experts, tokens_per_image)
    torch.manual_seed(0)
    x = torch.randn(batch, tokens_per_image, D, device=device, dtype=dtype, requires_grad=True)
    probe = torch.randn_like(x)
    ctx = make_context(batch, device)
    main = time_layers(args, x, probe, ctx, dtype, autocast=False)
    amp = time_layers(args, x, probe, ctx, torch.float32, autocast=True) if (bf16 and args.autocast) else {}
    flops = 3 * 2 * S * 2 * D * F  # fwd + bwd expert matmul FLOPs
    rows = []
    for (kind, E), t in main.items():
        row = dict(layer=kind, E=E, S=S, D=D, ms=t * 1e3, ratio=t / main[("dense FFN", 1)], tflops=flops / t / 1e12)
        if args.kernel_ms:
            row["kernel_ms"] = args.kernel_ms[(kind, E)]
        if amp:
            row.update(amp_ms=amp[(kind, E)] * 1e3, amp_ratio=amp[(kind, E)] / amp[("dense FFN", 1)])
        rows.append(row)
    return rows


def profile(step, kind: str, E: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"\n--- {kind}, E={E}: top CUDA kernels over 5 fwd+bwd ---")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=80, max_name_column_width=110))
    print(f"\n--- {kind}, E={E}: operators by input shape over 5 fwd+bwd ---")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=70,
                                                             max_name_column_width=40, max_shapes_column_width=70))


def format_rows(rows: list[dict], param_label: str) -> str:
    amp, kernels = "amp_ms" in rows[0], "kernel_ms" in rows[0]
    cols = [("layer", 28), ("E", 3), ("S", 5), ("D", 5), (f"{param_label}: fwd+bwd ms", 10), ("ratio", 6),
            ("TFLOP/s", 8)] + ([("GPU kernel ms", 10), ("kernel ratio", 6)] if kernels else []) + (
        [("fp32 params + autocast: fwd+bwd ms", 10), ("ratio", 6)] if amp else [])
    header = "| " + " | ".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in
                               enumerate(cols)) + " |"
    lines = [header, "|" + "|".join("-" * (max(w, len(n)) + 2) for n, w in cols) + "|"]
    for r in rows:
        cells = [f"{r['layer']:<28}", f"{r['E']:>3}", f"{r['S']:>5}", f"{r['D']:>5}",
                 f"{r['ms']:>{max(10, len(cols[4][0]))}.3f}", f"{r['ratio']:>6.3f}", f"{r['tflops']:>8.3g}"]
        if kernels:
            cells += [f"{r['kernel_ms']:>13.3f}", f"{r['kernel_ms'] / rows[0]['kernel_ms']:>12.3f}"]
        if amp:
            cells += [f"{r['amp_ms']:>{len(cols[-2][0])}.3f}", f"{r['amp_ratio']:>6.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="D=128, S=512, E in {4, 8}: a quick CPU check")
    parser.add_argument("--fp32", action="store_true", help="float32 on CUDA instead of bf16")
    parser.add_argument("--autocast", action="store_true",
                        help="also time fp32 parameters under bf16 autocast (a second column)")
    parser.add_argument("--kernel-time", action="store_true",
                        help="also report GPU kernel time per fwd+bwd (profiler; bf16-params setting)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each MoE layer")
    parser.add_argument("--compile-router", action="store_true",
                        help="torch.compile only the router and statistics update of each MoE layer")
    parser.add_argument("--cuda-graph", default="", choices=["", "layer", "step"],
                        help="CUDA graphs (bf16-params setting): 'layer' graphs each layer's forward and "
                             "backward, 'step' the whole timed step")
    parser.add_argument("--combine", default="auto", choices=["auto", "gather", "index_add"],
                        help="MoE combine / dispatch-backward backend")
    parser.add_argument("--bias-gelu", default="auto", choices=["auto", "fused", "baddbmm"],
                        help="expert fc1 bias: fused into the GELU, or baddbmm")
    parser.add_argument("--unfused-router", action="store_true",
                        help="DiffMoE's training tail in plain PyTorch ops, not moedit/models/kernels/router_tail.py")
    parser.add_argument("--unfused-predictor", action="store_true",
                        help="DiffMoE: the gate and the capacity predictor's three modules apart, not "
                             "moedit/models/kernels/predictor.py's kernels")
    parser.add_argument("--layer", default="", help="only layers whose name contains this (e.g. diffmoe)")
    parser.add_argument("--experts", type=int, default=0, help="only this number of experts")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels per layer")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available; use --device cpu --small")
    rows = run(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    dtype = "bf16" if (args.device.startswith("cuda") and not args.fp32) else "fp32"
    params = "bf16 params" if dtype == "bf16" else "fp32 params"
    print(f"MoE FFN vs dense FFN (same activated FLOPs), fwd+bwd per micro-batch, {name}, {dtype}, "
          f"torch {torch.__version__}{', torch.compile' if args.compile else ''}"
          f"{', torch.compile(router + stats)' if args.compile_router else ''}"
          f"{f', CUDA graphs ({args.cuda_graph})' if args.cuda_graph else ''}"
          f", combine={args.combine}, bias-gelu={args.bias_gelu}; ratio = t(MoE) / t(dense) "
          f"with the same parameter setting")
    print(format_rows(rows, params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
