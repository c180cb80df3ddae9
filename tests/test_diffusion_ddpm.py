"""DDPM schedule, forward process, posterior and VLB term against independent float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from moedit.diffusion import DiffusionConfig, build_diffusion
from moedit.diffusion.ddpm import respaced_indices

T = 1000


def ddpm(**kw):
    return build_diffusion(DiffusionConfig(objective="ddpm", **kw))


def abar_reference(schedule: str) -> np.ndarray:
    """abar_t by direct products (linear) or the cosine closed form f(t+1)/f(0) where unclipped."""
    if schedule == "linear":
        betas = 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1)
        return np.array([np.prod(1 - betas[: i + 1]) for i in range(T)])
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([f(i + 1) / f(0) for i in range(T)])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_matches_closed_form(schedule):
    d = ddpm(noise_schedule=schedule)
    ref = abar_reference(schedule)
    # the cosine betas are clipped at 0.999 only at the very last steps
    upto = T if schedule == "linear" else int(np.argmax(d.base_betas >= 0.999) or T)
    assert upto > 990
    np.testing.assert_allclose(d.full.alphas_cumprod[:upto], ref[:upto], rtol=1e-10)
    if schedule == "linear":
        assert d.base_betas[0] == pytest.approx(1e-4) and d.base_betas[-1] == pytest.approx(0.02)


def test_q_moments_and_q_sample():
    d = ddpm()
    x0 = torch.randn(6, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([0, 1, 10, 500, 998, 999])
    abar = abar_reference("linear")[k.numpy()]
    mean, var, log_var = d.q_mean_variance(x0, k)
    expect_mean = torch.as_tensor(np.sqrt(abar)).view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(mean, expect_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var.flatten().numpy(), 1 - abar, rtol=1e-12)
    np.testing.assert_allclose(log_var.flatten().numpy(), np.log(1 - abar), rtol=1e-12)
    noise = torch.randn_like(x0)
    x_t = d.q_sample(x0, k, noise)
    torch.testing.assert_close(x_t, expect_mean + torch.as_tensor(np.sqrt(1 - abar)).view(-1, 1, 1, 1) * noise,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_by_completing_the_square(schedule):
    # q(x_{k-1} | x_k, x_0) ∝ N(x_k; sqrt(a_k) x_{k-1}, b_k) N(x_{k-1}; sqrt(abar_{k-1}) x_0, 1 - abar_{k-1})
    d = ddpm(noise_schedule=schedule)
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=g), torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=g)
    k = torch.tensor([1, 2, 100, 700, 999])
    mean, var, log_var = d.q_posterior(x0, x_t, k)
    b = d.base_betas[k.numpy()]
    abar_prev = np.cumprod(1 - d.base_betas)[k.numpy() - 1]
    precision = (1 - b) / b + 1 / (1 - abar_prev)
    ref_var = 1 / precision
    col = lambda a: torch.as_tensor(a).view(-1, 1, 1, 1)
    ref_mean = col(ref_var) * (col(np.sqrt(1 - b) / b) * x_t + col(np.sqrt(abar_prev) / (1 - abar_prev)) * x0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var.flatten().numpy(), ref_var, rtol=1e-10)
    np.testing.assert_allclose(log_var.flatten().numpy(), np.log(ref_var), rtol=1e-10)
    # at k = 0 the posterior is a point mass at x_0: coefficient 1 on x_0, clipped log variance from k = 1
    m0, v0, lv0 = d.q_posterior(x0, x_t, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(m0, x0, rtol=1e-12, atol=1e-14)
    assert torch.all(v0 == 0) and torch.allclose(lv0, torch.tensor(math.log(d.full.posterior_variance[1]), dtype=torch.float64))


def test_vb_term_against_float64_reference():
    d = ddpm()
    g = torch.Generator().manual_seed(2)
    c = 2
    x0 = torch.rand(4, c, 3, 3, dtype=torch.float64, generator=g) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the edge bins
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    k = torch.tensor([0, 3, 250, 999])
    x_t = d.q_sample(x0, k, noise)
    out = torch.cat([torch.randn(x0.shape, dtype=torch.float64, generator=g) * 0.5,
                     torch.rand(x0.shape, dtype=torch.float64, generator=g) * 2 - 1], dim=1)
    got = d.vb_term(x0, x_t, k, out).numpy()

    x0n, xtn, eps, v = x0.numpy(), x_t.numpy(), out[:, :c].numpy(), out[:, c:].numpy()
    betas = d.base_betas
    abar = np.cumprod(1 - betas)
    for i, step in enumerate(k.tolist()):
        ab = abar[step]
        ab_prev = abar[step - 1] if step > 0 else 1.0
        post_var = betas[step] * (1 - ab_prev) / (1 - ab)
        post_var_k1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
        lo = np.log(post_var if step > 0 else post_var_k1)
        model_var = np.exp((v[i] + 1) / 2 * np.log(betas[step]) + (1 - (v[i] + 1) / 2) * lo)
        pred_x0 = (xtn[i] - np.sqrt(1 - ab) * eps[i]) / np.sqrt(ab)
        coef1 = np.sqrt(ab_prev) * betas[step] / (1 - ab)
        coef2 = np.sqrt(1 - betas[step]) * (1 - ab_prev) / (1 - ab)
        model_mean = coef1 * pred_x0 + coef2 * xtn[i]
        if step == 0:
            sd = np.sqrt(model_var)
            upper = np.where(x0n[i] > 0.999, np.inf, x0n[i] + 1 / 255)
            lower = np.where(x0n[i] < -0.999, -np.inf, x0n[i] - 1 / 255)
            prob = stats.norm.cdf(upper, model_mean, sd) - stats.norm.cdf(lower, model_mean, sd)
            expected = -np.mean(np.log(prob)) / np.log(2)
        else:
            true_mean = coef1 * x0n[i] + coef2 * xtn[i]
            kl = np.log(np.sqrt(model_var / post_var)) + (post_var + (true_mean - model_mean) ** 2) / (2 * model_var) - 0.5
            expected = np.mean(kl) / np.log(2)
        assert got[i] == pytest.approx(expected, rel=1e-9), step


def test_vb_term_trains_only_the_variance():
    # the VLB term sees the predicted mean through a stop-gradient (improved DDPM / DiT)
    d = ddpm()
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    eps_param = torch.full((1, 2, 2, 2), 0.1, dtype=torch.float64, requires_grad=True)
    v_param = torch.full((1, 2, 2, 2), 0.2, dtype=torch.float64, requires_grad=True)
    model = lambda x, t, y: torch.cat([eps_param.expand_as(x), v_param.expand_as(x)], dim=1)
    terms = d.loss_terms(model, x0, None, torch.tensor([5, 40, 900]), torch.randn_like(x0))
    grad_eps, grad_v = torch.autograd.grad(terms["vb"].sum(), [eps_param, v_param], retain_graph=True,
                                           allow_unused=True)
    assert _zero(grad_eps) and grad_v.abs().sum() > 0
    grad_eps, grad_v = torch.autograd.grad(terms["mse"].sum(), [eps_param, v_param], allow_unused=True)
    assert grad_eps.abs().sum() > 0 and _zero(grad_v)


def _zero(grad):
    return grad is None or bool(torch.all(grad == 0))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 250, 999, 1000])
def test_respacing_keeps_alpha_bar_at_kept_steps(schedule, steps):
    d = ddpm(noise_schedule=schedule)
    s = d.schedule(steps)
    kept = s.timestep_map
    assert len(kept) == steps and kept[-1] == T - 1 and np.all(np.diff(kept) > 0)
    # betas = 1 - abar ratios: float64 keeps abar to ~1e-16 absolute, however small abar gets
    np.testing.assert_allclose(s.alphas_cumprod, d.full.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
    if steps > 1:
        assert kept[0] == 0
        # evenly spread: gaps differ by at most one step
        assert np.ptp(np.diff(kept)) <= 1


def test_respaced_indices_reject_bad_counts():
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="steps"):
            respaced_indices(T, bad)
