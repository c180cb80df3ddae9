"""Training throughput of `moedit train` itself: one CLI subprocess per row, numbers read from the
run's own metrics.jsonl.

    python benchmarks/train.py [--rows DiffMoE-L-E8:32:local DiffMoE-L-E8:32:megatron ...]
        [--steps 60] [--warmup 20] [--data /tmp/moedit_synthetic_4x32x32] [--json out.json] [-- OVERRIDE ...]

A row is FLAVOR:GLOBAL_BATCH:ENGINE (engine: local, ddp, deepspeed, megatron). Each row trains from
configs/diffmoe_l_e16_imagenet256.yaml with the flavor, batch and engine swapped in, on synthetic
4x32x32 latents over 1,000 classes (the shape of 256px SD-VAE latents; `moedit prepare` makes them
once at --data),
for --steps steps, logging every --log-every steps, with checkpoints, samples and TensorBoard off.
Trailing overrides apply to every row. The table reports the mean over the log intervals that end
after --warmup steps (compilation, autotuning and allocation happen before): images/s, step ms,
MFU and peak GPU memory as the trainer logged them, and the ratio of each row's step time to the
first row of the same batch (the engine comparison) and to the dense DiT of the same size where
one was run (the MoE overhead). Multi-GPU rows: torchrun with --nproc GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "diffmoe_l_e16_imagenet256.yaml"
DENSE_OF = {"DiffMoE-L-E8": "DiT-L/2", "DiffMoE-L-E16": "DiT-L/2", "DiffMoE-B-E16": "DiT-B/2",
            "DiffMoE-S-E16": "DiT-S/2"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["DiffMoE-L-E8:32:local", "DiffMoE-L-E8:32:megatron",
                                                      "DiffMoE-L-E8:128:local", "DiffMoE-L-E8:128:megatron"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the means")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per row")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "moedit_synthetic_4x32x32"))
    parser.add_argument("--runs", default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per row")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every row")
    return parser.parse_args(argv)


def command(flavor: str, batch: int, engine: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    overrides = [
        f"model.flavor={flavor}", f"train.global_batch_size={batch}", f"parallel.engine={engine}",
        f"train.run_dir={run_dir}", "train.resume=never", f"train.steps={args.steps}",
        f"data.path={args.data}", "data.num_workers=4", "data.shuffle_buffer=1000",
        f"logging.log_every={args.log_every}", "logging.tensorboard=false", "logging.progress=lines",
        "train.sample_every=0", "train.num_sample_images=0", f"checkpoint.every={10 * args.steps}",
        *args.overrides,
    ]
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                "-m", "moedit.cli", "train", str(CONFIG), *overrides]
    return [sys.executable, "-m", "moedit.cli", "train", str(CONFIG), *overrides]


def summarize(rows: list[dict], warmup: int) -> dict:
    """Means over the log intervals that end after `warmup` steps."""
    steady = [r for r in rows if r["step"] > warmup and "images_per_s" in r]
    if not steady:
        return {}
    mean = lambda key: sum(r[key] for r in steady) / len(steady) if all(key in r for r in steady) else None
    out = {"images_per_s": mean("images_per_s"), "mfu": mean("mfu"), "loss": steady[-1].get("loss"),
           "peak_gib": max((r.get("mem/peak_gib", 0.0) for r in steady), default=None), "intervals": len(steady)}
    return out


def run_row(spec: str, runs: Path, args: argparse.Namespace) -> dict:
    flavor, batch, engine = spec.split(":")
    batch = int(batch)
    run_dir = runs / spec.replace("/", "_").replace(":", "-")
    cmd = command(flavor, batch, engine, run_dir, args)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    row = {"row": spec, "flavor": flavor, "batch": batch, "engine": engine, "wall_s": time.time() - t0,
           "exit": proc.returncode, "command": " ".join(["moedit", *cmd[cmd.index("train"):]])}
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        row["error"] = (proc.stdout + proc.stderr)[-2000:]
        return row
    row.update(summarize([json.loads(line) for line in metrics.read_text().splitlines()], args.warmup))
    if row.get("images_per_s"):
        row["step_ms"] = 1000.0 * batch / row["images_per_s"]
    return row


def table(rows: list[dict]) -> str:
    first_of_batch: dict[int, dict] = {}
    dense: dict[tuple[str, int, str], dict] = {}
    for r in rows:
        if "step_ms" in r:
            first_of_batch.setdefault(r["batch"], r)
            dense[(r["flavor"], r["batch"], r["engine"])] = r
    lines = ["| row | img/s | step ms | MFU | peak GiB | vs first row of batch | vs dense | exit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"| {r['row']} | - | - | - | - | - | - | {r['exit']} |")
            continue
        base = first_of_batch[r["batch"]]
        twin = dense.get((DENSE_OF.get(r["flavor"], ""), r["batch"], r["engine"]))
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        vs_dense = f"{r['step_ms'] / twin['step_ms']:.3f}" if twin else "-"
        lines.append(f"| {r['row']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {mfu} | {peak} | "
                     f"{base['images_per_s'] and r['images_per_s'] / base['images_per_s']:.3f}x img/s | {vs_dense} | "
                     f"{r['exit']} |")
    return "\n".join(lines)


def prepare_data(path: str) -> None:
    if (Path(path) / "dataset.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "moedit.cli", "prepare", "--source", "synthetic", "--output", path,
                    "--latent-shape", "4,32,32", "--num-classes", "1000", "--num-samples", "8192", "--no-progress"],
                   cwd=ROOT, check=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    prepare_data(args.data)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="moedit_bench_"))
    rows = []
    for spec in args.rows:
        rows.append(run_row(spec, runs, args))
        r = rows[-1]
        print(f"{spec}: exit {r['exit']}, {r.get('images_per_s', float('nan')):.1f} img/s, "
              f"{r['wall_s']:.0f} s wall" + (f"\n{r['error']}" if "error" in r else ""), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
