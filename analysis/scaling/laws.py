"""Scaling laws fitted to runs: Chinchilla approach 3, the compute envelope, and MoE laws.

Every fit returns a plain dict: `params`, `ci` ({name: [low, high]} percentile
bootstrap intervals from resampling runs), `gof` (goodness of fit), `residuals`
(log L_hat - log L per point) and, internally, `_samples` (bootstrap parameter
arrays, dropped before writing JSON).
"""

from __future__ import annotations

import numpy as np

from moedit.analysis.scaling.lse import LseLaw, bootstrap_lse, fit_lse, param_grid

APPROACH3 = LseLaw(
    name="chinchilla_approach3",
    param_names=("a", "b", "e", "alpha", "beta"),
    feature_names=("log_N", "log_D"),
    terms=((0, ((3, 0),)), (1, ((4, 1),)), (2, ())),  # A/N^alpha + B/D^beta + E
)
# docs/scaling.md ("approach3"): 5 x 5 x 5 x 6 x 6 = 4,500 starts.
APPROACH3_GRID_FULL = {
    "alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0], "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
}
APPROACH3_GRID_SMALL = {  # 108 starts, for tests and quick looks
    "alpha": [0.5, 1.0], "beta": [0.5, 1.0], "e": [-1.0, 0.0, 1.0], "a": [0.0, 10.0, 20.0], "b": [0.0, 10.0, 20.0],
}

ENVELOPE = LseLaw(
    name="compute_envelope",
    param_names=("e", "k", "alpha"),
    feature_names=("log_C_rel",),
    terms=((0, ()), (1, ((2, 0),))),  # E + K (C/C_ref)^-alpha
)
ENVELOPE_GRID = {"e": [-3.0, -2.0, -1.0, 0.0, 1.0], "k": [-4.0, -2.0, 0.0, 1.0], "alpha": [0.02, 0.1, 0.3, 1.0]}

FINE_GRAINED = LseLaw(
    name="fine_grained_moe",
    param_names=("c", "a", "g", "b", "alpha", "beta", "gamma"),
    feature_names=("log_N_rel", "log_D_rel", "log_G"),
    # c + (g/G^gamma + a) N^-alpha + b D^-beta, expanded into four positive terms
    terms=((0, ()), (2, ((6, 2), (4, 0))), (1, ((4, 0),)), (3, ((5, 1),))),
)
FINE_GRAINED_GRID = {
    "c": [-3.0, -1.5, 0.0], "a": [-4.0, -2.0, 0.0], "g": [-4.0, -2.0, 0.0], "b": [-4.0, -2.0, 0.0],
    "alpha": [0.25, 0.5, 1.0], "beta": [0.25, 0.5, 1.0], "gamma": [0.25, 0.5, 1.0],
}


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(R, n) multinomial counts: resample n runs with replacement, R times."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]) if resamples else \
        np.zeros((0, n), dtype=np.int64)


def interval(samples: np.ndarray, level: float) -> list[float] | None:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size < 2:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100.0 - tail))]


def _gof(log_pred: np.ndarray, y: np.ndarray, objective: float | None = None) -> dict:
    resid = log_pred - y
    loss, pred = np.exp(y), np.exp(log_pred)
    ss_tot = float(np.sum((loss - loss.mean()) ** 2))
    out = {"n": int(y.size), "rmse_log": float(np.sqrt(np.mean(resid**2))),
           "max_abs_log_resid": float(np.max(np.abs(resid))),
           "r2_loss": float(1.0 - np.sum((pred - loss) ** 2) / ss_tot) if ss_tot > 0 else None}
    if objective is not None:
        out["huber_sum"] = float(objective)
    return out


# ---------------------------------------------------------------- Chinchilla approach 3

