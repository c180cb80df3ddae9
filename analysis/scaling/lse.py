"""Sums of power laws fitted in log space: the engine behind every nonlinear scaling fit.

A law is a sum of positive terms, each a coefficient times a product of powers of
the features (N, D, C, G, ...). In log space every term is linear in the
parameters, so the predicted log loss is a log-sum-exp (LSE) of linear forms:

    log L_hat = LSE_j( theta[coef_j] - sum_{(p, f) in term_j} theta[p] * x_f ),   x_f = log feature f

The objective is the SUM over runs (weighted by bootstrap counts) of
Huber_delta(log L_hat - log L) with delta = 1e-3 (docs/scaling.md, "approach3"). Using the
mean instead makes every gradient n times smaller, so L-BFGS meets its
gradient tolerance far from the optimum; we keep the sum on purpose.

Speed: all starting points of an initialisation grid (or all bootstrap
resamples) are optimised at once by `batched_lbfgs`, a vectorised L-BFGS with a
backtracking Armijo line search in numpy float64 with analytic gradients. The
few best grid solutions are then polished with scipy's L-BFGS-B (same objective,
same gradient), and the best one is kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
# Warm-started solves stop on the gradient only. scipy's default ftol is relative to
# max(|f|, 1), and the summed Huber objective is ~1e-3, so from a start near the optimum
# it fires at once and the solver would hardly move (measured: bootstrap intervals
# collapsed to ~0.1% of their width).
TIGHT = {"ftol": 0.0, "gtol": 1e-10, "max_iter": 3000}


@dataclass(frozen=True)
class LseLaw:
    """A law log L = LSE over terms of (log-coefficient - sum exponent * log feature)."""

    name: str
    param_names: tuple[str, ...]
    """Parameters in the order of theta; log-coefficients and exponents mixed."""
    feature_names: tuple[str, ...]
    """Columns of X, each the natural log of a positive quantity."""
    terms: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    """Per term: (index of its log-coefficient, ((exponent index, feature index), ...))."""

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    def log_predict(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta (B, P), X (n, F) -> log L_hat (B, n) and the softmax over terms (B, n, J)."""
        theta = np.atleast_2d(theta)
        U = np.empty((theta.shape[0], X.shape[0], len(self.terms)))  # (B, n, J)
        for j, (coef, powers) in enumerate(self.terms):
            u = np.repeat(theta[:, coef, None], X.shape[0], axis=1)  # (B, n)
            for p, f in powers:
                u -= theta[:, p, None] * X[None, :, f]
            U[:, :, j] = u
        top = U.max(axis=2, keepdims=True)  # (B, n, 1): the max-shift keeps exp finite
        expd = np.exp(U - top)
        total = expd.sum(axis=2)  # (B, n)
        return top[:, :, 0] + np.log(total), expd / total[:, :, None]

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Loss (not log) for one parameter vector (P,) at features X (n, F) -> (n,)."""
        return np.exp(self.log_predict(np.asarray(theta)[None, :], X)[0][0])

    def objective(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
        delta: float = HUBER_DELTA,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Weighted SUM of Huber(log L_hat - y) and its gradient.

        theta (B, P); X (n, F); y (n,) log losses; weights None, (n,) or (B, n)
        -> values (B,), gradients (B, P).
        """
        theta = np.atleast_2d(theta)
        log_pred, soft = self.log_predict(theta, X)
        resid = log_pred - y[None, :]  # (B, n)
        absr = np.abs(resid)
        huber = np.where(absr <= delta, 0.5 * resid**2, delta * (absr - 0.5 * delta))
        psi = np.clip(resid, -delta, delta)  # d huber / d resid
        if weights is not None:
            huber = huber * weights
            psi = psi * weights
        values = huber.sum(axis=1)
        dU = psi[:, :, None] * soft  # (B, n, J): d objective / d term j at run i
        grad = np.zeros_like(theta)
        for j, (coef, powers) in enumerate(self.terms):
            grad[:, coef] += dU[:, :, j].sum(axis=1)
            for p, f in powers:
                grad[:, p] -= dU[:, :, j] @ X[:, f]
        return values, grad


def param_grid(axes: dict[str, list[float]], law: LseLaw) -> np.ndarray:
    """Cartesian product of per-parameter values, in the law's parameter order -> (G, P)."""
    missing = [name for name in law.param_names if name not in axes]
    if missing:
        raise ValueError(f"init grid for {law.name}: no values for parameters {missing}")
    rows = itertools.product(*(axes[name] for name in law.param_names))
    return np.array(list(rows), dtype=np.float64)


