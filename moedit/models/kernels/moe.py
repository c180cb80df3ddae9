"""Fused pieces of the MoE hot path: an atomic-free combine / dispatch backward, and bias + GELU.

Combine (and the backward of dispatch) adds assignment rows into their tokens. `index_add_` does
that with one atomic add per element, which for bf16 at DiffMoE-L shapes costs ~70 us per call on
an H100. No router assigns a token to the same expert twice, so an inverse map
`inv[e, s]` = the assignment row of token s at expert e (-1: none) has one entry per (expert,
token) pair, and out[s] = sum_e rows[inv[e, s]] is a gather-sum: each output row is written once,
accumulated in float32 (float64 for float64 inputs) in a fixed expert order (deterministic).

`GatherCombine` also applies the per-row combine weights (saving the weighted copy), and
`BiasGelu` applies the first expert projection's bias inside the GELU (the batched matmul has no
bias epilogue, and baddbmm's broadcast copy of an (E, K, F) bias cost ~60 us per step).

On CUDA with Triton these run as Triton kernels; elsewhere as plain PyTorch with the same math
(the reference the tests compare against, and the CPU path). BiasGelu's kernel computes in float32,
so float64 tensors take the PyTorch version. `sum_slices` adds up the float32 partial sums that
kernels here and in predictor.py write per block. Under Triton's interpreter the kernels also
run on CPU tensors (the tests' interpreter runs). Tiles come from a `KernelOptions` (the last
argument of each function here; default `KernelOptions()`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moedit.models.kernels import DEFAULT, KernelOptions, triton_usable

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch versions below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_GELU_C = math.sqrt(2.0 / math.pi)


def inverse_map(token_index: torch.Tensor, row_expert: torch.Tensor, valid: torch.Tensor | None,
                num_experts: int, num_tokens: int) -> torch.Tensor:
    """(E, S) int32: the row of each (expert, token) assignment, -1 where there is none.

    token_index, row_expert: (N,) long; valid: (N,) bool or None (False rows, padding, are left out).
    Assumes no (expert, token) pair appears twice among the valid rows (true for every router).
    """
    E, S, N = num_experts, num_tokens, token_index.shape[0]
    flat = row_expert * S + token_index  # (N,)
    if valid is not None:
        flat = torch.where(valid, flat, E * S)  # padding -> one spare slot, dropped below
    rows = torch.arange(N, dtype=torch.int32, device=token_index.device)
    inv = torch.full((E * S + 1,), -1, dtype=torch.int32, device=token_index.device).scatter_(0, flat, rows)
    return inv[:-1].view(E, S)


# ----- PyTorch reference versions (CPU, and any dtype Triton does not take) -----------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_sum_reference(rows: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = sum_e weight[r] * (rows[r] + bias[e]) over r = inv[e, s] >= 0; (S, D) in rows.dtype.
    With a bias, rows are uniform: expert e owns rows [e K, (e + 1) K)."""
    acc = _acc_dtype(rows.dtype)
    padded = torch.cat([_rows_with_bias(rows, bias, acc), rows.new_zeros(1, rows.shape[1], dtype=acc)])  # row N = 0
    if weight is not None:
        padded[:-1] *= weight.to(acc)[:, None]
    index = torch.where(inv >= 0, inv.long(), rows.shape[0])  # (E, S)
    return padded[index].sum(0).to(rows.dtype)  # (S, D), experts summed in order


