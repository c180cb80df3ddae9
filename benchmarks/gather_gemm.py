"""Could the dispatch gather live inside the experts' first GEMM? A Triton GEMM that gathers its rows.

    python benchmarks/gather_gemm.py     # CUDA, bf16, DiffMoE-L E=16 shapes; microseconds per call

The experts' first projection at DiffMoE-L, E = 16, capacity 1: expert e multiplies the K = 512
pool rows it selected, x[index[e]] (K, D = 1024), by its weight W1[e] (F = 4096, D) transposed.
moedit runs it as a gather (one (S, D) read and write) and a cuBLAS batched GEMM. Rows:
- `cuBLAS bmm`: the batched GEMM on rows gathered beforehand;
- `gather + cuBLAS bmm`: what the layer runs;
- `Triton GEMM`: the same batched GEMM in Triton (tl.dot, best of a few tiles), rows gathered beforehand;
- `Triton GEMM gathering its rows`: loads each A tile straight from the pool through the index
  (no gathered copy).
A fused version pays when its row is below `gather + cuBLAS bmm`. Times are CUDA-graph replays
(moedit.models.kernels.cuda_graph.replay_time_us); results are checked against the bmm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit`

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moedit.models.kernels.cuda_graph import replay_time_us  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
TILES = [(128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 256, 64, 8, 4, 4),
         (128, 64, 64, 8, 4, 4), (256, 128, 64, 8, 8, 3)]


@triton.jit
def _expert_gemm_kernel(a_ptr, index_ptr, w_ptr, out_ptr, K, N, D, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[e, m, n] = sum_d A[e, m, d] W[e, n, d]; A[e, m] = a[index[e * K + m]] when GATHER, else a[e * K + m]."""
    e = tl.program_id(1)
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(K, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % size_m)
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_K)
    m_ok = m < K
    if GATHER:
        rows = tl.load(index_ptr + e * K + m, mask=m_ok, other=0)
    else:
        rows = e * K + m
    a_at = a_ptr + rows.to(tl.int64)[:, None] * D + d[None, :]
    w_at = w_ptr + e.to(tl.int64) * N * D + n[None, :] * D + d[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        a = tl.load(a_at, mask=m_ok[:, None], other=0.0)
        w = tl.load(w_at)
        acc += tl.dot(a, w)
        a_at += BLOCK_K
        w_at += BLOCK_K
    out_at = out_ptr + (e.to(tl.int64) * K + m[:, None]) * N + n[None, :]
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def expert_gemm(a, index, w, out, gather: bool, tile):
    E, N, D = w.shape
    K = out.shape[1]
    bm, bn, bk, group, warps, stages = tile
    assert N % bn == 0 and D % bk == 0, "the kernel masks rows only"
    grid = (triton.cdiv(K, bm) * triton.cdiv(N, bn), E)
    _expert_gemm_kernel[grid](a, index, w, out, K, N, D, GATHER=gather, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              GROUP_M=group, num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    E, K, D, F = 16, 512, 1024, 4096
    S = E * K
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    pool = torch.randn(S, D, **bf16)
    index = torch.stack([torch.randperm(S, device="cuda")[:K].sort().values for _ in range(E)]).reshape(-1)
    w1 = torch.randn(E, F, D, **bf16) / D ** 0.5
    gathered = pool.index_select(0, index).view(E, K, D)
    out = torch.empty(E, K, F, **bf16)
    reference = torch.bmm(gathered, w1.transpose(1, 2))
    flops = 2 * E * K * D * F
    rows = [("cuBLAS bmm", replay_time_us(lambda: torch.bmm(gathered, w1.transpose(1, 2), out=out))),
            ("gather + cuBLAS bmm", replay_time_us(lambda: torch.bmm(
                pool.index_select(0, index).view(E, K, D), w1.transpose(1, 2), out=out)))]
    for gather, label in ((False, "Triton GEMM"), (True, "Triton GEMM gathering its rows")):
        best = None
        for tile in TILES:
            source = pool if gather else gathered
            try:
                expert_gemm(source, index, w1, out, gather, tile)
            except Exception as error:  # a tile that does not fit the shared memory
                print(f"  {label} {tile}: {type(error).__name__}")
                continue
            torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
            us = replay_time_us(lambda: expert_gemm(source, index, w1, out, gather, tile))
            print(f"  {label} {tile}: {us:.1f} us")
            best = min(best or (us, tile), (us, tile))
        rows.append((f"{label} {best[1]}", best[0]))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"E = {E}, K = {K}, D = {D}, F = {F}, bf16")
    print("| variant | us | TFLOP/s |\n|---|---|---|")
    for label, us in rows:
        print(f"| {label} | {us:.1f} | {flops / us / 1e6:.0f} |")


if __name__ == "__main__":
    main()
