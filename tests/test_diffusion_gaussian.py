"""Closed-form tests: data x ~ N(mu, Sigma), for which the exact velocity / epsilon predictor
(and the exact reverse variance) is analytic. Every sampler driven by it must reproduce mu and
Sigma; the training loss of the exact predictor must equal its analytic minimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from moedit.diffusion import DiffusionConfig, build_diffusion

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
ROT = torch.linalg.qr(torch.tensor([[1.0, 0.3, -0.2], [0.4, 1.0, 0.5], [-0.1, 0.2, 1.0]], dtype=F64))[0]
LAM = torch.tensor([0.25, 1.0, 2.25], dtype=F64)  # eigenvalues of Sigma
SIGMA = ROT @ torch.diag(LAM) @ ROT.T
N = 4000



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def assert_gaussian(samples: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, z: float = 5.0):
    """Sample mean and covariance within z standard errors of (mu, sigma)."""
    n = samples.shape[0]
    mean_se = torch.sqrt(torch.diag(sigma) / n)
    assert torch.all((samples.mean(0) - mu).abs() < z * mean_se), (samples.mean(0), mu)
    var = torch.diag(sigma)
    cov_se = torch.sqrt((var[:, None] * var[None, :] + sigma ** 2) / n)
    assert torch.all((torch.cov(samples.T) - sigma).abs() < z * cov_se), (torch.cov(samples.T), sigma)


# --- rectified flow -----------------------------------------------------------------------------
class ExactVelocity:
    """E[x - noise | x_t] for x_t = t x + (1 - t) noise, x ~ N(MU, SIGMA). Works in Sigma's eigenbasis."""

    def __init__(self, mu=MU, rot=ROT, lam=LAM):
        self.mu, self.rot, self.lam = mu, rot, lam
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        t = t[:, None]
        z = (x - t * self.mu) @ self.rot  # (B, d) in the eigenbasis
        gain = (t * self.lam - (1 - t)) / (t ** 2 * self.lam + (1 - t) ** 2)
        return self.mu + (gain * z) @ self.rot.T


def flow_min_loss(t: float) -> float:
    """Analytic mean-over-dims E||v* - (x - noise)||^2 at time t: lam / (t^2 lam + (1 - t)^2)."""
    lam = LAM.numpy()
    return float(np.mean(lam / (t ** 2 * lam + (1 - t) ** 2)))


def exact_transport(noise):
    """The ODE's exact endpoint for this Gaussian: x_1 = mu + Sigma^(1/2) noise."""
    return MU + noise @ (ROT @ torch.diag(LAM.sqrt()) @ ROT.T)


@pytest.mark.parametrize("sampler,steps", [("euler", 100), ("heun", 25), ("euler_maruyama", 200)])
def test_flow_samplers_reproduce_gaussian(sampler, steps):
    flow = build_diffusion(DiffusionConfig(objective="flow"))
    noise = randn(N, 3, seed=0)
    out = flow.sample(ExactVelocity(), noise, None, steps=steps, sampler=sampler, generator=gen(1))
    assert_gaussian(out, MU, SIGMA)


def test_flow_ode_samplers_converge_to_exact_transport_at_their_order():
    flow = build_diffusion(DiffusionConfig(objective="flow"))
    noise = randn(500, 3, seed=2)
    target = exact_transport(noise)
    err = {(s, n): (flow.sample(ExactVelocity(), noise, None, steps=n, sampler=s) - target).abs().max().item()
           for s in ("euler", "heun") for n in (20, 40)}
    assert 1.7 < err["euler", 20] / err["euler", 40] < 2.3  # first order
    assert 3.4 < err["heun", 20] / err["heun", 40] < 4.6  # second order
    assert err["heun", 40] < 1e-3


def test_flow_ode_samplers_are_deterministic_and_sde_follows_its_generator():
    flow = build_diffusion(DiffusionConfig(objective="flow"))
    noise = randn(64, 3, seed=3)
    for sampler in ("euler", "heun"):
        a = flow.sample(ExactVelocity(), noise, None, steps=7, sampler=sampler, generator=gen(4))
        b = flow.sample(ExactVelocity(), noise, None, steps=7, sampler=sampler, generator=gen(5))
        assert torch.equal(a, b)
    sde = [flow.sample(ExactVelocity(), noise, None, steps=7, sampler="euler_maruyama", generator=gen(s))
           for s in (4, 4, 5)]
    assert torch.equal(sde[0], sde[1]) and not torch.allclose(sde[0], sde[2])


