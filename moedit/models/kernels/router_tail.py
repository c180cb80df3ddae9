"""DiffMoE's training-time router tail in four Triton kernels (`KernelOptions.fused_router_tail`).

The unfused tail (routers.py, `DiffMoERouter._training_decision`) runs ~30 small kernels per
forward over (S, E) tensors: casts, softmax, sigmoid, a stacked top-K, a materialised (E, S)
selection mask, the predictor's BCE against it, hit counts, the entropy statistic; plus the
backward of each. Here:

1. `_tail_forward_kernel`, per block of tokens: reads the gate and predictor logits once and
   writes `stacked` (2E, S) float32 (rows [0, E) the softmax scores, rows [E, 2E) the predictor
   probabilities) and per-block sums of the score entropy, softplus(predictor logit) and the
   (token, expert) pairs whose probability exceeds the expert's threshold.
2. `_select_kernel`, one program per row of `stacked`: the K-th largest value by bisection on its
   bits (the values are probabilities, >= 0, so their float32 bit patterns order like the values;
   a NaN counts as 0, so a non-finite batch still selects K valid tokens per expert and its NaN
   weights flag the step; it stops early once the count at or above the candidate is exactly K),
   then, for a score row, the selection in token order: every value above the K-th, then ties at
   it by lowest token index, until K. It writes the combine weights and token indices (E, K), the
   inverse map (E, S) (row e*K + slot of each selected token, else -1; moe.py's combine reads it),
   and per expert the sum of the selected predictor logits and the selected tokens the predictor
   called (its true positives). Predictor rows only give their K-th value (the threshold EMA).
3. `_tail_finalize_kernel`, one program: the float64 sums of those partial sums, i.e. the BCE and
   the statistics (entropy sum, true and predicted positives).
4. `_tail_backward_kernel`, per block of tokens: the softmax backward from the combine weights'
   gradient (read through the inverse map) and the BCE gradient, (sigmoid(z) - t) / (E S) with
   t = 1 where the inverse map has a row.

The BCE needs no mask: with t = 1 on the K selected tokens of each expert,
sum_{e,s} BCE(z, t) = sum softplus(z) - sum_{selected} z.

Same values as the unfused tail up to float32 summation order, and the same selection but for
ties at the K-th score (`torch.topk` leaves their order unspecified; here the lowest token index
wins): tests/test_models_fused_router.py. Needs Triton; the kernels run on CUDA, or on CPU under
Triton's interpreter (tests only). Block sizes and the select kernel's warps come from a
`KernelOptions` (`router_tail_block`, `router_select_chunk`, `router_select_warps`).
"""

from __future__ import annotations

import torch

from moedit.models.kernels import DEFAULT, KernelOptions, triton_usable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