def fit_approach3(N, D, L, *, grid: str | dict = "full", resamples: int = 1000, level: float = 0.95,
                  seed: int = 0, progress: bool = False) -> dict:
    """L(N, D) = E + A/N^alpha + B/D^beta by summed Huber on log residuals from the full grid."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    _check_positive(N=N, D=D, L=L)
    axes = {"full": APPROACH3_GRID_FULL, "small": APPROACH3_GRID_SMALL}.get(grid, grid)
    X, y = np.stack([np.log(N), np.log(D)], axis=1), np.log(L)
    fit = fit_lse(APPROACH3, X, y, param_grid(axes, APPROACH3), progress="approach 3 grid" if progress else None)
    counts = bootstrap_counts(len(y), resamples, seed)
    boot = bootstrap_lse(APPROACH3, X, y, fit.theta, counts, progress="approach 3 bootstrap" if progress else None)
    params = _approach3_params(fit.theta)
    samples = _approach3_params(boot["theta"].T) if resamples else {}
    log_pred = APPROACH3.log_predict(fit.theta[None, :], X)[0][0]
    return {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "params": params, "ci": {k: interval(v, level) for k, v in samples.items()}, "level": level,
        "gof": _gof(log_pred, y, fit.objective), "residuals": (log_pred - y).tolist(),
        "search": {"starts": fit.starts, "starts_converged": fit.starts_converged, "polished": fit.polished,
                   "bootstrap_resamples": int(resamples),
                   "bootstrap_converged": int(boot["converged"].sum()) if resamples else 0,
                   "bootstrap_start": "full-data optimum"},
        "_samples": samples,
    }


def _approach3_params(theta):
    a, b, e, alpha, beta = theta
    return {"A": np.exp(a), "B": np.exp(b), "E": np.exp(e), "alpha": alpha, "beta": beta} if np.ndim(a) else \
        {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": float(alpha), "beta": float(beta)}


def compute_optimal(params: dict, C, flops_per_param_token: float = 6.0) -> dict:
    """Closed-form N_opt(C), D_opt(C) minimising L(N, D) subject to C = k N D (Hoffmann et al. eq. 4).

    Works elementwise on arrays of parameters (bootstrap samples) or of budgets.
    """
    A, B, E, alpha, beta = (np.asarray(params[k], dtype=np.float64) for k in ("A", "B", "E", "alpha", "beta"))
    C = np.asarray(C, dtype=np.float64)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    n_opt = G * (C / flops_per_param_token) ** a
    d_opt = (C / flops_per_param_token) ** b / G
    loss = E + A / n_opt**alpha + B / d_opt**beta
    return {"N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt, "loss": loss,
            "a": a, "b": b, "G": G}


# ---------------------------------------------------------------- loss vs compute envelope

def lower_envelope(flops: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of points with a lower loss than every point of smaller (or equal) compute."""
    order = np.lexsort((loss, flops))
    best, keep = np.inf, []
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=np.int64)


def _envelope_from(C, L, idx, start):
    idx = idx[C[idx] >= start]
    return idx[lower_envelope(C[idx], L[idx])]


def fit_envelope(points_flops: list[np.ndarray], points_loss: list[np.ndarray], *, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0, progress: bool = False) -> dict:
    """L(C) = E + (C0/C)^alpha on the lower envelope of every run's (compute, loss) points.

    points_* hold one array per run (a training curve or a single final point).
    The envelope starts at the smallest final compute of any run: below it the only
    points are partial curves of the cheapest runs, which say nothing about the
    best loss reachable at that compute. Bootstrap resamples runs, rebuilds the
    envelope from the drawn runs (weights = draw counts) and refits from the
    full-data optimum.
    """
    run_of = np.concatenate([np.full(len(f), i) for i, f in enumerate(points_flops)])
    C, L = np.concatenate(points_flops).astype(np.float64), np.concatenate(points_loss).astype(np.float64)
    _check_positive(C=C, L=L)
    final = np.array([np.max(f) for f in points_flops])
    env = _envelope_from(C, L, np.arange(len(C)), final.min())
    if env.size < ENVELOPE.num_params:
        raise ValueError(f"compute envelope: {env.size} envelope points for {ENVELOPE.num_params} parameters "
                         "(E, C0, alpha); add runs spanning more compute")
    log_ref = float(np.mean(np.log(C[env])))
    X, y = (np.log(C) - log_ref)[:, None], np.log(L)
    fit = fit_lse(ENVELOPE, X[env], y[env], param_grid(ENVELOPE_GRID, ENVELOPE))
    counts = bootstrap_counts(len(points_flops), resamples, seed)
    weights = np.zeros((resamples, len(C)))
    for r, row in enumerate(counts):
        drawn = np.flatnonzero(row[run_of] > 0)
        on_env = _envelope_from(C, L, drawn, final[row > 0].min())
        weights[r, on_env] = row[run_of[on_env]]
    used = np.flatnonzero(weights.sum(axis=0) > 0) if resamples else env
    boot = bootstrap_lse(ENVELOPE, X[used], y[used], fit.theta, weights[:, used],
                         progress="envelope bootstrap" if progress else None)
    params = _envelope_params(fit.theta, log_ref)
    samples = _envelope_params(boot["theta"].T, log_ref) if resamples else {}
    log_pred = ENVELOPE.log_predict(fit.theta[None, :], X[env])[0][0]
    return {
        "law": "L(C) = E + (C0 / C)^alpha", "params": params,
        "ci": {k: interval(v, level) for k, v in samples.items()}, "level": level,
        "gof": _gof(log_pred, y[env], fit.objective), "residuals": (log_pred - y[env]).tolist(),
        "envelope": {"flops": C[env].tolist(), "loss": L[env].tolist()},
        "search": {"starts": fit.starts, "bootstrap_resamples": int(resamples)},
        "_samples": samples,
    }


def _envelope_params(theta, log_ref):
    e, k, alpha = theta
    return {"E": np.exp(e), "alpha": alpha, "C0": np.exp(log_ref + k / alpha)}


def envelope_predict(params: dict, C) -> np.ndarray:
    C = np.asarray(C, dtype=np.float64)
    return np.asarray(params["E"]) + (np.asarray(params["C0"]) / C) ** np.asarray(params["alpha"])


