"""The expert projections alone at DiffMoE-L shapes: batched bmm vs torch._grouped_mm vs one dense mm.

    python benchmarks/expert_gemm_variants.py   # CUDA, bf16; microseconds per GEMM from CUDA-graph replays

Each row is one of the six GEMMs of an expert FFN's forward + backward (x (E, K, D), W1 (E, F, D),
h (E, K, F), W2 (E, D, F)) in the layouts experts.ExpertLinear uses, next to the same GEMM of the
dense FFN (S = E * K rows, one matmul): the gap is what batching over experts costs. Then the
bias gradients (a sum over each expert's K rows) three ways.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit`

from moedit.models.kernels import KernelOptions  # noqa: E402
from moedit.models.kernels.cuda_graph import replay_time_us  # noqa: E402
from moedit.models.kernels.moe import BiasGelu  # noqa: E402


def main() -> None:
    D, F, S = 1024, 4096, 8192
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    xs, hs = torch.randn(S, D, **bf16), torch.randn(S, F, **bf16)
    w1s, w2s = torch.randn(F, D, **bf16), torch.randn(D, F, **bf16)
    dense = {"fwd fc1 x W1^T": (xs, w1s.t()), "fwd fc2 h W2^T": (hs, w2s.t()), "bwd fc2 grad_h = g W2": (xs, w2s),
             "bwd fc2 grad_W2 = g^T h": (xs.t(), hs), "bwd fc1 grad_x = g W1": (hs, w1s),
             "bwd fc1 grad_W1 = g^T x": (hs.t(), xs)}
    print(f"{'GEMM':26s} {'E':>3s} {'bmm us':>8s} {'_grouped_mm us':>15s} {'dense mm us':>12s}")
    for E in (8, 16):
        K = S // E
        x, h = xs.view(E, K, D), hs.view(E, K, F)
        w1, w2 = torch.randn(E, F, D, **bf16), torch.randn(E, D, F, **bf16)
        cases = {"fwd fc1 x W1^T": (x, w1.transpose(1, 2)), "fwd fc2 h W2^T": (h, w2.transpose(1, 2)),
                 "bwd fc2 grad_h = g W2": (x, w2), "bwd fc2 grad_W2 = g^T h": (x.transpose(1, 2), h),
                 "bwd fc1 grad_x = g W1": (h, w1), "bwd fc1 grad_W1 = g^T x": (h.transpose(1, 2), x)}
        for name, (a, b) in cases.items():
            t_bmm = replay_time_us(lambda: torch.bmm(a, b))
            try:
                t_grouped = replay_time_us(lambda: torch._grouped_mm(a, b))
            except (RuntimeError, AttributeError) as err:
                print(f"  _grouped_mm: {str(err).splitlines()[0][:100]}")
                t_grouped = float("nan")
            da, db = dense[name]
            t_dense = replay_time_us(lambda: torch.mm(da, db))
            print(f"{name:26s} {E:3d} {t_bmm:8.1f} {t_grouped:15.1f} {t_dense:12.1f}")
    # the bias gradients of the expert projections: a sum over each expert's K rows
    print(f"\n{'bias gradient (E, K, n)':26s} {'E':>3s} {'sum(1) us':>10s} {'fp32 sum us':>12s} {'bmm ones us':>12s}")
    for E in (8, 16):
        K = S // E
        for name, g in (("fc2: n = D", xs.view(E, K, D)), ("fc1: n = F", hs.view(E, K, F))):
            ones = torch.ones(E, 1, K, **bf16)
            t_sum = replay_time_us(lambda: g.sum(1))
            t_f32 = replay_time_us(lambda: g.sum(1, dtype=torch.float32))
            t_bmm = replay_time_us(lambda: torch.bmm(ones, g))
            print(f"{name:26s} {E:3d} {t_sum:10.1f} {t_f32:12.1f} {t_bmm:12.1f}")

    # fc1's bias + GELU-tanh: the fused kernel's tile shapes, next to the dense FFN's GELU (no bias)
    E, K = 16, S // 16
    h, bias, grad = torch.randn(E, K, F, **bf16), torch.randn(E, F, **bf16), torch.randn(E, K, F, **bf16)
    dense_h = h.view(S, F)
    t_fwd = replay_time_us(lambda: torch.nn.functional.gelu(dense_h, approximate="tanh"))
    t_bwd = replay_time_us(lambda: torch.ops.aten.gelu_backward(grad.view(S, F), dense_h, approximate="tanh"))
    print(f"\n{'bias + GELU, E=16':26s} {'fwd us':>8s} {'bwd us':>8s}\n{'dense F.gelu (no bias)':26s} {t_fwd:8.1f} {t_bwd:8.1f}")
    for config in ((32, 128, 4), (64, 128, 8), (128, 64, 8), (64, 64, 4), (32, 64, 2), (64, 64, 2), (128, 64, 4),
                   (32, 32, 1), (128, 32, 4), (256, 32, 8)):
        options = KernelOptions(bias_gelu_tile=config, bias_gelu_backward_tile=config)
        out, grad_h = torch.empty_like(h), torch.empty_like(h)
        partial = torch.empty(E, -(-K // config[0]), F, device="cuda")  # one row per K-block
        t_fwd = replay_time_us(lambda: BiasGelu.launch(h, bias, out, h, out, False, options))
        t_bwd = replay_time_us(lambda: BiasGelu.launch(h, bias, grad_h, grad, partial, True, options))
        print(f"{'fused, tile ' + str(config):26s} {t_fwd:8.1f} {t_bwd:8.1f}")

if __name__ == "__main__":
    main()
