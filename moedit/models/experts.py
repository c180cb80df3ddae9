"""Routed experts stored as stacked weights and computed in one batched call.

Weights keep nn.Linear's (out, in) layout per expert, stacked on a leading expert axis, so an
official per-expert checkpoint (experts.i.fc1.weight, ...) imports with one torch.stack.

Two entry points:
- `forward_uniform(x (E, K, D))`: every expert has the same number of rows (expert choice, or
  token choice padded to a capacity): one bmm per projection.
- `forward_grouped(x (N, D), tokens_per_expert (E,))`: rows sorted by expert with uneven counts
  (dropless token choice, DiffMoE dynamic inference): `torch._grouped_mm` on CUDA for 16-bit
  dtypes, else a loop-free pad-to-max + bmm fallback (one host sync for the max count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moedit.models.kernels import KernelOptions, triton_usable
from moedit.models.kernels.moe import BiasGelu, expert_row_sum


GROUP_ALIGN = 8  # rows; 16 bytes of bf16


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    """Where torch._grouped_mm has a fast kernel: bf16 on Hopper-class (sm90+) CUDA."""
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


class ExpertLinear(torch.autograd.Function):
    """Per-expert Linear y = x W^T + b: x (E, K, in), weight (E, out, in), bias (E, out) or None.

    The backward is written out so the weight gradient is computed as grad^T x directly in the
    parameter's (E, out, in) layout. Autograd's bmm rule on `weight.transpose(1, 2)` yields the
    transposed layout, which AccumulateGrad then copies with a strided kernel: at DiffMoE-L, E=16,
    that copy (E x the dense weight, per projection) cost more than the projection's GEMM.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))  # (E, K, out)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None  # (E, K, in)
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None  # (E, out, in)
        grad_bias = expert_row_sum(grad, grad.shape[0]) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (E, out)
        return grad_x, grad_weight, grad_bias


