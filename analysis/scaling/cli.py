"""`moedit analyze scaling`: fit scaling laws to a sweep directory or a CSV of runs.

Writes OUT/scaling.json (every fit with parameters, intervals, goodness of fit and
residuals; the runs; the options) and OUT/*.png + *.pdf figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="sweep directory (every run directory below it is read) or a CSV of runs")
    parser.add_argument("--out", default=None, help="output directory (default: SOURCE/scaling or CSV_STEM_scaling)")
    parser.add_argument("--fits", default="", help="comma list of envelope,approach3,isoflop,moe_bilinear,"
                        "fine_grained (default: every fit the data supports)")
    parser.add_argument("--params", choices=("activated", "total"), default="activated",
                        help="N in the laws (default: activated parameters per token)")
    parser.add_argument("--data-unit", choices=("tokens", "images"), default="tokens", help="D in the laws")
    parser.add_argument("--grid", choices=("full", "small"), default="full",
                        help="approach-3 initialisation grid: full = 4,500 starts (default), small = 108")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the runs (default 1000)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flops-per-param-token", type=float, default=None,
                        help="k in C = k N D for N_opt/D_opt (default: median C/(N D) of the runs; 6 for CSVs "
                        "without a tokens column)")
    parser.add_argument("--extrapolate", type=float, action="append", default=[], metavar="FLOPS",
                        help="predict loss and N_opt at this compute (repeatable)")
    parser.add_argument("--isoflop-budgets", type=float, action="append", default=[], metavar="FLOPS",
                        help="interpolate run curves at these budgets (repeatable); default: cluster final compute")
    parser.add_argument("--isoflop-tolerance", type=float, default=0.1,
                        help="runs within this relative compute share a budget (default 0.1)")
    parser.add_argument("--envelope-source", choices=("curves", "final"), default="curves")
    parser.add_argument("--curve-skip", type=float, default=0.1,
                        help="ignore the first fraction of each run's curve for the envelope (default 0.1)")
    parser.add_argument("--expert-saturation", type=float, default=None, metavar="E_MAX",
                        help="use Clark et al.'s saturating expert transform with this E_max")
    parser.add_argument("--loss-key", default="auto",
                        help="metrics.jsonl key of the training loss (default auto: the objective's own terms, "
                        "loss/mse, + loss/vb for DDPM, if logged, else loss, which also holds the MoE "
                        "auxiliary terms)")
    parser.add_argument("--loss-ema", type=float, default=0.9, help="EMA decay per log line for the training loss")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=COLUMN",
                        help="CSV column mapping, e.g. --column 'params=Model Size' (repeatable)")
    parser.add_argument("--drop-highest-loss", type=int, default=0, metavar="K", help="drop the K highest-loss runs")
    parser.add_argument("--include-unfinished", action="store_true", help="also read runs without a DONE file")
    parser.add_argument("--force", action="store_true", help="fit runs with different diffusion t-sampling settings")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from moedit.analysis.scaling.collect import check_single_distribution, collect, drop_highest_loss
    from moedit.analysis.scaling.report import ScalingOptions, analyze, arrays, to_json

    started = time.perf_counter()
    columns = _parse_columns(args.column)
    runs, skipped = collect(args.source, loss_key=args.loss_key, loss_ema=args.loss_ema,
                            include_unfinished=args.include_unfinished, columns=columns,
                            flops_per_param_token=args.flops_per_param_token or 6.0)
    kept = drop_highest_loss(runs, args.drop_highest_loss)
    dropped = [r.name for r in runs if all(r is not k for k in kept)]
    runs = kept
    t_sampling = check_single_distribution(runs, force=args.force)
    options = ScalingOptions(
        fits=tuple(f for f in args.fits.split(",") if f), params=args.params, data_unit=args.data_unit,
        grid=args.grid, resamples=args.bootstrap, level=args.level, seed=args.seed,
        flops_per_param_token=args.flops_per_param_token, extrapolate=tuple(args.extrapolate),
        isoflop_budgets=tuple(args.isoflop_budgets), isoflop_tolerance=args.isoflop_tolerance,
        envelope_source=args.envelope_source, curve_skip=args.curve_skip, e_max=args.expert_saturation,
        progress=not args.quiet,
    )
    report = analyze(runs, options)
    report.update(source=str(args.source), arguments={k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"},
                  skipped_runs=skipped, dropped_runs=dropped, t_sampling=t_sampling if t_sampling else "mixed (--force)")
    out = Path(args.out) if args.out else _default_out(Path(args.source))
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        from moedit.analysis.scaling.plots import write_plots

        report["plots"] = write_plots(report, runs, arrays(runs, options)["N"], out, _loss_label(runs))
    report["seconds"] = round(time.perf_counter() - started, 2)
    (out / "scaling.json").write_text(json.dumps(to_json(report), indent=1))
    print(summary(report))
    print(f"wrote {out / 'scaling.json'}" + (f" and {len(report.get('plots', []))} figures" if not args.no_plots else ""))
    return 0


def _parse_columns(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise ValueError(f"--column {item!r}: write NAME=COLUMN, e.g. --column 'params=Model Size'")
        mapping[name.strip()] = column
    return mapping


def _default_out(source: Path) -> Path:
    return source / "scaling" if source.is_dir() else source.with_name(source.stem + "_scaling")


def _loss_label(runs) -> str:
    sources = {r.loss_source for r in runs}
    if sources == {"eval"}:
        return "eval loss (held-out)"
    if len(sources) == 1 and next(iter(sources)).startswith("train_ema:"):
        return f"training loss ({next(iter(sources))[10:]}, EMA)"
    return "final loss"


def summary(report: dict) -> str:
    """Human-readable lines: each fit's parameters with intervals."""
    lines = [f"{report['num_runs']} runs"]
    for name, fit in report["fits"].items():
        if "skipped" in fit:
            lines.append(f"{name}: skipped ({fit['skipped']})")
            continue
        parts = []
        for key, value in fit["params"].items():
            ci = fit["ci"].get(key)
            parts.append(f"{key}={value:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
        lines.append(f"{name}: " + ", ".join(parts))
    for ex in report.get("extrapolation", []):
        lines.append(f"at C={ex['flops']:.3g}: " + json.dumps({k: v for k, v in ex.items() if k != "flops"},
                                                             default=lambda x: float(np.asarray(x))))
    return "\n".join(lines)
