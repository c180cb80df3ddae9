"""DiffMoE's capacity predictor, Linear(D, D) -> SiLU -> Linear(D, E), fused with the router's gate.

The predictor runs on every token of the pool at every training step, on a detached input, so
its backward needs no input gradient: only the weight and bias gradients. The gate, Linear(D, E)
without bias, reads the same pool. As modules, the predictor's forward and backward write the
(S, D) hidden layer four times (pre-activation, SiLU output, the output layer's input gradient,
the SiLU gradient) and read it again for the first bias gradient, and the gate reads x on its own
(an N = E GEMM, ~2x slower than its bytes). Here (`GatePredictorFunction`):

- forward: [h, logits] = x [W1; Wg]^T + [b1; 0] (one cuBLAS GEMM with its bias epilogue), then one
  Triton kernel that reads h once and gives z = silu(h) W2^T + b2 (float32 predictor logits;
  silu(h) is never stored);
- backward: one Triton kernel that reads h and dz once and writes dh = (dz W2) * silu'(h), with the
  partial sums of dW2 = dz^T silu(h), db1 = sum dh and db2 = sum dz per slice of rows (one more
  kernel adds them up); then [dW1; dWg] = [dh, dlogits]^T x (one cuBLAS GEMM) and, for x, only
  the gate's dlogits Wg.

On an H100 at DiffMoE-L shapes (S = 8192, D = 1024, E = 16, bf16) the predictor alone took 122 us
forward + backward against 150 us for its modules; the merged GEMMs take 31 + 34 us against
28 + 12 and 28 + 9 us apart (benchmarks/RESULTS.md).

Matmuls take the compute dtype's tensor cores with float32 accumulation, as nn.Linear does
(float32 inputs use exact float32 products). Where Triton does not run (CPU, float64), the
router uses the modules themselves: `predictor_usable`. Tiles come from a `KernelOptions`
(`predictor_head_tile`, `predictor_backward_tile`).
"""

from __future__ import annotations

import torch
from torch import nn

from moedit.models.kernels import DEFAULT, KernelOptions, triton_usable
from moedit.models.kernels.moe import sum_slices

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Tiles (KernelOptions.predictor_head_tile, .predictor_backward_tile), swept by
# benchmarks/moe_kernels.py (H100, DiffMoE-L E=16: head 11 us, backward 24 us; a program per
# 32-row block looping over all of D took 33 us, 64-row steps over 32 slices 37 us: too few
# programs in flight). Forward: (rows per program, columns per step of its loop over D, column
# splits (grid dim 1; each writes partial logits), warps, pipeline stages). Backward: (rows per
# step, columns per program, row slices (grid dim 1; each writes partial sums of dW2 and db1), warps).


def predictor_usable(x: torch.Tensor) -> bool:
    """Triton present, a dtype its tensor cores take, and CUDA (or the Triton interpreter)."""
    return triton_usable(x, float64=False)


