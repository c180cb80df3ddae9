"""The log-space power-law engine: objective (a SUM of Huber terms), gradients, batched L-BFGS."""

import numpy as np
import pytest
from scipy.special import huber

from moedit.analysis.scaling.laws import APPROACH3, APPROACH3_GRID_SMALL, bootstrap_counts
from moedit.analysis.scaling.lse import (
    HUBER_DELTA, batched_lbfgs, bootstrap_lse, fit_lse, param_grid, polish_scipy,
)

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.'s published law


def chinchilla_like(n, seed, noise=0.01):
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7.0, 10.0, n)
    D = 10 ** rng.uniform(9.0, 12.0, n)
    L = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
    L = L * np.exp(noise * rng.standard_normal(n))
    return np.stack([np.log(N), np.log(D)], axis=1), np.log(L)


def reference_objective(theta, X, y):
    """Plain loop, scipy's Huber: sum_i huber(delta, LSE(a - alpha x_N, b - beta x_D, e) - y_i)."""
    a, b, e, alpha, beta = theta
    total = 0.0
    for (log_n, log_d), yi in zip(X, y):
        pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
        total += huber(HUBER_DELTA, pred - yi)
    return total


def test_objective_is_the_sum_of_huber_terms():
    X, y = chinchilla_like(40, seed=1)
    theta = np.array([6.0, 6.0, 0.5, 0.35, 0.3])
    value, grad = APPROACH3.objective(theta[None, :], X, y)
    assert value[0] == pytest.approx(reference_objective(theta, X, y), rel=1e-12)
    # Duplicating every run doubles a sum (a mean would stay put), and its gradient.
    value2, grad2 = APPROACH3.objective(theta[None, :], np.concatenate([X, X]), np.concatenate([y, y]))
    assert value2[0] == pytest.approx(2 * value[0], rel=1e-12)
    np.testing.assert_allclose(grad2, 2 * grad, rtol=1e-12)
    # Integer weights are the same as repeating runs (the bootstrap relies on it).
    weights = np.arange(1, 41, dtype=float) % 3
    repeated = np.repeat(np.arange(40), weights.astype(int))
    vw, gw = APPROACH3.objective(theta[None, :], X, y, weights)
    vr, gr = APPROACH3.objective(theta[None, :], X[repeated], y[repeated])
    assert vw[0] == pytest.approx(vr[0], rel=1e-12)
    np.testing.assert_allclose(gw, gr, rtol=1e-10)


def test_gradient_matches_finite_differences():
    X, y = chinchilla_like(30, seed=2, noise=0.05)  # residuals on both sides of delta
    thetas = np.array([[6.0, 6.0, 0.5, 0.35, 0.3], [5.0, 7.0, 0.3, 0.3, 0.4]])
    _, grad = APPROACH3.objective(thetas, X, y)
    step = 1e-6
    for p in range(5):
        bump = np.zeros(5)
        bump[p] = step
        up, _ = APPROACH3.objective(thetas + bump, X, y)
        down, _ = APPROACH3.objective(thetas - bump, X, y)
        np.testing.assert_allclose((up - down) / (2 * step), grad[:, p], rtol=1e-5, atol=1e-9)


def test_fit_is_at_least_as_good_as_scipy_from_every_start():
    X, y = chinchilla_like(50, seed=3)
    grid = param_grid(APPROACH3_GRID_SMALL, APPROACH3)[::4]  # 27 starts
    res = batched_lbfgs(lambda t, rows: APPROACH3.objective(t, X, y), grid)
    scipy_values = np.array([polish_scipy(APPROACH3, X, y, start)[1] for start in grid])
    # Both stop on the same default tolerances, so the batched screen lands close to scipy ...
    assert res["f"].min() <= scipy_values.min() * 1.02
    assert res["converged"].mean() > 0.9
    # ... and the kept fit (screen, scipy polish, tight refinement) is no worse than scipy's best.
    fit = fit_lse(APPROACH3, X, y, grid)
    assert fit.objective <= scipy_values.min() * (1 + 1e-9)


def test_fit_keeps_the_best_start_and_duplicated_data_gives_the_same_optimum():
    X, y = chinchilla_like(60, seed=4)
    grid = param_grid(APPROACH3_GRID_SMALL, APPROACH3)
    fit = fit_lse(APPROACH3, X, y, grid)
    fit2 = fit_lse(APPROACH3, np.concatenate([X, X]), np.concatenate([y, y]), grid)
    np.testing.assert_allclose(fit2.theta, fit.theta, rtol=1e-4, atol=1e-5)
    assert fit2.objective == pytest.approx(2 * fit.objective, rel=1e-6)
    # No start of the grid reaches a lower value than the kept one.
    starts = batched_lbfgs(lambda t, rows: APPROACH3.objective(t, X, y), grid)
    assert fit.objective <= starts["f"].min() * (1 + 1e-9)


def test_warm_started_bootstrap_reaches_the_grid_optimum_of_each_resample():
    X, y = chinchilla_like(60, seed=5, noise=0.02)
    grid = param_grid(APPROACH3_GRID_SMALL, APPROACH3)
    fit = fit_lse(APPROACH3, X, y, grid)
    counts = bootstrap_counts(len(y), 4, seed=0)
    boot = bootstrap_lse(APPROACH3, X, y, fit.theta, counts)
    for r in range(4):
        rows = np.repeat(np.arange(len(y)), counts[r])
        cold = fit_lse(APPROACH3, X[rows], y[rows], grid)
        assert boot["objective"][r] == pytest.approx(cold.objective, rel=1e-6)
        np.testing.assert_allclose(boot["theta"][r], cold.theta, rtol=1e-3, atol=1e-3)


def test_fewer_runs_than_parameters_is_refused():
    X, y = chinchilla_like(4, seed=6)
    with pytest.raises(ValueError, match="4 runs for 5 parameters"):
        fit_lse(APPROACH3, X, y, param_grid(APPROACH3_GRID_SMALL, APPROACH3))


def test_mean_objective_stops_early_where_the_sum_does_not():
    """The known pitfall: divide by n and scipy's default tolerances end L-BFGS early."""
    X, y = chinchilla_like(200, seed=7, noise=0.02)
    start = np.array([5.0, 5.0, 0.0, 0.5, 0.5])
    theta_sum, value_sum = polish_scipy(APPROACH3, X, y, start)
    theta_mean, _ = polish_scipy(APPROACH3, X, y, start, weights=np.full(len(y), 1.0 / len(y)))
    value_mean_as_sum = APPROACH3.objective(theta_mean[None, :], X, y)[0][0]
    assert value_mean_as_sum > value_sum * 1.01