class GroupedExperts(nn.Module):
    """E experts of type `gelu` (fc1/fc2 with biases) or `swiglu` (gate/up/down, no biases).

    `kernel_options` (default `KernelOptions()`): `grouped_gemm` "auto" = torch._grouped_mm where
    usable, else pad + bmm; `bias_gelu` "auto" = fc1's bias applied inside a fused GELU where Triton
    runs (no (E, K, F) broadcast copy for baddbmm), else baddbmm; and the fused GELU's tiles."""

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, ffn_type: str,
                 kernel_options: KernelOptions | None = None):
        super().__init__()
        E, D, Fh = num_experts, hidden_size, expert_hidden
        self.num_experts, self.ffn_type = E, ffn_type
        self.kernel_options = kernel_options or KernelOptions()
        if ffn_type == "gelu":
            self.fc1_weight = nn.Parameter(torch.empty(E, Fh, D))
            self.fc1_bias = nn.Parameter(torch.zeros(E, Fh))
            self.fc2_weight = nn.Parameter(torch.empty(E, D, Fh))
            self.fc2_bias = nn.Parameter(torch.zeros(E, D))
        else:
            self.gate_proj_weight = nn.Parameter(torch.empty(E, Fh, D))
            self.up_proj_weight = nn.Parameter(torch.empty(E, Fh, D))
            self.down_proj_weight = nn.Parameter(torch.empty(E, D, Fh))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform per expert (as DiT initialises every nn.Linear), zero biases."""
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                nn.init.zeros_(p)
            else:
                fan_out, fan_in = p.shape[1], p.shape[2]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(p, -bound, bound)

    def _weights(self, dtype: torch.dtype) -> list[torch.Tensor]:
        names = ("fc1_weight", "fc2_weight") if self.ffn_type == "gelu" else (
            "gate_proj_weight", "up_proj_weight", "down_proj_weight")
        return [getattr(self, n).to(dtype) for n in names]

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def output_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(E, D) bias of the last projection (gelu experts), None without one (swiglu)."""
        return self.fc2_bias.to(dtype) if self.ffn_type == "gelu" else None

    def forward_uniform(self, x: torch.Tensor, add_output_bias: bool = True) -> torch.Tensor:
        """(E, K, D) -> (E, K, D); with `add_output_bias=False` the caller adds `self.output_bias`
        (moe.py's combine does, inside its gather-sum)."""
        dtype = self.compute_dtype(x)
        x = x.to(dtype)
        if self.ffn_type == "gelu":
            w1, w2 = self._weights(dtype)
            options = self.kernel_options
            backend = options.bias_gelu
            if backend == "fused" or (backend == "auto" and triton_usable(x)):
                h = BiasGelu.apply(ExpertLinear.apply(x, w1, None), self.fc1_bias.to(dtype), options)  # (E, K, F)
            else:
                h = F.gelu(ExpertLinear.apply(x, w1, self.fc1_bias.to(dtype)), approximate="tanh")  # (E, K, F)
            return ExpertLinear.apply(h, w2, self.fc2_bias.to(dtype) if add_output_bias else None)  # (E, K, D)
        wg, wu, wd = self._weights(dtype)
        h = F.silu(ExpertLinear.apply(x, wg, None)) * ExpertLinear.apply(x, wu, None)  # (E, K, F)
        return ExpertLinear.apply(h, wd, None)

    def forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """(N, D) rows sorted by expert, counts (E,) summing to N -> (N, D)."""
        dtype = self.compute_dtype(x)
        x = x.to(dtype)
        backend = self.kernel_options.grouped_gemm
        if backend == "grouped_mm" or (backend == "auto" and _grouped_mm_usable(x)):
            return self._grouped_mm(x, tokens_per_expert)
        return self._padded(x, tokens_per_expert)

    def _expert_of_row(self, tokens_per_expert: torch.Tensor, num_rows: int) -> torch.Tensor:
        experts = torch.arange(self.num_experts, device=tokens_per_expert.device)
        return torch.repeat_interleave(experts, tokens_per_expert, output_size=num_rows)  # (N,)

    def _grouped_mm(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """torch._grouped_mm with every group starting on a multiple of GROUP_ALIGN rows.

        bf16 grouped GEMMs need 16-byte aligned group starts (the weight gradient contracts over
        rows), so rows are placed into a buffer of static size N + E * (GROUP_ALIGN - 1): no host
        sync. The last group absorbs the slack so every buffer row is computed (no garbage rows).
        """
        N, D = x.shape
        E, align = self.num_experts, GROUP_ALIGN
        rows = N + E * (align - 1)
        aligned = (tokens_per_expert + align - 1) // align * align  # (E,)
        ends = torch.cumsum(aligned, 0)
        starts = ends - aligned
        ends = torch.cat([ends[:-1], ends.new_full((1,), rows)])
        offs = ends.to(torch.int32)  # (E,) group ends
        row_expert = self._expert_of_row(tokens_per_expert, N)
        src_starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        dest = starts[row_expert] + torch.arange(N, device=x.device) - src_starts[row_expert]  # (N,)
        # index_copy_, not index_put: its backward is a gather, not a sort-based accumulate
        buffer = x.new_zeros(rows, D).index_copy_(0, dest, x)  # (rows, D)
        if self.ffn_type == "gelu":
            w1, w2 = self._weights(x.dtype)
            buffer_expert = torch.searchsorted(ends, torch.arange(rows, device=x.device), right=True)
            # per-row biases as one_hot @ bias inside addmm: the bias grad is one_hot^T @ grad, a small
            # GEMM instead of an index backward (sort-based or atomics onto E rows)
            one_hot = (buffer_expert.clamp(max=E - 1)[:, None] == torch.arange(E, device=x.device)).to(x.dtype)
            h = torch.addmm(torch._grouped_mm(buffer, w1.transpose(1, 2), offs=offs), one_hot,
                            self.fc1_bias.to(x.dtype))  # (rows, F)
            h = F.gelu(h, approximate="tanh")
            out = torch.addmm(torch._grouped_mm(h, w2.transpose(1, 2), offs=offs), one_hot, self.fc2_bias.to(x.dtype))
            return out.index_select(0, dest)  # (N, D)
        wg, wu, wd = self._weights(x.dtype)
        h = F.silu(torch._grouped_mm(buffer, wg.transpose(1, 2), offs=offs)) * torch._grouped_mm(
            buffer, wu.transpose(1, 2), offs=offs)
        return torch._grouped_mm(h, wd.transpose(1, 2), offs=offs).index_select(0, dest)

    def _padded(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        N, D = x.shape
        row_expert = self._expert_of_row(tokens_per_expert, N)  # (N,)
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert  # (E,)
        row_pos = torch.arange(N, device=x.device) - starts[row_expert]  # (N,) slot within its expert
        width = int(tokens_per_expert.max()) if N else 0  # host sync: fallback path only
        padded = x.new_zeros(self.num_experts, width, D).index_put((row_expert, row_pos), x)  # (E, M, D)
        return self.forward_uniform(padded)[row_expert, row_pos]  # (N, D)
