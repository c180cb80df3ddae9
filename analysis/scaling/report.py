"""Run every applicable scaling fit on a set of runs and assemble one JSON-ready report."""

from __future__ import annotations

import datetime
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from moedit.analysis.scaling import isoflop as iso
from moedit.analysis.scaling import laws
from moedit.analysis.scaling.collect import Run, validate_runs
from moedit.errors import MoeditError

FITS = ("envelope", "approach3", "isoflop", "moe_bilinear", "fine_grained")


@dataclass
class ScalingOptions:
    fits: tuple[str, ...] = ()
    """Fits to run; empty = every fit the data supports (others are skipped with a reason)."""
    params: str = "activated"
    """N in the laws: 'activated' (per-token, compute-relevant) or 'total' parameters."""
    data_unit: str = "tokens"
    """D in the laws: 'tokens' or 'images' seen."""
    grid: str = "full"
    """Approach-3 initialisation grid: 'full' (4,500 starts, docs/scaling.md) or 'small' (108)."""
    resamples: int = 1000
    level: float = 0.95
    seed: int = 0
    flops_per_param_token: float | None = None
    """k in C = k N D for the compute-optimal allocation; None = median of C / (N D) over runs."""
    extrapolate: tuple[float, ...] = ()
    isoflop_budgets: tuple[float, ...] = ()
    isoflop_tolerance: float = 0.1
    envelope_source: str = "curves"
    """'curves' (every logged point after curve_skip of each run) or 'final' (one point per run)."""
    curve_skip: float = 0.1
    e_max: float | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.fits) - set(FITS)
        if unknown:
            raise ValueError(f"--fits: unknown fit(s) {sorted(unknown)}; choose from {list(FITS)}")
        choices = {"params": ("activated", "total"), "data_unit": ("tokens", "images"), "grid": ("full", "small"),
                   "envelope_source": ("curves", "final")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: choose one of {list(allowed)}")
        if self.resamples < 0 or not 0.0 < self.level < 1.0:
            raise ValueError(f"resamples = {self.resamples}, level = {self.level}: need resamples >= 0 and 0 < level < 1")


def arrays(runs: list[Run], options: ScalingOptions) -> dict[str, np.ndarray]:
    N = np.array([r.activated_params if options.params == "activated" else r.total_params for r in runs], dtype=float)
    D = np.array([(r.tokens if options.data_unit == "tokens" else r.images) or np.nan for r in runs], dtype=float)
    return {"N": N, "D": D, "C": np.array([r.flops for r in runs], dtype=float),
            "L": np.array([r.loss for r in runs], dtype=float),
            "E": np.array([r.experts for r in runs], dtype=float),
            "G": np.array([r.granularity for r in runs], dtype=float)}


def analyze(runs: list[Run], options: ScalingOptions) -> dict:
    validate_runs(runs, need=("activated_params" if options.params == "activated" else "total_params", "flops", "loss"))
    data = arrays(runs, options)
    k = options.flops_per_param_token
    ratio = data["C"] / (data["N"] * data["D"])
    if k is None and np.isfinite(ratio).any():
        k = float(np.median(ratio[np.isfinite(ratio)]))
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_runs": len(runs), "options": asdict(options),
        "flops_per_param_token": {"value": k, "source": "given" if options.flops_per_param_token else "median C/(N D)",
                                  "min": _finite_stat(ratio, np.min), "max": _finite_stat(ratio, np.max)},
        "runs": [r.summary() for r in runs], "fits": {},
    }
    wanted = options.fits or FITS
    for name in wanted:
        try:
            report["fits"][name] = _FIT_FUNCS[name](runs, data, options, k)
        except (ValueError, MoeditError) as exc:
            if options.fits:  # asked for by name: its failure is the user's error
                raise type(exc)(f"{name} fit: {exc}") from exc
            report["fits"][name] = {"skipped": str(exc)}
    if all("skipped" in f for f in report["fits"].values()):
        reasons = "; ".join(f"{n}: {f['skipped']}" for n, f in report["fits"].items())
        raise MoeditError(f"no scaling fit applies to these {len(runs)} runs ({reasons})")
    report["extrapolation"] = [extrapolate(report["fits"], c, k, options.level) for c in options.extrapolate]
    return report


def _fit_envelope(runs, data, options, k):
    if options.envelope_source == "final" or any(r.curve_flops is None for r in runs):
        flops = [np.array([r.flops]) for r in runs]
        loss = [np.array([r.loss]) for r in runs]
    else:
        flops, loss = [], []
        for r in runs:  # drop the first curve_skip of each run: warm-up points are not converged behaviour
            keep = (r.curve_flops >= options.curve_skip * r.flops) & np.isfinite(r.curve_loss)
            flops.append(r.curve_flops[keep])
            loss.append(r.curve_loss[keep])
    return laws.fit_envelope(flops, loss, resamples=options.resamples, level=options.level, seed=options.seed,
                             progress=options.progress)


