"""Figures for a scaling report, each written as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moedit.analysis.scaling import isoflop as iso
from moedit.analysis.scaling import laws
from moedit.analysis.scaling.collect import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, stem: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(str(path))
    _pyplot().close(fig)
    return paths


def _band(predict, samples: dict, x: np.ndarray, level: float):
    """Pointwise percentile band of predictions over bootstrap parameter samples."""
    if not samples or len(next(iter(samples.values()))) < 2:
        return None
    grid = predict({k: np.asarray(v)[:, None] for k, v in samples.items()}, x[None, :])  # (R, X)
    tail = 100.0 * (1.0 - level) / 2.0
    return np.nanpercentile(grid, tail, axis=0), np.nanpercentile(grid, 100.0 - tail, axis=0)


def write_plots(report: dict, runs: list[Run], N: np.ndarray, out_dir: Path, loss_label: str) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fits, paths = report["fits"], []
    level = report["options"]["level"]
    paths += plot_loss_vs_compute(fits.get("envelope", {}), runs, out_dir, loss_label, level)
    if "params" in fits.get("isoflop", {}):
        paths += plot_isoflop(fits["isoflop"], out_dir, loss_label, N)
    paths += plot_n_opt(fits, report["flops_per_param_token"]["value"], runs, out_dir, level)
    paths += plot_loss_vs_experts(runs, fits.get("moe_bilinear", {}), out_dir, loss_label)
    return paths


def plot_loss_vs_compute(env: dict, runs: list[Run], out_dir: Path, loss_label: str, level: float) -> list[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = np.array([r.activated_params for r in runs])
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(np.log10(sizes.min()), np.log10(sizes.max()) + 1e-9)
    for r in runs:
        color = cmap(norm(np.log10(r.activated_params)))
        if r.curve_flops is not None and len(r.curve_flops) > 1:
            ax.plot(r.curve_flops, r.curve_loss, color=color, lw=0.8, alpha=0.6)
        ax.scatter([r.flops], [r.loss], color=color, s=12, zorder=3)
    if "params" in env:
        ax.scatter(env["envelope"]["flops"], env["envelope"]["loss"], facecolors="none", edgecolors="red",
                   s=30, zorder=4, label="lower envelope")
        lo = min(min(env["envelope"]["flops"]), min(r.flops for r in runs))
        x = np.geomspace(lo, max(r.flops for r in runs) * 10, 200)
        p = env["params"]
        ax.plot(x, laws.envelope_predict(p, x), color="red",
                label=f"fit: L = {p['E']:.3g} + ({p['C0']:.2e}/C)^{p['alpha']:.3f}")
        band = _band(laws.envelope_predict, env["_samples"], x, level)
        if band is not None:
            ax.fill_between(x, *band, color="red", alpha=0.15, label=f"{level:.0%} bootstrap band")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C [FLOP]")
    ax.set_ylabel(loss_label)
    ax.set_title("Loss vs compute (colour: log10 activated parameters)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="log10 activated parameters")
    if "params" in env:
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "loss_vs_compute")


def plot_isoflop(fit: dict, out_dir: Path, loss_label: str, N: np.ndarray) -> list[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("plasma")
    budgets = fit["budgets"]
    for i, b in enumerate(budgets):
        color = cmap(i / max(len(budgets) - 1, 1))
        n_runs = np.array(b["runs"], dtype=int)
        par = b["parabola"]
        if par is None:
            continue
        coef = par["coef"]
        x = np.log(N[n_runs]) if n_runs.size else np.array([])
        resid = np.array(par["residuals"])
        ax.scatter(N[n_runs], np.polyval(coef, x) - resid, color=color, s=14, label=f"C = {b['budget']:.2e} FLOP")
        xs = np.linspace(x.min() - 0.2, x.max() + 0.2, 100)
        ax.plot(np.exp(xs), np.polyval(coef, xs), color=color, lw=1)
        if par.get("N_star"):
            ax.scatter([par["N_star"]], [par["L_star"]], marker="*", s=90, color=color, edgecolors="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(loss_label)
    ax.set_title("IsoFLOP profiles (star: parabola vertex N*)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "isoflop")


def plot_n_opt(fits: dict, k: float | None, runs: list[Run], out_dir: Path, level: float) -> list[str]:
    a3, isof = fits.get("approach3", {}), fits.get("isoflop", {})
    if "params" not in a3 and "params" not in isof:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    flops = np.array([r.flops for r in runs])
    x = np.geomspace(flops.min() / 10, flops.max() * 100, 200)
    if "params" in a3 and k:
        ax.plot(x, laws.compute_optimal(a3["params"], x, k)["N_opt"], color="C0", label="approach 3: N_opt(C)")
        band = _band(lambda p, c: laws.compute_optimal(p, c, k)["N_opt"], a3["_samples"], x, level)
        if band is not None:
            ax.fill_between(x, *band, color="C0", alpha=0.15, label=f"approach 3 {level:.0%} band")
    if "params" in isof:
        pts = [(b["budget"], b["parabola"]["N_star"]) for b in isof["budgets"] if b["parabola"] and
               b["parabola"].get("N_star")]
        ax.scatter(*zip(*pts), color="C1", zorder=3, label="isoFLOP vertices N*")
        p = isof["params"]
        ax.plot(x, iso.isoflop_predict(p, x), color="C1", ls="--", label=f"isoFLOP: N* ~ C^{p['slope']:.3f}")
        band = _band(iso.isoflop_predict, isof["_samples"], x, level)
        if band is not None:
            ax.fill_between(x, *band, color="C1", alpha=0.12)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C [FLOP]")
    ax.set_ylabel("compute-optimal parameters N_opt")
    ax.set_title("Compute-optimal model size")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "n_opt_vs_compute")


def plot_loss_vs_experts(runs: list[Run], bilinear: dict, out_dir: Path, loss_label: str) -> list[str]:
    """Loss against expert count for runs of equal activated size and equal compute (one line per pair)."""
    if len({r.experts for r in runs}) < 2:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = np.array([r.activated_params for r in runs])
    flops = np.array([r.flops for r in runs])
    line = 0
    for size_group in iso.group_by_budget(sizes, 0.05):
        for flop_group in iso.group_by_budget(flops[size_group], 0.1):
            members = size_group[flop_group]
            if len({runs[i].experts for i in members}) < 2:
                continue
            members = sorted(members, key=lambda i: runs[i].experts)
            E = np.array([runs[i].experts for i in members])
            color = f"C{line % 10}"
            label = f"N_act = {np.mean(sizes[members]):.3g}, C = {np.mean(flops[members]):.2e} FLOP"
            ax.plot(E, [runs[i].loss for i in members], "o-", color=color, label=label)
            if "params" in bilinear:
                p = bilinear["params"]
                e_grid = np.geomspace(E.min(), E.max(), 50)
                log_e = np.log(laws.saturate_experts(e_grid, bilinear.get("_e_max")))
                log_n = np.log(np.mean(sizes[members]))
                ax.plot(e_grid, np.exp(p["a"] * log_n + p["b"] * log_e + p["c"] * log_n * log_e + p["d"]),
                        ls=":", color=color)
            line += 1
    if line == 0:
        plt.close(fig)
        return []
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of experts E")
    ax.set_ylabel(loss_label)
    ax.set_title("Loss vs experts at fixed activated size (dotted: bilinear fit)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "loss_vs_experts")
