"""IsoFLOP profiles (Chinchilla approach 2): a parabola of loss in log N per compute budget.

The vertex of each parabola is the compute-optimal size N*(C); a straight line
through (log C, log N*) gives N* ~ C^slope. Budgets come either from clustering the
runs' final compute (runs of one budget differ by < `tolerance` in relative
compute) or, when budgets are given, by interpolating every run's loss curve at
each budget (the paper's approach; a run contributes only where its curve spans C).
"""

from __future__ import annotations

import numpy as np

from moedit.analysis.scaling.laws import bootstrap_counts, interval


def group_by_budget(flops: np.ndarray, tolerance: float = 0.1) -> list[np.ndarray]:
    """Indices of runs grouped by final compute: consecutive sorted runs within 1 + tolerance."""
    order = np.argsort(flops)
    groups, current = [], [order[0]]
    for prev, nxt in zip(order[:-1], order[1:]):
        if flops[nxt] <= flops[prev] * (1.0 + tolerance):
            current.append(nxt)
        else:
            groups.append(np.array(current))
            current = [nxt]
    groups.append(np.array(current))
    return groups


def profiles_from_final(N, C, L, tolerance: float = 0.1) -> list[dict]:
    """One profile per budget cluster: {budget (geometric mean C), N, L, runs}."""
    out = []
    for idx in group_by_budget(C, tolerance):
        out.append({"budget": float(np.exp(np.mean(np.log(C[idx])))), "N": N[idx], "L": L[idx], "runs": idx})
    return out


def profiles_from_curves(N, curves_flops, curves_loss, budgets) -> list[dict]:
    """Loss of every run at each budget, interpolated in log compute along its curve."""
    out = []
    for budget in budgets:
        runs, losses = [], []
        for i, (cf, cl) in enumerate(zip(curves_flops, curves_loss)):
            if cf is None or len(cf) < 2 or not (cf.min() <= budget <= cf.max()):
                continue
            runs.append(i)
            losses.append(float(np.interp(np.log(budget), np.log(cf), cl)))
        idx = np.array(runs, dtype=np.int64)
        out.append({"budget": float(budget), "N": N[idx] if idx.size else np.array([]),
                    "L": np.array(losses), "runs": idx})
    return out


def fit_parabola(N: np.ndarray, L: np.ndarray) -> dict | None:
    """loss = p2 x^2 + p1 x + p0 with x = log N; None unless >= 3 distinct sizes."""
    x = np.log(N)
    if np.unique(x).size < 3:
        return None
    p2, p1, p0 = np.polyfit(x, L, 2)
    pred = np.polyval([p2, p1, p0], x)
    ss_tot = float(np.sum((L - L.mean()) ** 2))
    fit = {"coef": [float(p2), float(p1), float(p0)], "convex": bool(p2 > 0),
           "r2": float(1.0 - np.sum((pred - L) ** 2) / ss_tot) if ss_tot > 0 else None,
           "residuals": (pred - L).tolist()}
    if p2 > 0:
        x_star = -p1 / (2.0 * p2)
        fit.update(N_star=float(np.exp(x_star)), L_star=float(np.polyval([p2, p1, p0], x_star)),
                   vertex_inside=bool(x.min() <= x_star <= x.max()))
    return fit


def _regress(budgets, n_stars):
    x, y = np.log(budgets), np.log(n_stars)
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def fit_isoflop(profiles: list[dict], *, resamples: int = 1000, level: float = 0.95, seed: int = 0,
                num_runs: int | None = None) -> dict:
    """Parabola per budget profile, then log N* = slope log C + intercept; runs resampled for CIs."""
    fits = [fit_parabola(p["N"], p["L"]) if len(p["N"]) else None for p in profiles]
    usable = [i for i, f in enumerate(fits) if f is not None and f["convex"]]
    if len(usable) < 2:
        raise ValueError(f"isoFLOP: {len(usable)} budget(s) with a convex parabola over >= 3 model sizes; "
                         "need 2 or more (add runs per budget or check --isoflop-tolerance/--isoflop-budgets)")
    budgets = np.array([profiles[i]["budget"] for i in usable])
    n_stars = np.array([fits[i]["N_star"] for i in usable])
    slope, intercept = _regress(budgets, n_stars)
    num_runs = num_runs or 1 + max(int(p["runs"].max()) for p in profiles if len(p["runs"]))
    slopes, intercepts, failed = [], [], 0
    for row in bootstrap_counts(num_runs, resamples, seed):
        b_list, n_list = [], []
        for i in usable:
            reps = row[profiles[i]["runs"]]
            take = np.repeat(np.arange(len(reps)), reps)
            sub = fit_parabola(profiles[i]["N"][take], profiles[i]["L"][take]) if take.size else None
            if sub is not None and sub["convex"]:
                b_list.append(profiles[i]["budget"])
                n_list.append(sub["N_star"])
        if len(b_list) < 2:
            failed += 1
            continue
        s, c = _regress(np.array(b_list), np.array(n_list))
        slopes.append(s)
        intercepts.append(c)
    pred = intercept + slope * np.log(budgets)
    return {
        "law": "log N* = slope * log C + intercept",
        "params": {"slope": slope, "intercept": intercept},
        "ci": {"slope": interval(np.array(slopes), level), "intercept": interval(np.array(intercepts), level)},
        "level": level,
        "gof": {"n_budgets": len(usable), "rmse_log_N_star": float(np.sqrt(np.mean((pred - np.log(n_stars)) ** 2)))},
        "residuals": (pred - np.log(n_stars)).tolist(),
        "budgets": [
            {"budget": p["budget"], "num_runs": int(len(p["N"])), "parabola": f,
             "runs": [int(r) for r in p["runs"]]}
            for p, f in zip(profiles, fits)
        ],
        "bootstrap": {"resamples": int(resamples), "failed": failed},
        "_samples": {"slope": np.array(slopes), "intercept": np.array(intercepts)},
    }


def isoflop_predict(params: dict, C) -> np.ndarray:
    return np.exp(np.asarray(params["intercept"]) + np.asarray(params["slope"]) * np.log(np.asarray(C, dtype=float)))