def _rows_with_bias(rows: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """rows (E K, n) in `acc`, plus bias[e] on expert e's rows [e K, (e + 1) K) when there is a bias."""
    if bias is None:
        return rows.to(acc)
    return rows.to(acc) + bias.to(acc).repeat_interleave(rows.shape[0] // bias.shape[0], dim=0)


def expert_row_sum(rows: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E K, n) uniform rows -> (E, n) per-expert sums: a bias gradient. As one batched GEMV with a
    ones vector: on an H100 at DiffMoE-L, E=16, 5.9 us instead of 10.5 us for `sum(1)` at n = D
    (26.2 vs 28.9 us at n = F; benchmarks/expert_gemm_variants.py)."""
    x = rows.reshape(num_experts, -1, rows.shape[-1])
    return torch.bmm(x.new_ones(num_experts, 1, x.shape[1]), x).squeeze(1)


def sum_slices(part: torch.Tensor) -> torch.Tensor:
    """(R, ...) float32 partial sums -> (...) their sum over dim 0. A Triton kernel where one runs: for
    the kernels' (slices, E, D) partials, torch's sum(0) took ~7 us and a ones-vector GEMV up to 14 us
    on an H100 (benchmarks/moe_kernels.py)."""
    if not triton_usable(part, float64=False) or part.dtype != torch.float32:
        return part.sum(0)
    flat = part.reshape(part.shape[0], -1).contiguous()
    R, N = flat.shape
    out = torch.empty(N, dtype=torch.float32, device=part.device)
    # ~512 programs of at most 4096 elements per step: a few slow programs (128 columns each) took 25 us
    block_n = min(256, max(16, triton.next_power_of_2(triton.cdiv(N, 512))))
    block_r = min(triton.next_power_of_2(R), max(1, 4096 // block_n))
    _sum_slices_kernel[(triton.cdiv(N, block_n),)](flat, out, R, N, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
    return out.view(part.shape[1:])


def _gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(_GELU_C * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)


# ----- Triton kernels ------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gather_sum_kernel(rows_ptr, inv_ptr, weight_ptr, bias_ptr, out_ptr, S, D, E: tl.constexpr,
                                   E_P: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                   ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[s] = sum over the experts e that took token s, ascending, of weight[r] (rows[r] + bias[e]),
        r = inv[e, s]. The block's (E, BLOCK_S) inverse map is read once and each token's hits listed
        first (a cumsum over experts), so the loop runs over the j-th hit of every token: as many
        steps as the block's largest hit count (~3 for expert choice at capacity 1), each one gather.
        A loop over all E experts with a masked gather each took 4x as long at E = 16 (H100)."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        e = tl.arange(0, E_P)
        s_ok, d_ok = s < S, d < D
        inv = tl.load(inv_ptr + e[:, None] * S + s[None, :], mask=(e < E)[:, None] & s_ok[None, :], other=-1)
        hit = inv >= 0  # (E_P, BLOCK_S)
        rank = tl.cumsum(hit.to(tl.int32), axis=0) - 1  # j of each hit among its token's hits
        count = tl.sum(hit.to(tl.int32), axis=0)  # (BLOCK_S,)
        acc_type = tl.float64 if ACC_F64 else tl.float32
        acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=acc_type)
        for j in range(0, tl.max(count, axis=0)):
            pick = hit & (rank == j)
            r = tl.sum(tl.where(pick, inv, 0), axis=0)  # (BLOCK_S,) the j-th hit's row
            ok = count > j
            m = ok[:, None] & d_ok[None, :]
            v = tl.load(rows_ptr + r.to(tl.int64)[:, None] * D + d[None, :], mask=m, other=0.0).to(acc_type)
            if HAS_BIAS:
                ej = tl.sum(tl.where(pick, e[:, None], 0), axis=0)  # (BLOCK_S,) its expert
                v += tl.load(bias_ptr + ej[:, None] * D + d[None, :], mask=m, other=0.0).to(acc_type)
            if HAS_WEIGHT:
                v = v * tl.load(weight_ptr + r, mask=ok, other=0.0).to(acc_type)[:, None]
            acc += v
        out = out_ptr + s.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=s_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_backward_kernel(grad_ptr, rows_ptr, token_ptr, weight_ptr, bias_ptr, grad_rows_ptr, grad_weight_ptr,
                                 N, D, K, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
        """grad_rows[r] = weight[r] * grad[token[r]]; grad_weight[r] = <grad[token[r]], rows[r] (+ bias[r // K])>."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < N
        acc_type = tl.float64 if ACC_F64 else tl.float32
        token = tl.load(token_ptr + r, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(weight_ptr + r, mask=r_ok, other=0.0).to(acc_type)
        r = r.to(tl.int64)
        dot = tl.zeros((BLOCK_R,), dtype=acc_type)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = r_ok[:, None] & (d < D)[None, :]
            g = tl.load(grad_ptr + token[:, None] * D + d[None, :], mask=m, other=0.0).to(acc_type)
            x = tl.load(rows_ptr + r[:, None] * D + d[None, :], mask=m, other=0.0).to(acc_type)
            if HAS_BIAS:
                x += tl.load(bias_ptr + (r // K)[:, None] * D + d[None, :], mask=m, other=0.0).to(acc_type)
            tl.store(grad_rows_ptr + r[:, None] * D + d[None, :],
                     (g * w[:, None]).to(grad_rows_ptr.dtype.element_ty), mask=m)
            dot += tl.sum(g * x, axis=1)
        tl.store(grad_weight_ptr + r, dot.to(grad_weight_ptr.dtype.element_ty), mask=r_ok)

    @triton.jit
    def _sum_slices_kernel(part_ptr, out_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[n] = sum_r part[r, n] in float32, in order of r blocks (deterministic); part (R, N) float32."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            v = tl.load(part_ptr + r.to(tl.int64)[:, None] * N + n[None, :], mask=(r < R)[:, None] & n_ok[None, :],
                        other=0.0)
            acc += tl.sum(v, axis=0)
        tl.store(out_ptr + n, acc, mask=n_ok)

    @triton.jit
    def _bias_gelu_kernel(h_ptr, bias_ptr, out_ptr, grad_ptr, partial_ptr, K, F,
                          BACKWARD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
        """h, out, grad: (E, K, F) contiguous; bias (E, F). Forward: out = gelu_tanh(h + bias[e]).
        Backward: out = grad * gelu_tanh'(h + bias[e]), and partial[e, k-block] = its sum over the
        block's rows (float32; the bias gradient is their sum over blocks, deterministic)."""
        blocks_k = tl.cdiv(K, BLOCK_K)
        e, kb = tl.program_id(0) // blocks_k, tl.program_id(0) % blocks_k
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = f < F
        m = (k < K)[:, None] & f_ok[None, :]
        offs = (e * K + k).to(tl.int64)[:, None] * F + f[None, :]
        b = tl.load(bias_ptr + e * F + f, mask=f_ok, other=0.0).to(tl.float32)
        z = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32) + b[None, :]
        t = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (z + 0.044715 * z * z * z))) - 1.0  # tanh
        if BACKWARD:
            g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
            y = g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z))
            y = tl.where(m, y, 0.0)
            tl.store(partial_ptr + (e * blocks_k + kb) * F + f, tl.sum(y, axis=0), mask=f_ok)
        else:
            y = 0.5 * z * (1.0 + t)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def gather_sum(rows: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, options: KernelOptions = DEFAULT) -> torch.Tensor:
    """(N, D) rows, (E, S) inverse map, optional (N,) weights and (E, D) bias of uniform rows -> (S, D)."""
    if not triton_usable(rows):
        return gather_sum_reference(rows, inv, weight, bias)
    rows, inv = rows.contiguous(), inv.contiguous()
    (E, S), D = inv.shape, rows.shape[1]
    out = rows.new_empty(S, D)
    block_s, block_d, warps = options.gather_sum_tile
    block_d = min(block_d, triton.next_power_of_2(D))
    grid = (triton.cdiv(S, block_s), triton.cdiv(D, block_d))
    args = (rows, inv, weight if weight is not None else rows, bias.contiguous() if bias is not None else rows, out,
            S, D)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC_F64=rows.dtype == torch.float64,
                 BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps)
    _gather_sum_kernel[grid](*args, E=E, E_P=triton.next_power_of_2(E), **flags)
    return out


class GatherCombine(torch.autograd.Function):
    """out[s] = sum over assignments r of token s of weight[r] * (rows[r] + bias[e(r)]): (N, D), (N,) -> (S, D).

    `bias` (E, D) or None: the experts' output bias, added here instead of in their last GEMM (a
    baddbmm would first copy the broadcast bias into its (E, K, D) output); rows must then be
    uniform, expert e owning rows [e K, (e + 1) K). `options`: the tiles."""

    @staticmethod
    def forward(ctx, rows, weight, token_index, inv, bias=None, options: KernelOptions = DEFAULT):
        ctx.save_for_backward(rows, weight, token_index, bias)
        ctx.options = options
        return gather_sum(rows, inv, weight, bias, options)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, token_index, bias = ctx.saved_tensors
        grad = grad.contiguous()
        N, D = rows.shape
        E = bias.shape[0] if bias is not None else 1
        if not triton_usable(rows):
            g = grad.index_select(0, token_index)  # (N, D)
            acc = _acc_dtype(rows.dtype)
            x = _rows_with_bias(rows, bias, acc)
            grad_rows = (g.to(acc) * weight.to(acc)[:, None]).to(rows.dtype)
            grad_weight = (g.to(acc) * x).sum(1).to(weight.dtype)
        else:
            grad_rows, grad_weight = torch.empty_like(rows), torch.empty_like(weight)
            block_r, block_d, warps = ctx.options.combine_backward_tile
            _combine_backward_kernel[(triton.cdiv(N, block_r),)](
                grad, rows.contiguous(), token_index, weight.contiguous(),
                bias.contiguous() if bias is not None else rows, grad_rows, grad_weight, N, D, N // E,
                HAS_BIAS=bias is not None, ACC_F64=rows.dtype == torch.float64, BLOCK_R=block_r, BLOCK_D=block_d,
                num_warps=warps)
        grad_bias = expert_row_sum(grad_rows, E) if bias is not None and ctx.needs_input_grad[4] else None
        return grad_rows, grad_weight, None, None, grad_bias, None


class GatherDispatch(torch.autograd.Function):
    """pool[token_index] (N, D); its backward is the gather-sum over the inverse map, not index_add."""

    @staticmethod
    def forward(ctx, pool, token_index, inv, options: KernelOptions = DEFAULT):
        ctx.save_for_backward(inv)
        ctx.options = options
        return pool.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return gather_sum(grad, inv, options=ctx.options), None, None, None


class BiasGelu(torch.autograd.Function):
    """gelu_tanh(h + bias[:, None]) for h (E, K, F), bias (E, F); bias grad = sum over K. Tiles:
    `options.bias_gelu_tile` forward, `options.bias_gelu_backward_tile` backward."""

    @staticmethod
    def launch(h, bias, out, grad, partial, backward: bool, options: KernelOptions = DEFAULT) -> None:
        """The kernel alone (benchmarks time it): out = gelu_tanh(h + bias), or in the backward
        out = grad * gelu_tanh'(h + bias) and partial (E, K-blocks, F) its float32 sums per block."""
        E, K, F_ = h.shape
        block_k, block_f, warps = options.bias_gelu_backward_tile if backward else options.bias_gelu_tile
        grid = (E * triton.cdiv(K, block_k), triton.cdiv(F_, block_f))
        _bias_gelu_kernel[grid](h, bias, out, grad, partial, K, F_, BACKWARD=backward,
                                BLOCK_K=block_k, BLOCK_F=block_f, num_warps=warps)

    @staticmethod
    def forward(ctx, h, bias, options: KernelOptions = DEFAULT):
        ctx.save_for_backward(h, bias)
        ctx.options = options
        if not triton_usable(h, float64=False):
            return F.gelu(h + bias.unsqueeze(1), approximate="tanh")
        h, bias = h.contiguous(), bias.contiguous()
        out = torch.empty_like(h)
        BiasGelu.launch(h, bias, out, h, out, False, options)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, bias = ctx.saved_tensors
        if not triton_usable(h, float64=False):
            grad_h = grad * _gelu_tanh_grad(h + bias.unsqueeze(1))
            return grad_h, grad_h.sum(1) if ctx.needs_input_grad[1] else None, None
        h, bias, grad = h.contiguous(), bias.contiguous(), grad.contiguous()
        E, K, F_ = h.shape
        grad_h = torch.empty_like(h)
        blocks = triton.cdiv(K, ctx.options.bias_gelu_backward_tile[0])
        partial = torch.empty(E, blocks, F_, dtype=torch.float32, device=h.device)
        BiasGelu.launch(h, bias, grad_h, grad, partial, True, ctx.options)
        if not ctx.needs_input_grad[1]:
            return grad_h, None, None
        return grad_h, expert_row_sum(partial.view(-1, F_), E).to(bias.dtype), None
