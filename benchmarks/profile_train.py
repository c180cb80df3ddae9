"""Kernel profile of the trainer's own step: builds the real `Trainer` from a config and overrides
(what `moedit train` builds) and profiles `trainer.train_step()` with torch.profiler. No step code
of its own: what is profiled is the loop users run. Throughput numbers come from
benchmarks/train.py (the run's metrics.jsonl), not from here.

    python benchmarks/profile_train.py [--config configs/diffmoe_l_e16_imagenet256.yaml] \\
        [--warmup 5] [--steps 5] [--top 30] [--trace trace.json] [section.key=value ...]
    torchrun --nproc_per_node 2 benchmarks/profile_train.py parallel.engine=megatron parallel.expert=2

Defaults as benchmarks/train.py: synthetic latents of --latent-shape over --num-classes classes at
--data (prepared once), model.input_size/in_channels/num_classes from them, the run directory in a
temp dir, no resume, no TensorBoard. The flavor is the config's unless model.flavor=... is given.
--warmup steps run first (compilation, autotuning, allocation), then --steps steps are timed
without the profiler, then --steps more are profiled. Rank 0 prints the unprofiled wall time per
step, the GPU's kernel time per step (from the profile) and their ratio (under 100%: the GPU waits
for the host or the data), then the top --top operators by device time (CPU time on CPU); with
--trace it writes a Chrome trace (rank r > 0 writes TRACE.rank<r>).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo, for `moedit`


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "diffmoe_l_e16_imagenet256.yaml"))
    parser.add_argument("--warmup", type=int, default=5, help="steps before profiling")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--top", type=int, default=30, help="rows of the operator table")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "moedit_synthetic_4x32x32"))
    parser.add_argument("--latent-shape", default="4,32,32", help="C,H,W of the synthetic latents at --data")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=8192, help="synthetic latents to prepare")
    parser.add_argument("--sync-check", action="store_true",
                        help="run one more step under CUDA's sync debug mode and print where the host waited")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied last")
    return parser.parse_args(argv)


def prepare_data(args: argparse.Namespace, rank: int) -> None:
    """Rank 0 prepares; the others wait for the manifest (no process group exists yet)."""
    manifest = Path(args.data) / "dataset.json"
    if rank == 0 and not manifest.is_file():
        subprocess.run([sys.executable, "-m", "moedit.cli", "prepare", "--source", "synthetic", "--output", args.data,
                        "--latent-shape", args.latent_shape, "--num-classes", str(args.num_classes),
                        "--num-samples", str(args.samples), "--no-progress"], cwd=ROOT, check=True)
    import time

    while not manifest.is_file():
        time.sleep(1)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    prepare_data(args, rank)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from moedit.train.config import load_config
    from moedit.train.trainer import Trainer

    c, h, _ = (int(v) for v in args.latent_shape.split(","))
    run_dir = tempfile.mkdtemp(prefix=f"moedit_profile_r{rank}_")
    cfg = load_config(args.config, [
        f"model.input_size={h}", f"model.in_channels={c}", f"model.num_classes={args.num_classes}",
        f"data.path={args.data}", f"train.run_dir={run_dir}", "train.resume=never",
        f"train.steps={args.warmup + 2 * args.steps + 1}", "logging.tensorboard=false", "logging.progress=none",
        "train.sample_every=0", "train.num_sample_images=0", *args.overrides])
    trainer = Trainer(cfg).setup()
    engine = trainer.engine
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        cuda = trainer.device.type == "cuda"
        import time

        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - t0) / args.steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
        if engine.is_main:
            print(f"# {cfg.flavor}: engine {engine.name}, world {engine.world_size}, global batch "
                  f"{cfg.train.global_batch_size} (micro-batch {trainer.micro_batch} x {trainer.accum_steps}), "
                  f"precision {cfg.train.precision}, {trainer.device}; {args.steps} trainer.train_step() calls "
                  f"after {args.warmup}", flush=True)
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            averages = prof.key_averages()
            if cuda:  # kernels only (no CPU-side rows): the time the GPU computed
                from torch.autograd import DeviceType

                busy_ms = sum(e.self_device_time_total for e in averages
                              if getattr(e, "device_type", None) == DeviceType.CUDA) / 1000 / args.steps
                print(f"step wall {wall_ms:.1f} ms (unprofiled), GPU kernel time {busy_ms:.1f} ms per step: "
                      f"GPU busy {100 * busy_ms / wall_ms:.0f}%", flush=True)
            else:
                print(f"step wall {wall_ms:.1f} ms (unprofiled)", flush=True)
            print(averages.table(sort_by=sort, row_limit=args.top), flush=True)
        if args.sync_check and cuda and engine.is_main:
            print(sync_report(trainer), flush=True)
        if args.trace:
            prof.export_chrome_trace(args.trace if rank == 0 else f"{args.trace}.rank{rank}")
    finally:
        if trainer.logger is not None:
            trainer.logger.close()
        engine.shutdown()
    return 0


def sync_report(trainer) -> str:
    """One trainer step under torch.cuda.set_sync_debug_mode("warn"): each place a CUDA call made the
    host wait for the device, as the innermost frames of the Python stack that reached it."""
    import collections
    import traceback
    import warnings

    import torch

    places: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message) or "prototype" in str(message):
            return  # other warnings (deprecations, ...) and the debug mode's own notice
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-4:]
        places[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step()
                torch.cuda.set_sync_debug_mode("default")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = previous
    lines = [f"host syncs in one step: {sum(places.values())}"]
    lines += [f"  {n:4d}x {where}" for where, n in places.most_common(15)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
