"""DiffMoE's gate and capacity predictor fused (moedit/models/kernels/predictor.py) against the modules.

Same weights and input through `gate_and_predictor` in float32 and through an nn.Linear gate and
nn.Sequential(Linear, SiLU, Linear) on the detached input in float64: both logits and every
gradient (gate, predictor, x) to 1e-5 (relative to each tensor's largest entry; summation order
differs), at shapes that leave partial tiles (D not a multiple of the 128-column tile, S of the row
tiles, E below tl.dot's 16) and with small tiles (one program per row block). Runs on CUDA, or on
CPU through Triton's interpreter where Triton is installed (skipped without it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from moedit.models.kernels import KernelOptions  # noqa: E402
from moedit.models.kernels.predictor import gate_and_predictor, predictor_usable  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# the default tiles (the logits split over column ranges), and small ones with one program per row block
SMALL_TILES = KernelOptions(predictor_head_tile=(16, 32, 1, 4, 3), predictor_backward_tile=(16, 32, 4, 4))


def _modules(D: int, E: int, seed: int) -> tuple[nn.Linear, nn.Sequential]:
    torch.manual_seed(seed)
    gate = nn.Linear(D, E, bias=False).to(DEVICE)
    predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E)).to(DEVICE)
    for p in [*gate.parameters(), *predictor.parameters()]:  # nonzero biases, so a dropped bias term shows
        nn.init.normal_(p, std=0.5)
    return gate, predictor


def _outputs_and_grads(gate, predictor, x, probes, uses, fused: bool, options: KernelOptions = KernelOptions()):
    """Outputs and gradients of sum(probe * output) over the used outputs of (gate logits, predictor
    logits, x) (x standing for the pool's use downstream, whose gradient autograd adds to the gate's)."""
    gate.zero_grad()
    predictor.zero_grad()
    x = x.clone().requires_grad_(True)
    if fused:
        outputs = (*gate_and_predictor(gate, predictor, x, options), x)
    else:
        outputs = (gate(x), predictor(x.detach()), x)
    loss = sum((outputs[i] * probes[i]).sum() for i in uses)
    loss.backward()
    grads = {f"gate.{n}": p.grad for n, p in gate.named_parameters()}
    grads.update({f"predictor.{n}": p.grad for n, p in predictor.named_parameters()})
    grads["x"] = x.grad
    return [o.detach() for o in outputs[:2]], grads


@pytest.mark.parametrize("tokens, hidden, experts, uses, tiles", [
    (96, 48, 4, (0, 1, 2), None), (200, 160, 16, (0, 1, 2), None), (130, 64, 8, (0, 1), None),
    (130, 160, 16, (0, 1, 2), SMALL_TILES), (96, 48, 4, (1, 2), None), (96, 48, 4, (0, 2), None)])
def test_gate_and_predictor_match_the_modules(tokens, hidden, experts, uses, tiles, rerun_in_triton_interpreter):
    """Also where x's downstream use, the gate logits or the predictor logits go unused (the unused
    side's parameters then get no gradient, as from the modules)."""
    if rerun_in_triton_interpreter():
        return
    gate, predictor = _modules(hidden, experts, seed=tokens)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE)
    probes = [torch.randn(tokens, n, generator=g).to(DEVICE) for n in (experts, experts, hidden)]
    assert predictor_usable(x)
    outputs, grads = _outputs_and_grads(gate, predictor, x, probes, uses, fused=True, options=tiles or KernelOptions())
    outputs_ref, grads_ref = _outputs_and_grads(gate.double(), predictor.double(), x.double(),
                                                [p.double() for p in probes], uses, fused=False)
    assert outputs[1].dtype == torch.float32 and outputs[1].shape == outputs[0].shape == (tokens, experts)
    for name, value, ref in [("gate logits", outputs[0], outputs_ref[0]),
                             ("predictor logits", outputs[1], outputs_ref[1])]:
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    for name, ref in grads_ref.items():
        if ref is None:  # the parameters of an unused output
            assert grads[name] is None, name
            continue
        torch.testing.assert_close(grads[name].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_fused_predictor_is_used_where_it_runs_and_not_for_float64():
    assert not predictor_usable(torch.zeros(2, 2, dtype=torch.float64, device=DEVICE))
    import os

    assert predictor_usable(torch.zeros(2, 2, device=DEVICE)) == (
        DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor cores and autocast: CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_gate_and_predictor_bf16_and_autocast(autocast):
    """bf16 parameters, or float32 ones under autocast: the fused path keeps nn.Linear's dtypes
    (gradients in the parameters' dtype, x's in x's), and its values match the modules to bf16
    rounding (float32 predictor logits against bf16 ones from the modules)."""
    D, E, S = 256, 16, 1024
    gate, predictor = _modules(D, E, seed=6)
    if not autocast:
        predictor, gate = predictor.bfloat16(), gate.bfloat16()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, D, generator=g).to(DEVICE, torch.float32 if autocast else torch.bfloat16)
    probes = [torch.randn(S, n, generator=g).to(DEVICE) for n in (E, E, D)]
    results = []
    for fused in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            results.append(_outputs_and_grads(gate, predictor, x, probes, (0, 1, 2), fused))
    (outputs_ref, grads_ref), (outputs, grads) = results
    for value, ref in zip(outputs, outputs_ref):
        torch.testing.assert_close(value.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
    for name, ref in grads_ref.items():
        assert grads[name].dtype == ref.dtype, name
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(grads[name].float(), ref.float(), rtol=3e-2, atol=3e-2 * scale,
                                   msg=lambda m: f"{name}: {m}")