def _fit_approach3(runs, data, options, k):
    if not np.isfinite(data["D"]).all():
        raise ValueError(f"{options.data_unit} seen unknown for some runs: approach 3 needs D "
                         "(give tokens_per_image in model_info.json or use --data-unit images)")
    fit = laws.fit_approach3(data["N"], data["D"], data["L"], grid=options.grid, resamples=options.resamples,
                             level=options.level, seed=options.seed, progress=options.progress)
    budgets = np.geomspace(data["C"].min(), data["C"].max(), 5)
    opt = laws.compute_optimal(fit["params"], budgets, k)
    fit["compute_optimal"] = {
        "flops_per_param_token": k, "exponent_a": float(opt["a"]), "exponent_b": float(opt["b"]), "G": float(opt["G"]),
        "ci": _optimal_ci(fit["_samples"], k, options.level),
        "at_sweep_budgets": {"flops": budgets.tolist(), "N_opt": opt["N_opt"].tolist(), "D_opt": opt["D_opt"].tolist()},
    }
    return fit


def _optimal_ci(samples, k, level):
    if not samples:
        return {}
    opt = laws.compute_optimal(samples, 1.0, k)
    return {"exponent_a": laws.interval(opt["a"], level), "exponent_b": laws.interval(opt["b"], level)}


def _fit_isoflop(runs, data, options, k):
    if options.isoflop_budgets:
        profiles = iso.profiles_from_curves(data["N"], [r.curve_flops for r in runs], [r.curve_loss for r in runs],
                                            options.isoflop_budgets)
    else:
        profiles = iso.profiles_from_final(data["N"], data["C"], data["L"], options.isoflop_tolerance)
    return iso.fit_isoflop(profiles, resamples=options.resamples, level=options.level, seed=options.seed,
                           num_runs=len(runs))


def _fit_moe_bilinear(runs, data, options, k):
    if np.unique(data["E"]).size < 2:
        raise ValueError("all runs have the same number of experts")
    return laws.fit_moe_bilinear(data["N"], data["E"], data["L"], e_max=options.e_max, resamples=options.resamples,
                                 level=options.level, seed=options.seed)


def _fit_fine_grained(runs, data, options, k):
    if not np.isfinite(data["D"]).all():
        raise ValueError(f"{options.data_unit} seen unknown for some runs")
    return laws.fit_fine_grained(data["N"], data["D"], data["G"], data["L"], resamples=options.resamples,
                                 level=options.level, seed=options.seed, progress=options.progress)


_FIT_FUNCS = {"envelope": _fit_envelope, "approach3": _fit_approach3, "isoflop": _fit_isoflop,
              "moe_bilinear": _fit_moe_bilinear, "fine_grained": _fit_fine_grained}


def extrapolate(fits: dict, flops: float, k: float | None, level: float) -> dict:
    """Predictions at compute `flops` from each fitted law, with bootstrap intervals."""
    if not (flops > 0 and math.isfinite(flops)):
        raise ValueError(f"--extrapolate {flops}: compute must be a positive number of FLOPs")
    out: dict = {"flops": float(flops)}
    env = fits.get("envelope", {})
    if "params" in env:
        out["envelope"] = _with_ci(laws.envelope_predict(env["params"], flops),
                                   laws.envelope_predict(env["_samples"], flops) if env["_samples"] else None,
                                   level, "loss")
    a3 = fits.get("approach3", {})
    if "params" in a3 and k:
        best = laws.compute_optimal(a3["params"], flops, k)
        boot = laws.compute_optimal(a3["_samples"], flops, k) if a3["_samples"] else {}
        out["approach3"] = {name: _with_ci(best[name], boot.get(name), level)
                            for name in ("loss", "N_opt", "D_opt", "tokens_per_param")}
    isof = fits.get("isoflop", {})
    if "params" in isof:
        samples = isof["_samples"]
        boot = iso.isoflop_predict(samples, flops) if len(samples["slope"]) else None
        out["isoflop"] = _with_ci(iso.isoflop_predict(isof["params"], flops), boot, level, "N_star")
    return out


def _with_ci(value, samples, level, name=None):
    entry = {"value": float(value), "ci": laws.interval(samples, level) if samples is not None else None}
    return {name: entry} if name else entry


def _finite_stat(values, func):
    finite = values[np.isfinite(values)]
    return float(func(finite)) if finite.size else None


def to_json(obj):
    """Drop private keys ('_samples') and turn numpy values into plain Python."""
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