def batched_lbfgs(fun, x0: np.ndarray, *, memory: int = 10, max_iter: int = 1000,
                  gtol: float = 1e-5, ftol: float = 2.220446049250313e-09, max_ls: int = 40,
                  progress: str | None = None) -> dict:
    """Minimise B independent problems at once.

    fun(x (b, P), rows (b,) indices into the batch) -> (values (b,), gradients (b, P)).
    Stops a problem when max|grad| <= gtol, or when its relative decrease is <= ftol
    (scipy L-BFGS-B's defaults), or when the line search fails. Returns x, f, grad,
    iterations and a converged flag per problem.
    """
    x = np.array(x0, dtype=np.float64)
    B, P = x.shape
    f, g = fun(x, np.arange(B))
    S = np.zeros((B, memory, P))
    Y = np.zeros((B, memory, P))
    rho = np.zeros((B, memory))
    gamma = np.zeros(B)  # initial inverse-Hessian scale from the newest curvature pair
    iters = np.zeros(B, dtype=np.int64)
    converged = np.abs(g).max(axis=1) <= gtol
    active = np.flatnonzero(~converged & np.isfinite(f))
    bar = _progress_bar(progress, max_iter)
    for it in range(max_iter):
        if active.size == 0:
            break
        order = [(it - 1 - k) % memory for k in range(min(it, memory))]  # newest first
        d = _two_loop(g[active], S[active], Y[active], rho[active], gamma[active], order)
        slope = np.einsum("bp,bp->b", g[active], d)
        bad = ~(slope < 0)  # not a descent direction: restart from steepest descent
        if bad.any():
            rho[active[bad]] = 0.0
            gamma[active[bad]] = 0.0
            d[bad] = -g[active[bad]] / np.maximum(np.linalg.norm(g[active[bad]], axis=1), 1e-300)[:, None]
            slope[bad] = np.einsum("bp,bp->b", g[active[bad]], d[bad])
        x_new, f_new, g_new, ok = _armijo(fun, active, x[active], f[active], d, slope, max_ls)
        s, yv = x_new - x[active], g_new - g[active]
        sy = np.einsum("bp,bp->b", s, yv)
        yy = np.einsum("bp,bp->b", yv, yv)
        keep = ok & (sy > 1e-10 * yy) & (yy > 0)
        slot = it % memory
        S[active, slot] = np.where(keep[:, None], s, 0.0)
        Y[active, slot] = np.where(keep[:, None], yv, 0.0)
        rho[active, slot] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        gamma[active] = np.where(keep, sy / np.where(keep, yy, 1.0), gamma[active])
        decrease = f[active] - f_new
        scale = np.maximum(np.maximum(np.abs(f[active]), np.abs(f_new)), 1.0)
        x[active], f[active], g[active] = x_new, f_new, g_new
        iters[active] += 1
        done = ~ok | (np.abs(g_new).max(axis=1) <= gtol) | (decrease <= ftol * scale)
        converged[active[done & ok]] = True
        active = active[~done]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(active.size), refresh=False)  # redraw at mininterval, not every iteration
    if bar is not None:
        bar.close()
    return {"x": x, "f": f, "grad": g, "iterations": iters, "converged": converged}


def _two_loop(g, S, Y, rho, gamma, order):
    """L-BFGS two-loop recursion, vectorised over problems; empty slots have rho = 0."""
    q = g.copy()
    alphas = []
    for slot in order:
        a = rho[:, slot] * np.einsum("bp,bp->b", S[:, slot], q)
        q -= a[:, None] * Y[:, slot]
        alphas.append(a)
    # No curvature pair yet: take a unit-length steepest-descent step (as scipy does first).
    first = np.where(gamma > 0, gamma, 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300))
    r = first[:, None] * q
    for slot, a in zip(reversed(order), reversed(alphas)):
        b = rho[:, slot] * np.einsum("bp,bp->b", Y[:, slot], r)
        r += (a - b)[:, None] * S[:, slot]
    return -r


def _armijo(fun, rows, x, f, d, slope, max_ls, c1=1e-4):
    """Backtracking line search from step 1, halving (or interpolating) until Armijo holds."""
    step = np.ones(len(rows))
    x_new, f_new, g_new = x.copy(), f.copy(), np.zeros_like(x)
    ok = np.zeros(len(rows), dtype=bool)
    todo = np.arange(len(rows))
    for _ in range(max_ls):
        trial = x[todo] + step[todo, None] * d[todo]
        ft, gt = fun(trial, rows[todo])
        accept = np.isfinite(ft) & (ft <= f[todo] + c1 * step[todo] * slope[todo])
        idx = todo[accept]
        x_new[idx], f_new[idx], g_new[idx], ok[idx] = trial[accept], ft[accept], gt[accept], True
        rest = todo[~accept]
        if rest.size == 0:
            break
        # Minimiser of the quadratic through f, slope and the failed value, kept in [0.1, 0.5] x step.
        fr, t = ft[~accept], step[rest]
        quad = -slope[rest] * t**2 / (2.0 * (fr - f[rest] - slope[rest] * t))
        quad = np.where(np.isfinite(quad), quad, 0.5 * t)
        step[rest] = np.clip(quad, 0.1 * t, 0.5 * t)
        todo = rest
    return x_new, f_new, g_new, ok