# ---------------------------------------------------------------- MoE laws

def saturate_experts(E, e_max: float | None) -> np.ndarray:
    """Clark et al.'s saturating transform with E_start = 1: ~E for small E, -> e_max for large E."""
    E = np.asarray(E, dtype=np.float64)
    if e_max is None:
        return E
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 - 1.0 / e_max)) + 1.0 / e_max)


def fit_moe_bilinear(N, E, L, *, e_max: float | None = None, resamples: int = 1000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """log L = a log N + b log E' + c log N log E' + d by least squares (Clark et al. 2022)."""
    N, E, L = (np.asarray(v, dtype=np.float64) for v in (N, E, L))
    _check_positive(N=N, experts=E, L=L)
    log_e = np.log(saturate_experts(E, e_max))
    design = np.stack([np.log(N), log_e, np.log(N) * log_e, np.ones_like(N)], axis=1)  # (n, 4)
    if len(L) < 4:
        raise ValueError(f"MoE bilinear law: {len(L)} runs for 4 parameters (a, b, c, d); add runs")
    if np.ptp(log_e) == 0 or np.ptp(np.log(N)) == 0:
        raise ValueError("MoE bilinear law: needs runs at several expert counts and several sizes")
    y = np.log(L)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    boot, degenerate = [], 0
    for row in bootstrap_counts(len(y), resamples, seed):
        w = np.sqrt(row)
        if np.linalg.matrix_rank(design[row > 0]) < 4:  # e.g. one size drawn only: the law is not identified
            degenerate += 1
            continue
        boot.append(np.linalg.lstsq(design * w[:, None], y * w, rcond=None)[0])
    boot = np.array(boot).reshape(-1, 4)
    names = ("a", "b", "c", "d")
    log_pred = design @ coef
    return {
        "law": "log L = a log N + b log E' + c log N log E' + d",
        "expert_transform": "none" if e_max is None else f"saturating, E_start=1, E_max={e_max}",
        "params": dict(zip(names, map(float, coef))),
        "ci": {k: interval(boot[:, i], level) for i, k in enumerate(names)}, "level": level,
        "gof": _gof(log_pred, y), "residuals": (log_pred - y).tolist(),
        "bootstrap": {"resamples": int(resamples), "degenerate_skipped": degenerate},
        "_samples": {k: boot[:, i] for i, k in enumerate(names)}, "_e_max": e_max,
    }


def fit_fine_grained(N, D, G, L, *, resamples: int = 500, level: float = 0.95, seed: int = 0,
                     progress: bool = False) -> dict:
    """L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta (Krajewski et al. 2024)."""
    N, D, G, L = (np.asarray(v, dtype=np.float64) for v in (N, D, G, L))
    _check_positive(N=N, D=D, granularity=G, L=L)
    if np.ptp(G) == 0:
        raise ValueError("fine-grained MoE law: all runs share one granularity; it needs several")
    ref_n, ref_d = float(np.mean(np.log(N))), float(np.mean(np.log(D)))
    X = np.stack([np.log(N) - ref_n, np.log(D) - ref_d, np.log(G)], axis=1)
    y = np.log(L)
    fit = fit_lse(FINE_GRAINED, X, y, param_grid(FINE_GRAINED_GRID, FINE_GRAINED),
                  progress="fine-grained grid" if progress else None)
    counts = bootstrap_counts(len(y), resamples, seed)
    boot = bootstrap_lse(FINE_GRAINED, X, y, fit.theta, counts, progress="fine-grained bootstrap" if progress else None)
    params = _fine_params(fit.theta, ref_n, ref_d)
    samples = _fine_params(boot["theta"].T, ref_n, ref_d) if resamples else {}
    log_pred = FINE_GRAINED.log_predict(fit.theta[None, :], X)[0][0]
    return {
        "law": "L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta", "params": params,
        "ci": {k: interval(v, level) for k, v in samples.items()}, "level": level,
        "gof": _gof(log_pred, y, fit.objective), "residuals": (log_pred - y).tolist(),
        "_samples": samples,
    }


def _fine_params(theta, ref_n, ref_d):
    c, a, g, b, alpha, beta, gamma = theta
    # Coefficients were fitted against N / N_ref and D / D_ref: convert back to raw units.
    return {"c": np.exp(c), "a": np.exp(a + alpha * ref_n), "g": np.exp(g + alpha * ref_n),
            "b": np.exp(b + beta * ref_d), "alpha": alpha, "beta": beta, "gamma": gamma}


def fine_grained_predict(params: dict, N, D, G) -> np.ndarray:
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    return p["c"] + (p["g"] / np.asarray(G) ** p["gamma"] + p["a"]) / np.asarray(N) ** p["alpha"] + \
        p["b"] / np.asarray(D) ** p["beta"]


def _check_positive(**arrays) -> None:
    for name, values in arrays.items():
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            raise ValueError(f"{name} must be positive and finite for a log-space fit: {bad.size} bad value(s), "
                             f"first at index {bad[0]} = {values[bad[0]]!r}")