def test_heun_calls_the_model_twice_per_step():
    flow = build_diffusion(DiffusionConfig(objective="flow"))
    model = ExactVelocity()
    flow.sample(model, torch.zeros(2, 3, dtype=F64), None, steps=9, sampler="heun")
    assert model.calls == 18


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_flow_loss_of_exact_predictor_is_the_analytic_minimum_at_fixed_t(t):
    flow = build_diffusion(DiffusionConfig(objective="flow"))
    n = 20000
    x = MU + randn(n, 3, seed=6) @ (ROT @ torch.diag(LAM.sqrt()) @ ROT.T)
    noise = randn(n, 3, seed=7)
    tt = torch.full((n,), t, dtype=F64)
    per_sample = flow.loss_terms(ExactVelocity(), x, None, tt, noise)["mse"]
    se = per_sample.std().item() / math.sqrt(n)
    assert abs(per_sample.mean().item() - flow_min_loss(t)) < 5 * se
    # a predictor off by delta pays delta^2 more: the exact one is the minimum
    shifted = flow.loss_terms(lambda a, b, c: ExactVelocity()(a, b, c) + 0.3, x, None, tt, noise)["mse"]
    assert abs((shifted - per_sample).mean().item() - 0.09) < 5 * 0.6 * math.sqrt(flow_min_loss(t) / n)


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_flow_training_loss_of_exact_predictor_matches_integral_over_t(t_sampling):
    cfg = DiffusionConfig(objective="flow", t_sampling=t_sampling, t_mean=0.4, t_std=0.8)
    flow = build_diffusion(cfg)
    n = 40000
    x = MU + randn(n, 3, seed=8) @ (ROT @ torch.diag(LAM.sqrt()) @ ROT.T)
    per_sample = flow.loss_terms(ExactVelocity(), x, None, flow.draw_t(n, gen(9), x),
                                 randn(n, 3, seed=10))["mse"]
    if t_sampling == "uniform":
        density = lambda t: 1.0
    else:  # t = sigmoid(m + s n): logit-normal density
        density = lambda t: math.exp(-(math.log(t / (1 - t)) - 0.4) ** 2 / (2 * 0.64)) / (
            0.8 * math.sqrt(2 * math.pi) * t * (1 - t))
    expected = integrate.quad(lambda t: flow_min_loss(t) * density(t), 0, 1, limit=200)[0]
    se = per_sample.std().item() / math.sqrt(n)
    assert abs(per_sample.mean().item() - expected) < 5 * se
    losses = flow.training_losses(ExactVelocity(), x[:1000], None, generator=gen(11))
    assert set(losses) == {"loss", "mse"} and torch.equal(losses["loss"], losses["mse"])


# --- DDPM ---------------------------------------------------------------------------------------
LAM_DIAG = torch.tensor([0.2, 0.6, 1.0], dtype=F64)  # diagonal Sigma <= 1: the exact reverse variance is in the model's range


class ExactEps:
    """E[eps | x_t] for data N(mu, diag(lam)) (or full Sigma via rot); with `learned=True` it also
    outputs v for the exact per-dimension reverse variance of the chain `schedule`."""

    def __init__(self, diffusion, mu, lam, rot=None, schedule=None, learned=False):
        self.d, self.mu, self.lam = diffusion, mu, lam
        self.rot = torch.eye(len(lam), dtype=F64) if rot is None else rot
        self.s = schedule or diffusion.full
        self.learned = learned
        self.seen_t = []

    def __call__(self, x, t, y):
        self.seen_t.append(t[0].item())
        abar = torch.as_tensor(self.d.full.alphas_cumprod)[t.long()][:, None]  # original index
        z = (x - abar.sqrt() * self.mu) @ self.rot
        eps = ((1 - abar).sqrt() / (abar * self.lam + 1 - abar) * z) @ self.rot.T
        if not self.learned:
            return eps
        k = torch.as_tensor(np.searchsorted(self.s.timestep_map, t.long().numpy()))  # chain position
        var_x0 = self.lam * (1 - abar) / (abar * self.lam + 1 - abar)  # Var(x_0 | x_t), per dim
        take = lambda a: torch.as_tensor(a)[k][:, None]
        best = take(self.s.posterior_variance) + take(self.s.posterior_mean_coef1) ** 2 * var_x0
        lo, hi = take(self.s.posterior_log_variance_clipped), take(np.log(self.s.betas))
        frac = ((best.log() - lo) / (hi - lo)).clamp(0, 1).expand_as(x)
        return torch.cat([eps, 2 * frac - 1], dim=1)


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("linear", 10), ("cosine", 10), ("cosine", 3)])
def test_ddpm_ancestral_with_exact_mean_and_variance_reproduces_gaussian(schedule, steps):
    # With the exact reverse kernel every step is exact, whatever the respacing.
    diffusion = build_diffusion(DiffusionConfig(objective="ddpm", noise_schedule=schedule))
    mu = torch.tensor([0.3, -0.5, 1.0], dtype=F64)
    model = ExactEps(diffusion, mu, LAM_DIAG, schedule=diffusion.schedule(steps), learned=True)
    noise = randn(N, 3, seed=12)
    out = diffusion.sample(model, noise, None, steps=steps, sampler="ddpm", generator=gen(13))
    assert_gaussian(out, mu, torch.diag(LAM_DIAG))
    # the model saw the original step indices of the respaced chain, from noisy to clean
    assert model.seen_t == [float(i) for i in diffusion.schedule(steps).timestep_map[::-1]]