def _progress_bar(desc, total):
    if desc is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False, mininterval=1.0)


@dataclass
class LseFit:
    """Best parameters of one law, with how they were found."""

    law: LseLaw
    theta: np.ndarray
    objective: float
    starts: int
    starts_converged: int
    polished: int

    def params(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.law.param_names, self.theta)}


def fit_lse(law: LseLaw, X: np.ndarray, y: np.ndarray, grid: np.ndarray, *, polish: int = 8,
            chunk: int = 5000, progress: str | None = None) -> LseFit:
    """Run L-BFGS from every grid point, polish the best `polish` with scipy, keep the best."""
    n = X.shape[0]
    if n < law.num_params:
        raise ValueError(
            f"{law.name}: {n} runs for {law.num_params} parameters ({', '.join(law.param_names)}); "
            "add runs or choose a law with fewer parameters"
        )

    def fun(theta, rows):
        return law.objective(theta, X, y)

    results = [batched_lbfgs(fun, grid[i:i + chunk], progress=progress) for i in range(0, len(grid), chunk)]
    f = np.concatenate([r["f"] for r in results])
    x = np.concatenate([r["x"] for r in results])
    conv = int(sum(r["converged"].sum() for r in results))
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))
    candidates = _distinct(x[order], limit=polish)
    best_theta, best_f = x[order[0]], f[order[0]]
    for start in candidates:
        theta, value = polish_scipy(law, X, y, start)
        if value < best_f:
            best_theta, best_f = theta, value
    tight = batched_lbfgs(fun, best_theta[None, :], **TIGHT)
    if tight["f"][0] < best_f:
        best_theta, best_f = tight["x"][0], tight["f"][0]
    return LseFit(law, best_theta, float(best_f), len(grid), conv, len(candidates))


def polish_scipy(law: LseLaw, X, y, start, weights=None) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B (default tolerances) from one start on the same summed Huber objective."""

    def single(theta):
        value, grad = law.objective(theta[None, :], X, y, weights)
        return float(value[0]), grad[0]

    res = minimize(single, np.asarray(start, dtype=np.float64), jac=True, method="L-BFGS-B")
    return res.x, float(res.fun)


def _distinct(xs: np.ndarray, limit: int, tol: float = 1e-4) -> list[np.ndarray]:
    picked: list[np.ndarray] = []
    for x in xs:
        if not np.all(np.isfinite(x)):
            continue
        if all(np.max(np.abs(x - p)) > tol for p in picked):
            picked.append(x)
        if len(picked) >= limit:
            break
    return picked


def bootstrap_lse(law: LseLaw, X: np.ndarray, y: np.ndarray, theta_hat: np.ndarray, counts: np.ndarray,
                  *, chunk: int = 1000, progress: str | None = None) -> dict:
    """Refit each bootstrap resample (counts (R, n): how often each run is drawn), all at once.

    Every resample starts from the full-data optimum theta_hat rather than the whole
    grid: one batched L-BFGS instead of R x grid fits, with TIGHT tolerances so that
    each solve really walks to its own optimum. On the Chinchilla data this reached
    the same optimum as a full-grid fit of the resample (tests check it on synthetic
    data); a resample whose best basin is far from theta_hat could stay in the
    original one, which would narrow the intervals.
    """
    P = law.num_params
    thetas, values, conv = [np.zeros((0, P))], [np.zeros(0)], [np.zeros(0, dtype=bool)]
    for i in range(0, len(counts), chunk):
        block = counts[i:i + chunk].astype(np.float64)

        def fun(theta, rows, block=block):
            return law.objective(theta, X, y, block[rows])

        start = np.repeat(np.asarray(theta_hat, dtype=np.float64)[None, :], len(block), axis=0)
        res = batched_lbfgs(fun, start, progress=progress, **TIGHT)
        thetas.append(res["x"])
        values.append(res["f"])
        conv.append(res["converged"])
    return {"theta": np.concatenate(thetas), "objective": np.concatenate(values),
            "converged": np.concatenate(conv)}