def fused_tail_usable(logits: torch.Tensor) -> bool:
    """Triton present, a float dtype the kernels read, and CUDA (or the Triton interpreter)."""
    return triton_usable(logits, float64=False)


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
    def _key_of(v, valid):
        """The select kernel's integer keys of row values `v`: the float32 bit patterns, which order
        like the values because every value is >= 0 once NaN (and -0.0) reads as +0.0. A NaN would
        otherwise be any pattern (CUDA writes 0x7FFFFFFF, the largest key, whose `t + 1` overflows;
        a sign bit makes it negative) and the row could select fewer than K tokens, leaving index
        slots unwritten. NaN scores still reach the weights (a non-finite step is flagged). Slots
        that are not `valid` (past S) get -1: negative, below every candidate."""
        return tl.where(valid, tl.where(v > 0, v, 0.0).to(tl.int32, bitcast=True), -1)

    @triton.jit
    def _keys(row_ptr, offs, S):
        """`_key_of` the row's values at `offs`."""
        return _key_of(tl.load(row_ptr + offs, mask=offs < S, other=0.0), offs < S)

    @triton.jit
    def _count_at_least(row_ptr, S, cand, key, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
        """#{s: key[s] >= cand}; `key` is the row's keys when the row is one chunk (in registers)."""
        if ONE_CHUNK:
            count = tl.sum((key >= cand).to(tl.int32), axis=0)
        else:
            count = 0
            for c0 in range(0, S, BLOCK):
                k = _keys(row_ptr, c0 + tl.arange(0, BLOCK), S)
                count += tl.sum((k >= cand).to(tl.int32), axis=0)
        return count

    @triton.jit
    def _min_at_least(row_ptr, S, t, key, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
        """min{key[s]: key[s] >= t} (there is one)."""
        big = 0x7FFFFFFF
        if ONE_CHUNK:
            smallest = tl.min(tl.where(key >= t, key, big), axis=0)
        else:
            smallest = big
            for c0 in range(0, S, BLOCK):
                k = _keys(row_ptr, c0 + tl.arange(0, BLOCK), S)
                smallest = tl.minimum(smallest, tl.min(tl.where(k >= t, k, big), axis=0))
        return smallest

    @triton.jit
    def _select_kernel(stacked_ptr, pred_ptr, thr_ptr, weight_ptr, index_ptr, inv_ptr, kth_ptr, row_stats_ptr,
                       S, K, stride_ps, stride_pe, E: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
        r = tl.program_id(0)
        row_ptr = stacked_ptr + r.to(tl.int64) * S
        offs0 = tl.arange(0, BLOCK)
        key0 = _keys(row_ptr, offs0, S)  # masked slots: -1, below every candidate (candidates are >= 1)
        # the K-th largest key: raise t one bit at a time from the top while #{key >= t} >= K stays
        # true, until that count is exactly K (then {key >= t} is the top K) or the bits run out.
        # (On an H100, five bits a step from tl.histogram digit counts took 32 us instead of 22.5, and
        # two bits a step, three counts packed into one int64 sum, 25.1 us.)
        t, count, bit = 0, S, 1 << 30
        while (bit > 0) & (count != K):
            cand = t | bit
            c = _count_at_least(row_ptr, S, cand, key0, BLOCK, ONE_CHUNK)
            t = tl.where(c >= K, cand, t)
            count = tl.where(c >= K, c, count)
            bit = bit >> 1
        t = _min_at_least(row_ptr, S, t, key0, BLOCK, ONE_CHUNK)  # the K-th largest key itself
        tl.store(kth_ptr + r, t.to(tl.float32, bitcast=True))
        if r < E:
            # ties at t: the lowest token indices, as many as K - #{key > t} (at least 1)
            need = K - _count_at_least(row_ptr, S, t + 1, key0, BLOCK, ONE_CHUNK)
            thr = tl.load(thr_ptr + r).to(tl.float32)
            taken, ties_seen = 0, 0
            z_sum, hits = 0.0, 0
            for c0 in range(0, S, BLOCK):
                offs = c0 + offs0
                in_row = offs < S
                v = tl.load(row_ptr + offs, mask=in_row, other=-1.0)
                key = _key_of(v, in_row)
                tie = (key == t) & in_row
                tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
                sel = (key > t) | (tie & (tie_rank < need))
                sel_i = sel.to(tl.int32)
                slot = taken + tl.cumsum(sel_i, axis=0) - sel_i
                tl.store(weight_ptr + r * K + slot, v, mask=sel)
                tl.store(index_ptr + r * K + slot, offs.to(tl.int64), mask=sel)
                tl.store(inv_ptr + r.to(tl.int64) * S + offs, tl.where(sel, r * K + slot, -1), mask=in_row)
                z = tl.load(pred_ptr + offs.to(tl.int64) * stride_ps + r * stride_pe, mask=sel, other=0.0)
                q = tl.load(row_ptr + E * S + offs, mask=sel, other=0.0)
                z_sum += tl.sum(z.to(tl.float32), axis=0)
                hits += tl.sum((sel & (q > thr)).to(tl.int32), axis=0)
                taken += tl.sum(sel_i, axis=0)
                ties_seen += tl.sum(tie.to(tl.int32), axis=0)
            tl.store(row_stats_ptr + r * 2, z_sum)
            tl.store(row_stats_ptr + r * 2 + 1, hits.to(tl.float32))

    @triton.jit
    def _tail_finalize_kernel(partial_ptr, row_stats_ptr, loss_ptr, stats_ptr, blocks, pairs, E: tl.constexpr,
                              E_P: tl.constexpr, BLOCK_B: tl.constexpr):
        """Float64 sums of the forward's per-block and the select's per-row partial sums: the BCE
        (sum softplus - sum of the selected logits) / (E S), and stats = (entropy sum, true positives,
        predicted positives). One program (the PyTorch sums, casts and stack took ~8 small kernels)."""
        b = tl.arange(0, BLOCK_B)
        entropy = tl.zeros((BLOCK_B,), dtype=tl.float64)
        softplus = tl.zeros((BLOCK_B,), dtype=tl.float64)
        predicted = tl.zeros((BLOCK_B,), dtype=tl.float64)
        for b0 in range(0, blocks, BLOCK_B):
            at = partial_ptr + (b0 + b) * 3
            m = b0 + b < blocks
            entropy += tl.load(at, mask=m, other=0.0).to(tl.float64)
            softplus += tl.load(at + 1, mask=m, other=0.0).to(tl.float64)
            predicted += tl.load(at + 2, mask=m, other=0.0).to(tl.float64)
        e = tl.arange(0, E_P)
        z_sum = tl.sum(tl.load(row_stats_ptr + e * 2, mask=e < E, other=0.0).to(tl.float64), axis=0)
        hits = tl.sum(tl.load(row_stats_ptr + e * 2 + 1, mask=e < E, other=0.0).to(tl.float64), axis=0)
        loss = (tl.sum(softplus, axis=0) - z_sum) / pairs.to(tl.float64)
        tl.store(loss_ptr, loss.to(tl.float32))
        tl.store(stats_ptr, tl.sum(entropy, axis=0))
        tl.store(stats_ptr + 1, hits)
        tl.store(stats_ptr + 2, tl.sum(predicted, axis=0))

    @triton.jit
    def _tail_backward_kernel(stacked_ptr, inv_ptr, grad_weight_ptr, grad_loss_ptr, grad_logit_ptr, grad_pred_ptr,
                              S, stride_ls, stride_le, stride_ps, stride_pe, scale,
                              E: tl.constexpr, E_P: tl.constexpr, BLOCK_S: tl.constexpr):
        """d logits = p * (g - sum_e p g), g the combine weights' gradient at the selected (e, s);
        d pred_logits = (q - t) * grad_loss / (E S), t = 1 at the selected (e, s)."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        e = tl.arange(0, E_P)
        m = (s < S)[:, None] & (e < E)[None, :]
        at = e[None, :] * S + s[:, None]
        p = tl.load(stacked_ptr + at, mask=m, other=0.0)
        q = tl.load(stacked_ptr + E * S + at, mask=m, other=0.0)
        row = tl.load(inv_ptr + at, mask=m, other=-1)
        hit = row >= 0
        g = tl.load(grad_weight_ptr + row, mask=m & hit, other=0.0)
        d = p * (g - tl.sum(p * g, axis=1)[:, None])
        tl.store(grad_logit_ptr + s[:, None] * stride_ls + e[None, :] * stride_le,
                 d.to(grad_logit_ptr.dtype.element_ty), mask=m)
        grad_loss = tl.load(grad_loss_ptr).to(tl.float32) * scale
        dz = (q - tl.where(hit, 1.0, 0.0)) * grad_loss
        tl.store(grad_pred_ptr + s[:, None] * stride_ps + e[None, :] * stride_pe,
                 dz.to(grad_pred_ptr.dtype.element_ty), mask=m)


def select(stacked: torch.Tensor, pred_logits: torch.Tensor, thresholds: torch.Tensor, K: int,
           options: KernelOptions = DEFAULT) -> tuple[torch.Tensor, ...]:
    """`_select_kernel` over `stacked` (2E, S): weight (E, K), index (E, K), inverse (E, S), kth (2E,)
    and per expert [sum of the selected predictor logits, true positives] (E, 2)."""
    E2, S = stacked.shape
    E, device = E2 // 2, stacked.device
    weight = torch.empty(E, K, dtype=torch.float32, device=device)
    index = torch.empty(E, K, dtype=torch.long, device=device)
    inverse = torch.empty(E, S, dtype=torch.int32, device=device)
    kth = torch.empty(2 * E, dtype=torch.float32, device=device)
    row_stats = torch.empty(E, 2, dtype=torch.float32, device=device)
    block = min(triton.next_power_of_2(S), options.router_select_chunk)
    _select_kernel[(2 * E,)](stacked, pred_logits, thresholds, weight, index, inverse, kth, row_stats, S, K,
                             pred_logits.stride(0), pred_logits.stride(1), E=E, BLOCK=block, ONE_CHUNK=S <= block,
                             num_warps=options.router_select_warps or min(16, max(4, block // 1024)))
    return weight, index, inverse, kth, row_stats


class DiffMoETail(torch.autograd.Function):
    """DiffMoE's training decision from the gate and predictor logits (S, E), thresholds (E,) and K.

    Returns (weight (E, K) float32, loss () float32, index (E, K) long, inverse (E, S) int32,
    kth (2E,) float32, stats (3,) float64, stacked (2E, S) float32):
    - weight / index: each expert's K selected tokens in token order, their softmax scores;
    - loss: the predictor's BCE, mean over (E, S), against the selection;
    - inverse: row e*K + slot of each selected (e, s), else -1;
    - kth: each row's K-th largest value (rows [E, 2E): the predictor's, for the threshold EMA);
    - stats: entropy sum of the scores, true positives, predicted positives (thresholds as given);
    - stacked: rows [0, E) the scores, [E, 2E) the predictor probabilities.
    Gradients flow to the gate logits through `weight` and to the predictor logits through `loss`.
    `options`: the kernels' block sizes and the select kernel's warps.
    """

    @staticmethod
    def forward(ctx, logits, pred_logits, thresholds, K: int, options: KernelOptions = DEFAULT):
        S, E = logits.shape
        device = logits.device
        block_s = options.router_tail_block
        thresholds = thresholds.float().contiguous()
        stacked = torch.empty(2 * E, S, dtype=torch.float32, device=device)
        blocks = triton.cdiv(S, block_s)
        partial = torch.empty(blocks, 3, dtype=torch.float32, device=device)
        _tail_forward_kernel[(blocks,)](logits, pred_logits, thresholds, stacked, partial, S,
                                        logits.stride(0), logits.stride(1), pred_logits.stride(0),
                                        pred_logits.stride(1), E=E, E_P=triton.next_power_of_2(E), BLOCK_S=block_s)
        weight, index, inverse, kth, row_stats = select(stacked, pred_logits, thresholds, K, options)
        loss = torch.empty((), dtype=torch.float32, device=device)
        stats = torch.empty(3, dtype=torch.float64, device=device)
        _tail_finalize_kernel[(1,)](partial, row_stats, loss, stats, blocks, E * S, E=E,
                                    E_P=triton.next_power_of_2(E), BLOCK_B=128)
        ctx.save_for_backward(stacked, inverse)
        ctx.block_s = block_s
        ctx.dtypes = (logits.dtype, pred_logits.dtype)
        ctx.mark_non_differentiable(index, inverse, kth, stats, stacked)
        return weight, loss, index, inverse, kth, stats, stacked

    @staticmethod
    def backward(ctx, grad_weight, grad_loss, *_):
        stacked, inverse = ctx.saved_tensors
        E, S = inverse.shape
        device = stacked.device
        # (autograd materialises the gradient of an unused output as zeros)
        grad_weight, grad_loss = grad_weight.float().contiguous(), grad_loss.float()
        grad_logits = torch.empty(S, E, dtype=ctx.dtypes[0], device=device)
        grad_pred = torch.empty(S, E, dtype=ctx.dtypes[1], device=device)
        _tail_backward_kernel[(triton.cdiv(S, ctx.block_s),)](
            stacked, inverse, grad_weight, grad_loss, grad_logits, grad_pred, S, grad_logits.stride(0),
            grad_logits.stride(1), grad_pred.stride(0), grad_pred.stride(1), 1.0 / (E * S),
            E=E, E_P=triton.next_power_of_2(E), BLOCK_S=ctx.block_s)
        return grad_logits, grad_pred, None, None, None


__all__ = ["DiffMoETail", "fused_tail_usable"]