if triton is not None:

    @triton.jit
    def _head_kernel(h_ptr, w2_ptr, b2_ptr, part_ptr, S, D, LD, cols_per_split, E: tl.constexpr, E_P: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """part[split, s, :E] = silu(h[s, cols]) @ W2[:, cols]^T (+ b2 in split 0) for a block of rows and
        the split's columns; h (S, D) with row stride LD, W2 (E, D), part (splits, S, E) float32, summed
        over splits after."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        split = tl.program_id(1)
        e = tl.arange(0, E_P)
        s_ok, e_ok = s < S, e < E
        acc = tl.zeros((BLOCK_S, E_P), dtype=tl.float32)
        first = split * cols_per_split
        for d0 in range(first, tl.minimum(first + cols_per_split, D), BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            h = tl.load(h_ptr + s.to(tl.int64)[:, None] * LD + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(w2_ptr + e[None, :] * D + d[:, None], mask=d_ok[:, None] & e_ok[None, :], other=0.0)
            a = (h * tl.sigmoid(h)).to(w.dtype)  # silu in float32, rounded to the GEMM's dtype (as nn.SiLU)
            acc += tl.dot(a, w, input_precision="ieee" if IEEE else "tf32")
        if split == 0:
            acc += tl.load(b2_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(part_ptr + split * S * E + s[:, None] * E + e[None, :], acc, mask=s_ok[:, None] & e_ok[None, :])

    @triton.jit
    def _backward_kernel(h_ptr, dz_ptr, w2_ptr, dh_ptr, part_ptr, S, D, LD, rows_per_slice, E: tl.constexpr,
                         E_P: tl.constexpr, IEEE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """For columns d of one program and rows [slice * rows_per_slice, ...): dh = (dz @ W2) * silu'(h)
        (stored; h and dh have row stride LD), and the slice's partial sums, in its row of part
        (slices, E_P D + D + E_P): dz^T silu(h) (E_P, D), sum dh (D,) and (the programs of the first
        columns) sum dz (E_P,)."""
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        piece = tl.program_id(1)
        e = tl.arange(0, E_P)
        d_ok, e_ok = d < D, e < E
        w = tl.load(w2_ptr + e[:, None] * D + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)  # (E_P, BD)
        acc_w2 = tl.zeros((E_P, BLOCK_D), dtype=tl.float32)
        acc_b1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_b2 = tl.zeros((E_P,), dtype=tl.float32)
        first = piece * rows_per_slice
        for s0 in range(first, tl.minimum(first + rows_per_slice, S), BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = (s < S) & (s < first + rows_per_slice)
            m = s_ok[:, None] & d_ok[None, :]
            at = s.to(tl.int64)[:, None] * LD + d[None, :]
            h = tl.load(h_ptr + at, mask=m, other=0.0).to(tl.float32)
            dz = tl.load(dz_ptr + s[:, None] * E + e[None, :], mask=s_ok[:, None] & e_ok[None, :], other=0.0)
            acc_b2 += tl.sum(dz, axis=0)  # float32, as the logits
            dz = dz.to(w.dtype)  # the logits' gradient in the GEMM dtype, as autograd gives nn.Linear
            sig = tl.sigmoid(h)
            a = (h * sig).to(w.dtype)
            da = tl.dot(dz, w, input_precision="ieee" if IEEE else "tf32")  # (BS, BD) float32
            dh = tl.where(m, da * (sig * (1.0 + h * (1.0 - sig))), 0.0)
            tl.store(dh_ptr + at, dh.to(dh_ptr.dtype.element_ty), mask=m)
            acc_w2 += tl.dot(tl.trans(dz), a, input_precision="ieee" if IEEE else "tf32")
            acc_b1 += tl.sum(dh, axis=0)
        row = part_ptr + piece.to(tl.int64) * (E_P * D + D + E_P)
        tl.store(row + e[:, None] * D + d[None, :], acc_w2, mask=d_ok[None, :])
        tl.store(row + E_P * D + d, acc_b1, mask=d_ok)
        if tl.program_id(0) == 0:
            tl.store(row + E_P * D + D + e, acc_b2)


def _head(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, options: KernelOptions) -> torch.Tensor:
    """(S, E) float32 z = silu(h) W2^T + b2 for h (S, D) with unit column stride (any row stride)."""
    S, D = h.shape
    E = w2.shape[0]
    block_s, block_d, splits, warps, stages = options.predictor_head_tile
    cols = triton.cdiv(triton.cdiv(D, splits), block_d) * block_d  # whole steps per split
    splits = triton.cdiv(D, cols)
    part = torch.empty(splits, S, E, dtype=torch.float32, device=h.device)
    _head_kernel[(triton.cdiv(S, block_s), splits)](h, w2, b2.contiguous(), part, S, D, h.stride(0), cols, E=E,
                                                    E_P=_padded_experts(E), IEEE=h.dtype == torch.float32,
                                                    BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
                                                    num_stages=stages)
    return part[0] if splits == 1 else sum_slices(part)


def _head_backward(h: torch.Tensor, grad_z: torch.Tensor, w2: torch.Tensor, dh: torch.Tensor,
                   options: KernelOptions):
    """Writes dh (h's shape and strides) = (dz W2) * silu'(h); returns (dW2, db1, db2)."""
    S, D = h.shape
    E, E_P = w2.shape[0], _padded_experts(w2.shape[0])
    block_s, block_d, slices, warps = options.predictor_backward_tile
    rows = triton.cdiv(triton.cdiv(S, slices), block_s) * block_s  # whole steps per slice
    slices = triton.cdiv(S, rows)
    part = torch.empty(slices, E_P * D + D + E_P, dtype=torch.float32, device=h.device)
    _backward_kernel[(triton.cdiv(D, block_d), slices)](
        h, grad_z.contiguous(), w2, dh, part, S, D, h.stride(0), rows, E=E, E_P=E_P, IEEE=h.dtype == torch.float32,
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps)
    sums = sum_slices(part)  # one launch for the three bias/weight partial sums (~3 us each apart)
    return (sums[:E_P * D].view(E_P, D)[:E].to(w2.dtype), sums[E_P * D:E_P * D + D].to(h.dtype),
            sums[E_P * D + D:E_P * D + D + E].to(w2.dtype))


class GatePredictorFunction(torch.autograd.Function):
    """forward(x (S, D), wg (E, D), w1, b1, w2, b2) -> (gate logits (S, E) in x's dtype, predictor
    logits z (S, E) float32), all inputs in one dtype; x's gradient is the gate's alone (see above).
    `options`: the tiles."""

    @staticmethod
    def forward(ctx, x, wg, w1, b1, w2, b2, options: KernelOptions = DEFAULT):
        D, E = x.shape[1], wg.shape[0]
        x, w2 = x.contiguous(), w2.contiguous()
        out = torch.addmm(torch.cat([b1, b1.new_zeros(E)]), x, torch.cat([w1, wg]).t())  # (S, D + E)
        ctx.save_for_backward(x, out, wg, w2)
        ctx.set_materialize_grads(False)
        ctx.options = options
        return out[:, D:], _head(out[:, :D], w2, b2, options)

    @staticmethod
    def backward(ctx, grad_logits, grad_z):
        x, out, wg, w2 = ctx.saved_tensors
        D = x.shape[1]
        grads = [None] * 7  # an unused output's parameters get None, as autograd gives them (and options)
        if grad_z is None and grad_logits is None:
            return tuple(grads)
        grad_out = torch.empty_like(out)  # [dh, dlogits]: one weight-gradient GEMM for both
        if grad_z is not None:
            grads[4], grads[3], grads[5] = _head_backward(out[:, :D], grad_z, w2, grad_out[:, :D],
                                                            ctx.options)  # w2, b1, b2
        else:
            grad_out[:, :D].zero_()
        if grad_logits is not None:
            grad_out[:, D:].copy_(grad_logits)
            grads[0] = torch.mm(grad_logits, wg)
        else:
            grad_out[:, D:].zero_()
        grad_w = torch.mm(grad_out.t(), x)  # (D + E, D): dW1 over dWg, each contiguous
        grads[2] = grad_w[:D] if grad_z is not None else None
        grads[1] = grad_w[D:] if grad_logits is not None else None
        return tuple(grads)


def _padded_experts(E: int) -> int:
    return max(16, triton.next_power_of_2(E))  # tl.dot takes dimensions of at least 16


def gate_and_predictor(gate: nn.Linear, predictor: nn.Sequential, x: torch.Tensor,
                       options: KernelOptions = DEFAULT):
    """(gate logits (S, E), predictor logits (S, E) float32) for a pool x (S, D), through
    `GatePredictorFunction` with `options`' tiles. Under autocast the weights and x are cast to the autocast dtype, as
    nn.Linear's would be."""
    fc1, fc2 = predictor[0], predictor[2]
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    params = [p.to(dtype) for p in (gate.weight, fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    with torch.autocast(x.device.type, enabled=False):
        return GatePredictorFunction.apply(x.to(dtype), *params, options)


__all__ = ["GatePredictorFunction", "gate_and_predictor", "predictor_usable"]
