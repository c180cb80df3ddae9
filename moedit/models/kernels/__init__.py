"""The MoE hot path's Triton kernels and CUDA-graph helpers, configured by one `KernelOptions`.

- `moe.py`: the combine and the dispatch backward as gather-sums over an (E, S) inverse map,
  fc1's bias inside a fused GELU, and the partial-sum reduction the other kernels use;
- `router_tail.py`: DiffMoE's training tail (softmax, sigmoid, top-K selection, BCE, statistics);
- `predictor.py`: DiffMoE's gate and capacity predictor in one GEMM and two kernels;
- `adaln.py`: adaLN-Zero's modulation and gated residual, each one compiled kernel on CUDA;
- `cuda_graph.py`: `graph_moe_layer`, `CUDAGraphStep`, `replay_time_us` (imported from there: it
  imports `moedit.models.moe`, which imports this package).

Every DiT block (single-device or Megatron), MoE layer, router and expert module holds a
`kernel_options` (a frozen `KernelOptions`,
given at construction, default `KernelOptions()`): which path runs and the kernels' tiles. The
defaults run the kernels where they run (CUDA with Triton; CPU tensors too under Triton's
interpreter) and the PyTorch reference elsewhere. `set_kernel_options(model, options)` sets one
object on every such module of a model (single-device or Megatron), `use_kernel_options` does so
for a `with` block and puts the previous ones back.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch versions
    import triton
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - depends on the install
    triton = None

COMBINE = ("auto", "gather", "index_add")
BIAS_GELU = ("auto", "fused", "baddbmm")
GROUPED_GEMM = ("auto", "grouped_mm", "padded")


@dataclass(frozen=True)
class KernelOptions:
    """Which implementation each piece of the MoE hot path uses, and the Triton kernels' tiles.

    Paths ("auto" and True: the fused version where it runs, else the PyTorch reference; both
    compute the same math):
    - `combine`: "gather" = the combine and the dispatch backward as gather-sums over the inverse
      map (Triton where it runs, its PyTorch reference elsewhere); "index_add" = index_add_.
    - `bias_gelu`: "fused" = fc1's bias applied inside the GELU (BiasGelu); "baddbmm" = in fc1's GEMM.
    - `grouped_gemm`: uneven expert groups through "grouped_mm" (torch._grouped_mm; "auto": bf16 on
      sm90+) or "padded" (pad to the largest group, one bmm).
    - `fused_router_tail`: DiffMoE's training tail in router_tail.py's kernels where they run (CUDA
      or the interpreter, float32/16-bit logits, z-loss off); False: the PyTorch reference.
    - `fused_predictor`: DiffMoE's gate and capacity predictor through predictor.py where it runs;
      False: the gate and the predictor's modules apart.
    - `compiled_adaln`: a DiT block's LayerNorm + modulation and its gated residuals as one
      compiled kernel each (adaln.py) on CUDA; False: the eager ops.

    Tiles (chosen on an H100 at DiffMoE-L shapes with benchmarks/moe_kernels.py and
    benchmarks/expert_gemm_variants.py; powers of two where they size a tl.arange):
    - `gather_sum_tile`: (tokens, columns, warps) per program of the gather-sum.
    - `combine_backward_tile`: (rows, columns per step, warps) of the combine's backward.
    - `bias_gelu_tile`, `bias_gelu_backward_tile`: (rows, columns, warps) per program (forward
      50.5 us, backward 78.5 us at E=16 against 82.2 us at 64 x 128).
    - `predictor_head_tile`: (rows per program, columns per step, column splits, warps, stages);
      `predictor_backward_tile`: (rows per step, columns per program, row slices, warps).
    - `router_tail_block`: tokens per program of the tail's forward and backward kernels;
      `router_select_chunk`: elements per chunk of the select kernel (a row up to this size stays
      in registers); `router_select_warps`: warps per select program, 0 = by chunk size.
    """

    combine: str = "auto"
    bias_gelu: str = "auto"
    grouped_gemm: str = "auto"
    fused_router_tail: bool = True
    fused_predictor: bool = True
    compiled_adaln: bool = True
    gather_sum_tile: tuple[int, int, int] = (2, 1024, 4)
    combine_backward_tile: tuple[int, int, int] = (8, 256, 4)
    bias_gelu_tile: tuple[int, int, int] = (32, 128, 4)
    bias_gelu_backward_tile: tuple[int, int, int] = (64, 64, 4)
    predictor_head_tile: tuple[int, int, int, int, int] = (64, 128, 8, 4, 3)
    predictor_backward_tile: tuple[int, int, int, int] = (32, 64, 64, 4)
    router_tail_block: int = 64
    router_select_chunk: int = 16384
    router_select_warps: int = 0

    def __post_init__(self) -> None:
        for name, choices in (("combine", COMBINE), ("bias_gelu", BIAS_GELU), ("grouped_gemm", GROUPED_GEMM)):
            if getattr(self, name) not in choices:
                raise ValueError(f"KernelOptions.{name} = {getattr(self, name)!r}: must be one of {', '.join(choices)}")
        for name in ("fused_router_tail", "fused_predictor", "compiled_adaln"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KernelOptions.{name} = {getattr(self, name)!r}: must be True or False")
        # (field, its length, the entries that size a tl.arange and so must be powers of two)
        tiles = (("gather_sum_tile", 3, (0, 1)), ("combine_backward_tile", 3, (0, 1)), ("bias_gelu_tile", 3, (0, 1)),
                 ("bias_gelu_backward_tile", 3, (0, 1)), ("predictor_head_tile", 5, (0, 1)),
                 ("predictor_backward_tile", 4, (0, 1)))
        for name, length, arange in tiles:
            tile = getattr(self, name)
            if (not isinstance(tile, tuple) or len(tile) != length
                    or not all(isinstance(v, int) and v >= 1 for v in tile)
                    or any(tile[i] & (tile[i] - 1) for i in arange)):
                raise ValueError(f"KernelOptions.{name} = {tile!r}: must be a tuple of {length} positive ints, "
                                 f"entries {', '.join(map(str, arange))} powers of two")
        for name, zero_ok in (("router_tail_block", False), ("router_select_chunk", False),
                              ("router_select_warps", True)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or (v == 0 and not zero_ok) or v & (v - 1):
                raise ValueError(f"KernelOptions.{name} = {v!r}: must be a power of two"
                                 f"{' or 0' if zero_ok else ''}")

    def replace(self, **changes) -> KernelOptions:
        """A copy with `changes` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


