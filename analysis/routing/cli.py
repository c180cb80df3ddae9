"""`moedit analyze routing RUN [RUN ...]`: expert-routing report from logs and/or a probe.

Dispatched from `moedit analyze` (analysis/cli.py); defines add_arguments(parser) and
main(args) -> int like every moedit command module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moedit.errors import MoeditError


def _levels(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--noise-levels {text!r}: expected comma-separated "
                                         "floats in [0, 1], e.g. 0.1,0.5,0.9") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--noise-levels {text!r}: values must lie in [0, 1]")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories written by `moedit train` (several: side by side)")
    parser.add_argument("--out", help="output directory (default RUN/analysis/routing for one "
                        "run; required for several)")
    parser.add_argument("--last", type=int, default=5, metavar="N",
                        help="sum the last N logging intervals for the headline metrics "
                        "(0 = all; default 5)")
    parser.add_argument("--no-html", action="store_true", help="write only JSON and Markdown")
    parser.add_argument("--samples", metavar="FILE.json",
                        help="also report the routing of a `moedit sample` JSON (of a text run: expert load by "
                        "prompt); only with one RUN")
    probe = parser.add_argument_group("offline probe (runs the EMA model of a checkpoint)")
    probe.add_argument("--probe", action="store_true",
                       help="also run the model over held-out shards and record per-token routing")
    probe.add_argument("--checkpoint", help="checkpoint dir or safetensors (default: the run's "
                       "latest; only with one RUN)")
    probe.add_argument("--shards", help="held-out shard directory (default: the run's data config)")
    probe.add_argument("--noise-levels", type=_levels, default=_levels("0.05,0.25,0.5,0.75,0.95"),
                       help="comma-separated noise levels in [0, 1] (1 = pure noise)")
    probe.add_argument("--trajectory", action="store_true",
                       help="probe full sampling trajectories instead of fixed noise levels")
    probe.add_argument("--sampling-steps", type=int, default=50, help="steps per trajectory")
    probe.add_argument("--num-samples", type=int, default=256,
                       help="samples to probe (default 256): held-out latents, each at every noise level, or "
                       "trajectories; the time grows linearly with it (the plan and an estimate are printed first)")
    probe.add_argument("--batch-size", type=int, default=32)
    probe.add_argument("--noise-bins", type=int, default=10,
                       help="noise-level bins when the run logged none")
    probe.add_argument("--predictor-threshold", type=float, default=0.5,
                       help="probability above which the capacity predictor counts as 'select'")
    probe.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if "
                       "available)")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--trace", metavar="FILE.npz",
                       help="also write a compact per-token trace (memory grows with samples)")
    probe.add_argument("--trace-scores", action="store_true",
                       help="store router scores and predictor probabilities in the trace too "
                       "(float16; needed for entropy and predictor metrics from a trace)")
    probe.add_argument("--cfg-scale", type=float, default=1.0,
                       help="guidance scale of probed trajectories (> 1 adds null-class tokens)")
    probe.add_argument("--sampler", default=None, help="sampler of probed trajectories "
                       "(default: the config's)")
    probe.add_argument("--repa-bins", type=int, default=5, metavar="Q",
                       help="REPA runs: quantile bins of the per-token REPA similarity for expert load by "
                       "similarity (default 5)")
    probe.add_argument("--from-trace", metavar="FILE.npz",
                       help="analyse a trace written earlier instead of running the model")


def _check_args(args: argparse.Namespace) -> None:
    if len(args.runs) > 1 and not args.out:
        raise MoeditError("several runs given: pass --out DIR for the comparison report")
    if args.last < 0:
        raise MoeditError(f"--last {args.last}: must be >= 0")
    if (args.checkpoint or args.from_trace or args.trace or args.samples) and len(args.runs) > 1:
        raise MoeditError("--checkpoint, --trace, --from-trace and --samples take one RUN only")
    if args.trace and not args.probe:
        raise MoeditError("--trace FILE records the probe's decisions: add --probe")
    if args.probe and args.from_trace:
        raise MoeditError("--probe and --from-trace exclude each other: run the model or read a trace")
    if args.num_samples < 1 or args.batch_size < 1 or args.sampling_steps < 1 or args.repa_bins < 1:
        raise MoeditError("--num-samples, --batch-size, --sampling-steps and --repa-bins must be >= 1")


def _probe_run(args: argparse.Namespace, run) -> dict | None:
    if not (args.probe or args.from_trace):
        return None
    # imported here: the probe pulls in torch and the model zoo, the log report does not
    from moedit.analysis.routing import probe as routing_probe, trace as routing_trace

    edges = (run.routing[-1][1].get("noise_bin_edges") if run.routing else None)
    if not edges or len(edges) < 2:
        from moedit.analysis.routing.accumulate import uniform_edges
        edges = uniform_edges(args.noise_bins)
    if args.from_trace:
        return routing_trace.analyse_trace(args.from_trace, edges, args.predictor_threshold,
                                           similarity_bins=args.repa_bins)
    options = routing_probe.ProbeOptions(
        noise_levels=args.noise_levels, trajectory=args.trajectory,
        sampling_steps=args.sampling_steps, num_samples=args.num_samples,
        batch_size=args.batch_size, predictor_threshold=args.predictor_threshold,
        device=args.device, seed=args.seed, shards=args.shards, trace=args.trace,
        trace_scores=args.trace_scores, cfg_scale=args.cfg_scale, sampler=args.sampler,
        repa_bins=args.repa_bins)
    source = args.checkpoint or run.path
    device = routing_probe._device(args.device)
    model, cfg = routing_probe.load_model(source, device)
    print(probe_plan(options, cfg, model, device), flush=True)
    return routing_probe.probe(source, edges, options, loaded=(model, cfg))


# model calls per sampler step (Heun evaluates the velocity twice per step)
CALLS_PER_STEP = {"heun": 2}


def probe_plan(options, cfg, model, device) -> str:
    """What the probe will do and about how long it takes: the forwards it makes, times one timed
    forward of a batch on `device` (after a warm-up one). Printed before the probe starts."""
    import math
    import time

    import torch

    batches = math.ceil(options.num_samples / options.batch_size)
    guided = options.trajectory and options.cfg_scale != 1.0 and cfg.model.num_classes > 0
    rows = options.batch_size * (2 if guided else 1)  # guidance: a conditional and a null-class half
    if options.trajectory:
        sampler = options.sampler or cfg.diffusion.default_sampler
        calls = options.sampling_steps * CALLS_PER_STEP.get(sampler, 1)
        forwards = batches * calls
        what = (f"{options.num_samples} sampling trajectories of {options.sampling_steps} {sampler} steps "
                f"({calls} model calls each" + (", guided: batches of 2 x " if guided else ", batches of ")
                + f"{options.batch_size})")
    else:
        forwards = batches * len(options.noise_levels)
        what = (f"{options.num_samples} held-out samples at {len(options.noise_levels)} noise levels "
                f"(batches of {options.batch_size})")
    m = cfg.model
    x = torch.zeros(min(rows, options.num_samples * (2 if guided else 1)), m.in_channels, m.input_size, m.input_size,
                    device=device)
    t = torch.full((x.shape[0],), 0.5 if cfg.diffusion.objective == "flow" else cfg.diffusion.num_timesteps / 2,
                   device=device)
    y = torch.zeros(x.shape[0], dtype=torch.long, device=device) if m.num_classes > 0 else None
    from moedit.models.stats import routing_stat_tensors

    saved = [(buf, buf.clone()) for buf in routing_stat_tensors(model)]  # the timing leaves no trace
    with torch.no_grad():
        model(x, t, y)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_forward = time.perf_counter() - start
        for buf, value in saved:
            buf.copy_(value)
    total = per_forward * forwards
    estimate = f"{total / 60:.1f} min" if total >= 90 else f"{total:.0f} s"
    return (f"routing probe: {what} = {forwards} forwards on {device}; about {estimate} "
            f"({per_forward * 1000:.0f} ms per forward). --num-samples"
            + (", --sampling-steps" if options.trajectory else ", --noise-levels") + " and --batch-size change it")


def main(args: argparse.Namespace) -> int:
    from moedit.analysis.routing import report as routing_report, sources as routing_sources

    _check_args(args)
    want_probe = bool(args.probe or args.from_trace)
    samples = routing_sources.read_samples(args.samples) if args.samples else None
    entries = []
    for run_dir in args.runs:
        run = routing_sources.read_run(run_dir, require_routing=not (want_probe or samples))
        probe = _probe_run(args, run)
        entries.append(routing_report.run_entry(run, args.last or None, probe, samples))
    report = routing_report.build_report(entries)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "analysis" / "routing"
    paths = routing_report.write_report(report, out, write_html=not args.no_html)
    for kind, path in paths.items():
        print(f"{kind:8s} {path}")
    return 0
