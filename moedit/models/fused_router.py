"""DiffMoE's training-time router tail in a few kernels (opt-in: `DiffMoERouter.fused_tail`).

The unfused tail (routers.py, `DiffMoERouter._training_decision`) runs ~30 small kernels per
forward over (S, E) tensors: casts, softmax, sigmoid, the stacked top-K input, a materialised
(E, S) selection mask, the predictor's BCE against it, hit counts and the entropy statistic.
Here one kernel reads the gate and predictor logits once and writes

- `stacked` (2E, S) float32, contiguous: rows [0, E) the softmax scores (transposed), rows
  [E, 2E) the predictor probabilities: the input of the one top-K, already in the layout topk
  reads fastest;
- per token block: the entropy sum of the scores, sum softplus(predictor logit), and the number
  of (token, expert) pairs whose probability exceeds the expert's threshold.

The BCE needs no mask: with t = 1 on the K selected tokens of each expert,
sum_{e,s} BCE(z, t) = sum softplus(z) - sum_{selected} z, and its gradient is
(sigmoid(z) - t) / (E S), i.e. the probabilities with 1 subtracted at the selected entries.

Same values as the unfused tail up to float32 summation order (tests/test_models_fused_router.py).
Needs Triton; the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (tests only).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_PARTIALS = 3  # entropy sum, softplus sum, predicted positives


def fused_tail_usable(logits: torch.Tensor) -> bool:
    """Triton present, a float dtype the kernel reads, and CUDA (or the Triton interpreter)."""
    if triton is None or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _tail_forward_kernel(logit_ptr, pred_ptr, thr_ptr, stacked_ptr, partial_ptr, S, stride_ls, stride_le,
                             stride_ps, stride_pe, E: tl.constexpr, E_P: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        e = tl.arange(0, E_P)
        ms, me = s < S, e < E
        m = ms[:, None] & me[None, :]
        x = tl.load(logit_ptr + s[:, None] * stride_ls + e[None, :] * stride_le, mask=m,
                    other=float("-inf")).to(tl.float32)
        x = tl.where(ms[:, None], x, 0.0)  # rows past S: finite (their results are masked out)
        x_max = tl.max(x, axis=1)
        ex = tl.exp(x - x_max[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]
        entropy = tl.where(m & (p > 0), -p * tl.log(p), 0.0)
        z = tl.load(pred_ptr + s[:, None] * stride_ps + e[None, :] * stride_pe, mask=m, other=0.0).to(tl.float32)
        q = 1.0 / (1.0 + tl.exp(-z))
        softplus = tl.where(m, tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))), 0.0)
        thr = tl.load(thr_ptr + e, mask=me, other=0.0).to(tl.float32)
        above = tl.where(m & (q > thr[None, :]), 1.0, 0.0)
        out = stacked_ptr + e[None, :] * S + s[:, None]
        tl.store(out, p, mask=m)
        tl.store(out + E * S, q, mask=m)
        tl.store(partial_ptr + pid * 3 + 0, tl.sum(tl.sum(entropy, axis=1), axis=0))
        tl.store(partial_ptr + pid * 3 + 1, tl.sum(tl.sum(softplus, axis=1), axis=0))
        tl.store(partial_ptr + pid * 3 + 2, tl.sum(tl.sum(above, axis=1), axis=0))

    @triton.jit
    def _softmax_backward_kernel(grad_ptr, stacked_ptr, out_ptr, S, stride_os, stride_oe,
                                 E: tl.constexpr, E_P: tl.constexpr, BLOCK_S: tl.constexpr):
        """d logits = p * (g - sum_e p g), from the transposed scores and their gradient."""
        pid = tl.program_id(0)
        s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        e = tl.arange(0, E_P)
        m = (s < S)[:, None] & (e < E)[None, :]
        at = e[None, :] * S + s[:, None]
        p = tl.load(stacked_ptr + at, mask=m, other=0.0)
        g = tl.load(grad_ptr + at, mask=m, other=0.0)
        d = p * (g - tl.sum(p * g, axis=1)[:, None])
        tl.store(out_ptr + s[:, None] * stride_os + e[None, :] * stride_oe, d.to(out_ptr.dtype.element_ty), mask=m)


_BLOCK_S = 64


class RouterTail(torch.autograd.Function):
    """(logits, pred_logits (S, E), thresholds (E,)) -> (stacked (2E, S) float32, partial sums (3,)).

    Gradient flows to `logits` through the score rows of `stacked` (the top-K values are the
    combine weights); the probability rows and the partial sums are statistics (no gradient)."""

    @staticmethod
    def forward(ctx, logits, pred_logits, thresholds):
        S, E = logits.shape
        stacked = torch.empty(2 * E, S, dtype=torch.float32, device=logits.device)
        blocks = triton.cdiv(S, _BLOCK_S)
        partial = torch.empty(blocks, _PARTIALS, dtype=torch.float32, device=logits.device)
        _tail_forward_kernel[(blocks,)](logits, pred_logits, thresholds.float().contiguous(), stacked, partial, S,
                                        logits.stride(0), logits.stride(1), pred_logits.stride(0),
                                        pred_logits.stride(1), E=E, E_P=triton.next_power_of_2(E), BLOCK_S=_BLOCK_S)
        ctx.save_for_backward(stacked)
        ctx.logits_dtype = logits.dtype
        sums = partial.sum(dim=0, dtype=torch.float64)
        ctx.mark_non_differentiable(sums)
        return stacked, sums

    @staticmethod
    def backward(ctx, grad_stacked, _grad_partial):
        (stacked,) = ctx.saved_tensors
        E2, S = stacked.shape
        E = E2 // 2
        grad_logits = torch.empty(S, E, dtype=ctx.logits_dtype, device=stacked.device)
        _softmax_backward_kernel[(triton.cdiv(S, _BLOCK_S),)](
            grad_stacked.contiguous(), stacked, grad_logits, S, grad_logits.stride(0), grad_logits.stride(1),
            E=E, E_P=triton.next_power_of_2(E), BLOCK_S=_BLOCK_S)
        return grad_logits, None, None


class SelectionBCE(torch.autograd.Function):
    """mean over (E, S) of BCE(pred_logits.t(), t), t = 1 on each expert's selected tokens `index` (E, K).

    Forward from sums (no (E, S) mask): (sum softplus(z) - sum_selected z) / (E S); the softplus sum
    comes from `RouterTail`. Backward: (sigmoid(z) - t) / (E S), from the stacked probabilities."""

    @staticmethod
    def forward(ctx, pred_logits, index, softplus_sum, pred_prob_t):
        S, E = pred_logits.shape
        selected = pred_logits.t().gather(1, index).sum(dtype=torch.float64)
        ctx.save_for_backward(index, pred_prob_t)
        ctx.pred_dtype = pred_logits.dtype
        return ((softplus_sum - selected) / (E * S)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        index, pred_prob_t = ctx.saved_tensors
        E, S = pred_prob_t.shape
        scale = grad.float() / (E * S)
        grad_t = pred_prob_t * scale  # (E, S)
        grad_t.scatter_(1, index, (pred_prob_t.gather(1, index) - 1.0) * scale)
        return grad_t.t().to(ctx.pred_dtype), None, None, None


__all__ = ["RouterTail", "SelectionBCE", "fused_tail_usable"]
