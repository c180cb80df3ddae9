"""MoE-layer kernels alone at DiffMoE-L shapes: the gather-sum (combine and dispatch backward), the
capacity predictor, and the router tail's top-K select.

    python benchmarks/moe_kernels.py   # CUDA, bf16; microseconds from CUDA-graph replays

Gather-sum: out[s] = sum over the experts e that took token s of w * (rows[inv[e, s]] + bias[e]),
S = 8192 tokens, D = 1024, expert choice at capacity 1 (each expert's top S/E tokens of random
scores, so about a third of the tokens are taken by no expert and some by three or more), the
kernel of moedit/models/kernels/moe.py over a few tiles; "GB/s" counts the bytes that must move (the
rows read, the output written). Gate + predictor: the gate Linear(D, E) and the predictor
Linear(D, D) -> SiLU -> Linear(D, E) on the detached input, forward + backward, as nn modules and
fused (moedit/models/kernels/predictor.py), over tiles (before issue 2 follow-up 4: the predictor
alone). Select:
the DiffMoE router tail's forward (moedit/models/kernels/router_tail.py) by the select kernel's warps.
Each sweep passes a KernelOptions with the tile (the defaults: KernelOptions()).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit`

from moedit.models.kernels import KernelOptions  # noqa: E402
from moedit.models.kernels.cuda_graph import replay_time_us  # noqa: E402
from moedit.models.kernels.moe import gather_sum, inverse_map  # noqa: E402

TILES = [(16, 256, 4), (4, 1024, 4), (2, 1024, 4), (2, 1024, 2), (4, 512, 2)]
HEAD_TILES = [(64, 128, 8, 4, 3), (32, 128, 1, 4, 3), (32, 128, 8, 4, 3), (64, 64, 16, 4, 3), (128, 128, 8, 8, 3)]
BACKWARD_TILES = [(32, 64, 128, 4), (64, 128, 32, 4), (64, 128, 128, 4), (16, 128, 256, 4), (32, 32, 64, 4),
                  (32, 64, 64, 4), (64, 32, 32, 4)]


def gather_sums() -> None:
    D, S = 1024, 8192
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    print(f"{'E':>3s} {'tile':>14s} {'combine us':>11s} {'GB/s':>6s} {'dispatch bwd us':>16s} {'GB/s':>6s}")
    for E in (8, 16):
        K = S // E
        index = torch.randn(E, S, device="cuda").topk(K, dim=1).indices
        row_expert = torch.arange(E, device="cuda").repeat_interleave(K)
        inv = inverse_map(index.reshape(-1), row_expert, None, E, S)
        rows, weight, bias = torch.randn(E * K, D, **bf16), torch.rand(E * K, device="cuda"), torch.randn(E, D, **bf16)
        moved = (rows.numel() + S * D) * 2  # bytes: every row read once, the output written once
        for tile in TILES:
            options = KernelOptions(gather_sum_tile=tile)
            t_combine = replay_time_us(lambda: gather_sum(rows, inv, weight, bias, options))
            t_dispatch = replay_time_us(lambda: gather_sum(rows, inv, options=options))
            print(f"{E:3d} {str(tile):>14s} {t_combine:11.1f} {moved / t_combine / 1e3:6.0f} "
                  f"{t_dispatch:16.1f} {moved / t_dispatch / 1e3:6.0f}")
    t_copy = replay_time_us(lambda: rows.clone())
    print(f"(a copy of the {S} x {D} rows: {t_copy:.1f} us, {2 * rows.numel() * 2 / t_copy / 1e3:.0f} GB/s)")


def kernel_us(fn, iters: int = 10) -> dict[str, float]:
    """Microseconds per call of each CUDA kernel `fn` launches (eager, from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / iters for e in prof.key_averages() if e.self_device_time_total > 0}


def predictor() -> None:
    import moedit.models.kernels.predictor as fp

    D, S = 1024, 8192
    for E in (8, 16):
        module = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E)).to("cuda", torch.bfloat16)
        gate = nn.Linear(D, E, bias=False).to("cuda", torch.bfloat16)
        x = torch.randn(S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        probe = torch.randn(S, E, device="cuda")

        def step(fused_path: bool, backward: bool = True, options: KernelOptions = KernelOptions()) -> None:
            with torch.set_grad_enabled(backward):
                logits, z = (fp.gate_and_predictor(gate, module, x, options) if fused_path
                             else (gate(x), module(x.detach())))
            if backward:
                ((z + logits) * probe).sum().backward()
                for p in [x, gate.weight, *module.parameters()]:
                    p.grad = None

        print(f"\ngate + predictor, E={E}: modules fwd {replay_time_us(lambda: step(False, False)):.1f} us, "
              f"fwd+bwd {replay_time_us(lambda: step(False)):.1f} us (graph replays)")
        print(f"{'head tile':>22s} {'fwd us':>7s} {'_head_kernel us':>16s} {'its sum us':>11s}")
        for tile in HEAD_TILES:
            options = KernelOptions(predictor_head_tile=tile)
            kernels = kernel_us(lambda: step(True, False, options))
            head = kernels.pop("_head_kernel")
            others = kernels.get("_sum_slices_kernel", 0.0)
            print(f"{str(tile):>22s} {replay_time_us(lambda: step(True, False, options)):7.1f} {head:16.1f} "
                  f"{others:11.1f}")
        print(f"{'backward tile':>22s} {'fwd+bwd us':>11s} {'_backward_kernel us':>20s}")
        for tile in BACKWARD_TILES:
            options = KernelOptions(predictor_backward_tile=tile)
            kernels = kernel_us(lambda: step(True, options=options))
            print(f"{str(tile):>22s} {replay_time_us(lambda: step(True, options=options)):11.1f} "
                  f"{kernels['_backward_kernel']:20.1f}")
        kernels = kernel_us(lambda: step(True))
        print("kernels of the fused step, default tiles (us):", ", ".join(f"{k[:40]} {t:.1f}" for k, t in sorted(
            kernels.items(), key=lambda kv: -kv[1])))


def select() -> None:
    import moedit.models.kernels.router_tail as fr

    S = 8192
    print(f"\n{'select warps':>12s} {'E':>3s} {'tail fwd us':>12s} {'_select_kernel us':>18s}")
    for E in (8, 16):
        logits, pred = torch.randn(S, E, device="cuda", dtype=torch.bfloat16), torch.randn(S, E, device="cuda")
        thresholds = torch.rand(E, device="cuda")
        for warps in (0, 4, 8, 16, 32):
            options = KernelOptions(router_select_warps=warps)
            fn = lambda: fr.DiffMoETail.apply(logits, pred, thresholds, S // E, options)  # noqa: E731
            kernels = kernel_us(fn)
            print(f"{warps or 'auto':>12} {E:3d} {replay_time_us(fn):12.1f} {kernels['_select_kernel']:18.1f}")


if __name__ == "__main__":
    gather_sums()
    predictor()
    select()
