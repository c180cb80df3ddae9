"""What DiffMoE's capacity predictor costs a layer step, and what a second CUDA stream would hide.

    python benchmarks/predictor_cost.py          # CUDA, bf16, DiffMoE-L shapes, E in {16, 8}

Each row is a DiffMoE layer step (forward + backward with its aux loss, one CUDA graph per step,
as benchmarks/moe_layer.py --cuda-graph step), divided by the dense FFN's:
- `as built`: the layer as it trains;
- `predictor removed (bound)`: the predictor's logits replaced by a constant tensor (no predictor
  GEMMs or kernels, no predictor gradient; the gate then runs as its own GEMM): a lower bound for
  any scheme that hides the predictor;
- `predictor on a side stream`: the constant logits feed the routing, while the real predictor
  (moedit/models/kernels/predictor.py's kernels, which compute the gate logits too: ~1.6% more GEMM work, those
  logits unused) runs forward and backward on a second stream,
  overlapping the routing and expert kernels; the step waits for it at the end of the forward.
The last two change what the layer computes (the routing no longer sees this step's predictor):
they measure, they are not a mode of the layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit` and `benchmarks`

from benchmarks.moe_layer import build_layer, make_context, make_step, time_fwd_bwd  # noqa: E402
from moedit.models.kernels import KernelOptions  # noqa: E402
from moedit.models.kernels.cuda_graph import CUDAGraphStep  # noqa: E402
from moedit.models.kernels.predictor import gate_and_predictor  # noqa: E402
from moedit.models.layers import GeluMLP  # noqa: E402


class _Constant(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, pool: torch.Tensor) -> torch.Tensor:
        return self.logits


class _SideStream(_Constant):
    """Returns the constant logits; runs the real predictor on a second stream (its loss in `loss`)."""

    def __init__(self, logits: torch.Tensor, predictor: nn.Module, gate: nn.Linear):
        super().__init__(logits)
        self.predictor, self.gate, self.stream, self.loss = predictor, gate, torch.cuda.Stream(), None

    def forward(self, pool: torch.Tensor) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # the layer's fused kernels (their gate logits unused here)
            self.loss = gate_and_predictor(self.gate, self.predictor, pool)[1].square().mean() * 1e-3
        return self.logits


def _with_constant_predictor(layer, x: torch.Tensor, side_stream: bool):
    """Patch `layer` (DiffMoE, gate and predictor apart) so its routing reads constant predictor
    logits; with side_stream, also run the real predictor on a second stream, joined after the layer."""
    router = layer.router
    # gate and predictor apart, so the predictor can be taken out
    router.kernel_options = router.kernel_options.replace(fused_predictor=False)
    with torch.no_grad():
        constant = router.capacity_predictor(x.reshape(-1, x.shape[-1])).clone()
    if not side_stream:
        router.capacity_predictor = _Constant(constant)
        return layer
    side = router.capacity_predictor = _SideStream(constant, router.capacity_predictor, router.gate)
    forward = layer.forward

    def joined(x, ctx):
        out = forward(x, ctx)
        torch.cuda.current_stream().wait_stream(side.stream)
        layer.last_aux = dict(layer.last_aux, side=side.loss)
        return out

    layer.forward = joined
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    D, T, B = 1024, 256, 32
    x = torch.randn(B, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    probe = torch.randn_like(x)
    ctx = make_context(B, device)
    dense = GeluMLP(D, 4 * D).to(device, torch.bfloat16)
    dense_s = time_fwd_bwd(CUDAGraphStep(make_step(dense, x, probe)), device, args.warmup, args.iters)
    print(f"{torch.cuda.get_device_name()}, bf16, D = {D}, S = {B * T}, torch {torch.__version__}; "
          f"dense FFN {dense_s * 1e3:.3f} ms")
    print("| E | DiffMoE layer | fwd+bwd ms | ratio to dense |\n|---|---|---|---|")
    for E in (16, 8):
        for label in ("as built", "predictor removed (bound)", "predictor on a side stream"):
            layer = build_layer("diffmoe", D, E, T).to(device, torch.bfloat16).train()
            if label != "as built":
                layer = _with_constant_predictor(layer, x, side_stream=label.endswith("stream"))
            step = CUDAGraphStep(make_step(layer, x, probe, ctx), restore=(layer,))
            t = time_fwd_bwd(step, device, args.warmup, args.iters)
            print(f"| {E} | {label} | {t * 1e3:.3f} | {t / dense_s:.3f} |")
            del step, layer


if __name__ == "__main__":
    main()