def test_ddpm_ancestral_fixed_variance_and_ddim_reproduce_gaussian():
    diffusion = build_diffusion(DiffusionConfig(objective="ddpm"))
    noise = randn(N, 3, seed=14)
    ancestral = diffusion.sample(ExactEps(diffusion, MU, LAM, ROT), noise, None, steps=250, sampler="ddpm",
                                 generator=gen(15))
    assert_gaussian(ancestral, MU, SIGMA)
    ddim = diffusion.sample(ExactEps(diffusion, MU, LAM, ROT), noise, None, steps=100, sampler="ddim")
    assert_gaussian(ddim, MU, SIGMA)
    again = diffusion.sample(ExactEps(diffusion, MU, LAM, ROT), noise, None, steps=100, sampler="ddim",
                             generator=gen(16))
    assert torch.equal(ddim, again)


@pytest.mark.parametrize("k", [1, 50, 400, 999])
def test_ddpm_loss_terms_of_exact_predictor_are_analytic(k):
    diffusion = build_diffusion(DiffusionConfig(objective="ddpm"))
    n, mu = 20000, torch.tensor([0.3, -0.5, 1.0], dtype=F64)
    x0 = mu + randn(n, 3, seed=17) * LAM_DIAG.sqrt()
    t = torch.full((n,), k)
    terms = diffusion.loss_terms(ExactEps(diffusion, mu, LAM_DIAG, learned=True), x0, None, t,
                                 randn(n, 3, seed=18))
    abar = diffusion.full.alphas_cumprod[k]
    lam = LAM_DIAG.numpy()
    expected_mse = np.mean(abar * lam / (abar * lam + 1 - abar))  # tr Cov(eps | x_t) / d
    # E KL(q(x_{k-1}|x_k,x_0) || exact reverse) = 0.5 log(var* / posterior var), per dim
    post = diffusion.full.posterior_variance[k]
    best = post + diffusion.full.posterior_mean_coef1[k] ** 2 * lam * (1 - abar) / (abar * lam + 1 - abar)
    expected_vb = np.mean(0.5 * np.log(best / post)) / math.log(2)
    for name, expected in (("mse", expected_mse), ("vb", expected_vb)):
        se = terms[name].std().item() / math.sqrt(n)
        assert abs(terms[name].mean().item() - expected) < 5 * se + 1e-12, name


def test_one_step_samplers_return_the_posterior_mean():
    # One step from pure noise lands on E[x | noise]: mu for flow (t = 0 carries no data),
    # E[x_0 | x_{T-1}] for DDPM and DDIM.
    noise = randn(50, 3, seed=19)
    flow = build_diffusion(DiffusionConfig(objective="flow"))
    torch.testing.assert_close(flow.sample(ExactVelocity(), noise, None, steps=1, sampler="euler"),
                               MU.expand(50, 3), rtol=0, atol=1e-12)
    diffusion = build_diffusion(DiffusionConfig(objective="ddpm"))
    abar = diffusion.full.alphas_cumprod[-1]
    cov = abar * SIGMA + (1 - abar) * torch.eye(3, dtype=F64)
    expected = MU + (noise - math.sqrt(abar) * MU) @ torch.linalg.solve(cov, math.sqrt(abar) * SIGMA)
    for sampler in ("ddpm", "ddim"):
        out = diffusion.sample(ExactEps(diffusion, MU, LAM, ROT), noise, None, steps=1, sampler=sampler,
                               generator=gen(20))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
