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

from moedit.models.fused_predictor import predictor_logits, predictor_usable  # noqa: E402

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
