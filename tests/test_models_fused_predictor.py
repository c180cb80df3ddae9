"""DiffMoE's fused capacity predictor (moedit/models/fused_predictor.py) against its three modules.

Same weights and input through `predictor_logits` in float32 and through nn.Sequential(Linear, SiLU,
Linear) in float64: logits and every weight and bias gradient to 1e-5 (relative to each tensor's
largest entry; summation order differs), at shapes that leave partial tiles
(D not a multiple of the 128-column tile, S of the row tiles, E below tl.dot's 16). Runs on CUDA,
or on CPU through Triton's interpreter where Triton is installed (skipped without it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from moedit.models.fused_predictor import gate_and_predictor, predictor_logits, predictor_usable  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _predictor(D: int, E: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E)).to(DEVICE)
    for p in predictor.parameters():  # nonzero biases, so a dropped bias term shows
        nn.init.normal_(p, std=0.5)
    return predictor


def _logits_and_grads(predictor: nn.Sequential, x: torch.Tensor, probe: torch.Tensor, fused: bool):
    predictor.zero_grad()
    x = x.clone().requires_grad_(True)
    z = predictor_logits(predictor, x) if fused else predictor(x.detach())
    (z * probe).sum().backward()
    return z.detach(), {n: p.grad.clone() for n, p in predictor.named_parameters()}, x.grad


# the default tiles (the logits split over column ranges), and small ones with one program per row block
SMALL_TILES = {"head": (16, 32, 1, 4, 3), "backward": (16, 32, 4, 4)}


@pytest.mark.parametrize("tokens, hidden, experts, tiles", [(96, 48, 4, None), (200, 160, 16, None),
                                                            (130, 64, 8, None), (130, 160, 16, SMALL_TILES)])
def test_fused_predictor_matches_the_modules(tokens, hidden, experts, tiles, rerun_in_triton_interpreter,
                                             monkeypatch):
    if rerun_in_triton_interpreter():
        return
    import moedit.models.fused_predictor as fused_predictor

    for name, tile in (tiles or {}).items():
        monkeypatch.setitem(fused_predictor.TILES, name, tile)
    predictor = _predictor(hidden, experts, seed=tokens)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE)
    probe = torch.randn(tokens, experts, generator=g).to(DEVICE)
    assert predictor_usable(x)
    z, grads, x_grad = _logits_and_grads(predictor, x, probe, fused=True)
    z_ref, grads_ref, _ = _logits_and_grads(predictor.double(), x.double(), probe.double(), fused=False)
    assert z.dtype == torch.float32 and z.shape == (tokens, experts)
    assert x_grad is None  # the predictor reads a detached input: nothing flows into the backbone
    for name, value, ref in [("logits", z, z_ref)] + [(n, grads[n], grads_ref[n]) for n in grads_ref]:
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def _gate_outputs_and_grads(gate, predictor, x, probes, uses, fused: bool):
    """Outputs and gradients of sum(probe * output) over the used outputs of (logits, z, x)."""
    gate.zero_grad()
    predictor.zero_grad()
    x = x.clone().requires_grad_(True)
    if fused:
        outputs = (*gate_and_predictor(gate, predictor, x), x)
    else:
        outputs = (gate(x), predictor(x.detach()), x)
    loss = sum((outputs[i] * probes[i]).sum() for i in uses)
    loss.backward()
    grads = {f"gate.{n}": p.grad for n, p in gate.named_parameters()}
    grads.update({f"predictor.{n}": p.grad for n, p in predictor.named_parameters()})
    grads["x"] = x.grad
    return [o.detach() for o in outputs[:2]], grads


@pytest.mark.parametrize("tokens, hidden, experts, uses", [(96, 48, 4, (0, 1, 2)), (130, 160, 16, (0, 1, 2)),
                                                           (130, 64, 8, (0, 1)), (96, 48, 4, (1, 2))])
def test_gate_in_the_predictor_gemm_matches_the_modules(tokens, hidden, experts, uses, rerun_in_triton_interpreter):
    """`gate_and_predictor` (the gate's rows appended to the predictor's first GEMM) against an nn.Linear
    gate and the modules in float64: both logits, every weight gradient, and x's gradient (the gate's and
    a downstream use's, none from the predictor), also where x's downstream use or the gate logits are
    left out (the gate's gradient is then None)."""
    if rerun_in_triton_interpreter():
        return
    predictor = _predictor(hidden, experts, seed=tokens)
    gate = nn.Linear(hidden, experts, bias=False).to(DEVICE)
    nn.init.normal_(gate.weight, std=0.5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE)
    probes = [torch.randn(tokens, n, generator=g).to(DEVICE) for n in (experts, experts, hidden)]
    outputs, grads = _gate_outputs_and_grads(gate, predictor, x, probes, uses, fused=True)
    outputs_ref, grads_ref = _gate_outputs_and_grads(gate.double(), predictor.double(), x.double(),
                                                     [p.double() for p in probes], uses, fused=False)
    for name, value, ref in [("gate logits", outputs[0], outputs_ref[0]), ("predictor logits", outputs[1],
                                                                          outputs_ref[1])]:
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    for name, ref in grads_ref.items():
        if ref is None:  # the predictor's when its logits go unused
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
def test_fused_predictor_bf16_and_autocast_match_the_modules(autocast):
    """bf16 parameters, or float32 ones under autocast: the fused path keeps nn.Linear's dtypes, and its
    values match to bf16 rounding (float32 logits here against bf16 ones from the modules)."""
    D, E, S = 256, 16, 1024
    predictor = _predictor(D, E, seed=3)
    if not autocast:
        predictor = predictor.bfloat16()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(S, D, generator=g).to(DEVICE, torch.float32 if autocast else torch.bfloat16)
    probe = torch.randn(S, E, generator=g).to(DEVICE)
    results = []
    for fused in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            results.append(_logits_and_grads(predictor, x, probe, fused))
    (z_ref, grads_ref, _), (z, grads, _) = results
    torch.testing.assert_close(z, z_ref.float(), rtol=2e-2, atol=2e-2 * z_ref.abs().max().item())
    for name, ref in grads_ref.items():
        assert grads[name].dtype == ref.dtype == next(predictor.parameters()).dtype
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(grads[name].float(), ref.float(), rtol=3e-2, atol=3e-2 * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor cores and autocast: CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_gate_in_the_predictor_gemm_bf16_and_autocast(autocast):
    """The merged gate + predictor GEMM in bf16 (or float32 weights under autocast) against nn.Linear and
    the modules: logits and every gradient to bf16 rounding, gradients in the parameters' dtype and
    x's gradient in x's dtype."""
    D, E, S = 256, 16, 1024
    predictor = _predictor(D, E, seed=6)
    gate = nn.Linear(D, E, bias=False).to(DEVICE)
    nn.init.normal_(gate.weight, std=0.5)
    if not autocast:
        predictor, gate = predictor.bfloat16(), gate.bfloat16()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, D, generator=g).to(DEVICE, torch.float32 if autocast else torch.bfloat16)
    probes = [torch.randn(S, n, generator=g).to(DEVICE) for n in (E, E, D)]
    results = []
    for fused in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            results.append(_gate_outputs_and_grads(gate, predictor, x, probes, (0, 1, 2), fused))
    (outputs_ref, grads_ref), (outputs, grads) = results
    for value, ref in zip(outputs, outputs_ref):
        torch.testing.assert_close(value.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
    for name, ref in grads_ref.items():
        assert grads[name].dtype == ref.dtype, name
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(grads[name].float(), ref.float(), rtol=3e-2, atol=3e-2 * scale,
                                   msg=lambda m: f"{name}: {m}")
