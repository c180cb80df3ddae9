"""adaLN-Zero's elementwise pieces, compiled into one fused kernel each (forward and backward) on CUDA.

Every DiT block modulates a LayerNorm with a per-sample shift and scale and adds its branch back
through a per-sample gate. Eager PyTorch runs each as a chain of generic broadcast kernels, and
with their backward reductions they took about a quarter of a DiT-XL/2 step on an H100. Both
the single-device block (`moedit.models.dit.DiTBlock`, (B, T, D) with (B, 1, D) vectors) and
Megatron's layer ([s, b, h] with [1, b, h] vectors) call these; off CUDA, with
`KernelOptions.compiled_adaln = False`, or inside an outer torch.compile region, the eager
function runs (same math; on CPU bitwise the unfused block's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ln_modulate_eager(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension without affine, then * (1 + scale) + shift (broadcast)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def gated_residual_eager(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + gate * (y + bias), gate broadcast over the tokens."""
    return x + gate * (y if bias is None else y + bias)


# Inductor options. multi_kernel: a row reduction wider than 1024 (the LayerNorm over DiT-XL's 1152
# channels) also gets a one-pass kernel, and the faster of the two is kept after timing both on the
# first calls (the looped kernel alone: 9.3 ms of a DiT-XL/2 step on an H100, one pass: 4.1 ms). No
# FX graph cache: in torch 2.11 a process that loads such kernels from it fails (TypeError in
# MultiKernelCall.load_cache), so each process compiles them afresh.
COMPILE_OPTIONS = {"triton.multi_kernel": 1, "fx_graph_cache": False}


class OnCuda:
    """`fn` compiled (static shapes: one compile per shape) for CUDA tensors, eager elsewhere and
    when called with `compiled=False` or from inside an outer compiled region (which fuses it
    itself)."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled_fn = None

    def __call__(self, x: torch.Tensor, *args, compiled: bool = True):
        if not (compiled and x.is_cuda) or torch.compiler.is_compiling():
            return self.fn(x, *args)
        if self.compiled_fn is None:
            self.compiled_fn = torch.compile(self.fn, dynamic=False, options=dict(COMPILE_OPTIONS))
        return self.compiled_fn(x, *args)


ln_modulate = OnCuda(ln_modulate_eager)
gated_residual = OnCuda(gated_residual_eager)

__all__ = ["COMPILE_OPTIONS", "OnCuda", "gated_residual", "gated_residual_eager", "ln_modulate", "ln_modulate_eager"]
