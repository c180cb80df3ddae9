"""moedit's foreach drop-ins for Megatron's gradient norm and scaling (moedit/engines/megatron/foreach.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from moedit.engines.megatron.foreach import foreach_l2_norm, foreach_scale, install_foreach_kernels  # noqa: E402


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(7, 3), (11,), (2, 5, 4), (1,)]]


def test_l2_norm_is_the_norm_of_everything():
    a, b = _tensors(0), _tensors(1)
    norm, per_tensor = foreach_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int), [a, b], False)
    expected = torch.cat([t.flatten() for t in a + b]).double().norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert torch.allclose(norm.double(), expected.reshape(1), rtol=1e-6)
    empty, _ = foreach_l2_norm(0, torch.zeros(1, dtype=torch.int), [[]], False)
    assert empty.tolist() == [0.0]


def test_scale_in_place_and_into_other_tensors():
    src = _tensors(2)
    before = [t.clone() for t in src]
    foreach_scale(0, None, [src, src], 0.25)  # in place (the gradient clip)
    assert all(torch.equal(t, 0.25 * b) for t, b in zip(src, before))
    dst = [torch.zeros_like(t, dtype=torch.bfloat16) for t in src]
    foreach_scale(0, None, [src, dst], 2.0)  # copy with a cast (main -> model params)
    assert all(torch.equal(d, (2.0 * s).to(torch.bfloat16)) for s, d in zip(src, dst))


def test_install_replaces_only_the_python_fallbacks():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    had_fallback = clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
    try:
        replaced = install_foreach_kernels()
        assert replaced == had_fallback  # without Apex / TE (as here) the fallback is what gets replaced
        assert clip_grads.l2_norm_impl is (foreach_l2_norm if had_fallback else clip_grads.l2_norm_impl)
        assert install_foreach_kernels() is False  # idempotent
    finally:
        if had_fallback:
            clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
            clip_grads.multi_tensor_scale_impl = utils.local_multi_tensor_scale
            from megatron.core.optimizer import optimizer

            optimizer.multi_tensor_scale_impl = utils.local_multi_tensor_scale