DEFAULT = KernelOptions()

if triton is not None:

    @triton.jit
    def _probe_kernel():
        pass

    # Whether Triton built its kernels for its interpreter (TRITON_INTERPRET=1 when it was imported):
    # then they run on CPU tensors too (the tests' interpreter runs). Asked of a kernel, not the
    # environment, so it matches what every kernel here was built as.
    INTERPRETED = not isinstance(_probe_kernel, JITFunction)
else:  # pragma: no cover - depends on the install
    INTERPRETED = False


def triton_usable(t: torch.Tensor, float64: bool = True) -> bool:
    """Whether the Triton kernels run for this tensor (Triton installed, CUDA or the interpreter, a
    dtype they take)."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32) + ((torch.float64,) if float64 else ())
    return triton is not None and (t.is_cuda or INTERPRETED) and t.dtype in dtypes


def _holders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "kernel_options", None), KernelOptions)]


def set_kernel_options(model: nn.Module, options: KernelOptions) -> int:
    """Give every module of `model` that holds kernel options (DiT blocks, MoE layers, routers,
    grouped experts; also inside Megatron's wrappers) `options`; returns how many there are."""
    if not isinstance(options, KernelOptions):
        raise TypeError(f"set_kernel_options: options must be a KernelOptions, got {type(options).__name__}")
    holders = _holders(model)
    for m in holders:
        m.kernel_options = options
    return len(holders)


@contextlib.contextmanager
def use_kernel_options(model: nn.Module, options: KernelOptions):
    """`set_kernel_options(model, options)` for a `with` block; each module's previous options come
    back after it (tests, benchmarks)."""
    saved = [(m, m.kernel_options) for m in _holders(model)]
    set_kernel_options(model, options)
    try:
        yield options
    finally:
        for m, previous in saved:
            m.kernel_options = previous


__all__ = ["DEFAULT", "INTERPRETED", "KernelOptions", "set_kernel_options", "triton_usable", "use_kernel_options"]
