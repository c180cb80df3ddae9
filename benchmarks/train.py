"""Training throughput of `moedit train` itself: one CLI subprocess per row, numbers read from the
run's own metrics.jsonl. No training step of its own: what is timed is the loop users run.

    python benchmarks/train.py [--rows DiffMoE-L-E8:32:local DiffMoE-L-E8:32:megatron ...]
        [--steps 60] [--warmup 20] [--nproc 1] [--data /tmp/moedit_synthetic_4x32x32] [--json out.json]
        [OVERRIDE ...]

A row is FLAVOR:GLOBAL_BATCH:ENGINE[@NPROC][:section.key=value ...]:
- ENGINE is local, ddp, deepspeed or megatron, or a shorthand: zero1, zero2, zero3 (deepspeed at
  that ZeRO stage) and zero2-bf16 (ZeRO-2 in DeepSpeed's bf16 mode: bf16 weights, fp32 masters);
- @NPROC launches the row with torchrun on NPROC processes (GPUs), default --nproc; a row with
  one process runs `moedit train` directly;
- the overrides after it apply to that row only (after the trailing ones), e.g. a Megatron layout:
  `DiffMoE-L-E16:256:megatron@2:parallel.expert=2` or
  `DiffMoE-S-E16:64:megatron@4:parallel.tensor=2:parallel.sequence_parallel=true:parallel.expert=2`.

Each row trains from configs/diffmoe_l_e16_imagenet256.yaml with the flavor, batch, engine and
overrides swapped in, on synthetic latents of --latent-shape over --num-classes classes (default
4x32x32 over 1,000: the shape of 256px SD-VAE latents; `moedit prepare` makes them once at --data;
model.input_size, model.in_channels and model.num_classes follow them unless overridden), for
--steps steps, logging every --log-every steps, with checkpoints (`checkpoint.final=false`),
samples and TensorBoard off; a row's checkpoints (a stop signal's) are deleted after it is read.
Trailing overrides apply to every row.

--repo DIR runs the `moedit train` of another checkout (e.g. `git worktree add /tmp/base COMMIT`)
with the same overrides, its own configs/ file and no checkpoint.final (older code has no such
key; its final checkpoint is deleted after the row): before/after tables of one change on one
machine.

The table reports the log intervals that end after --warmup steps (compilation, autotuning,
allocation and the trainer's setup fall before; --warmup must be a positive multiple of
--log-every): images/s of the whole run (total images / total time of those intervals), images/s
per process, step ms, MFU per GPU (as the trainer logs it), the peak GPU memory rank 0 logged, and
the ratio of each row's images/s to the first row of the same global batch (the engine
comparison) and its step time to the dense DiT of the same size, batch, engine, process count
and row overrides where one was run (the MoE overhead); a text flavor's (`-T`) to its
class-conditional twin. Text
rows train on synthetic latents with captions whose features are random (`moedit prepare
--text-encoder random:WIDTH`, --text-samples of them, at the flavor's text_len x text_dim: T5-XXL's
120 x 4096 for the `-T` flavors), so they pay for reading and attending to such features without
a T5. A row with `train.repa.enabled=true` trains on the same latents with a `repa` field of
--repa-width random features on the patch-2 token grid (`moedit prepare --repa-encoder
random:WIDTH`), so REPA's overhead is the step time against the same row without it (the column
`step vs no REPA`, where the table has that row). Each row's output goes to RUNS/<row>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner import run_logged  # benchmarks/runner.py (this directory is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "diffmoe_l_e16_imagenet256.yaml"
DENSE_OF = {"DiffMoE-L-E8": "DiT-L/2", "DiffMoE-L-E16": "DiT-L/2", "DiffMoE-B-E16": "DiT-B/2",
            "DiffMoE-S-E16": "DiT-S/2"}
ENGINES = ("local", "ddp", "deepspeed", "megatron")
REPA_ON = "train.repa.enabled=true"  # a REPA row: its data has a feature field; its overhead has a column

# shorthand -> (engine, overrides)
ALIASES = {
    "zero1": ("deepspeed", ["deepspeed.zero_stage=1"]),
    "zero2": ("deepspeed", ["deepspeed.zero_stage=2"]),
    "zero3": ("deepspeed", ["deepspeed.zero_stage=3"]),
    "zero2-bf16": ("deepspeed", ["deepspeed.zero_stage=2", "deepspeed.bf16=true"]),
}


@dataclass
class Row:
    spec: str
    flavor: str
    batch: int
    engine: str
    nproc: int
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.spec.replace("/", "_").replace(":", "-"))


def parse_row(spec: str, nproc: int) -> Row:
    """FLAVOR:BATCH:ENGINE[@NPROC][:section.key=value ...] (a value may hold ':' if the next field
    does not look like `section.key=`)."""
    parts = spec.split(":", 3)
    if len(parts) < 3:
        raise ValueError(f"row {spec!r}: expected FLAVOR:GLOBAL_BATCH:ENGINE[@NPROC][:section.key=value ...]")
    flavor, batch, engine = parts[:3]
    extra = re.split(r":(?=[A-Za-z_]+\.[A-Za-z_.]+=)", parts[3]) if len(parts) > 3 else []
    if "@" in engine:
        engine, n = engine.split("@", 1)
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"row {spec!r}: @{n} must be a process count >= 1")
        nproc = int(n)
    if not batch.isdigit():
        raise ValueError(f"row {spec!r}: global batch {batch!r} is not a number")
    overrides = []
    if engine in ALIASES:
        engine, overrides = ALIASES[engine][0], list(ALIASES[engine][1])
    if engine not in ENGINES:
        raise ValueError(f"row {spec!r}: engine {engine!r} is none of {', '.join([*ENGINES, *ALIASES])}")
    bad = [o for o in extra if "=" not in o]
    if bad:
        raise ValueError(f"row {spec!r}: {bad[0]!r} is not a section.key=value override")
    return Row(spec, flavor, int(batch), engine, nproc, overrides + extra)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["DiffMoE-L-E8:32:local", "DiffMoE-L-E8:32:megatron",
                                                      "DiffMoE-L-E8:128:local", "DiffMoE-L-E8:128:megatron"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the means (a multiple of "
                        "--log-every)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) of a row without @NPROC")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "moedit_synthetic_4x32x32"))
    parser.add_argument("--latent-shape", default="4,32,32", help="C,H,W of the synthetic latents at --data")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=8192, help="synthetic latents to prepare")
    parser.add_argument("--text-samples", type=int, default=1024,
                        help="synthetic latents with captions for text flavors (random features: about 1 MB each "
                             "at T5-XXL's 120 x 4096), and with REPA features for REPA rows (0.4 MB each)")
    parser.add_argument("--repa-width", type=int, default=768,
                        help="width of the random REPA features of rows with train.repa.enabled=true (DINOv2-B: 768)")
    parser.add_argument("--num-workers", type=int, default=4, help="data.num_workers of every rank")
    parser.add_argument("--runs", default=None, help="where the run directories and logs go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per row")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--repo", default=None, help="run the moedit of this checkout instead (another commit)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every row")
    args = parser.parse_args(argv)
    if args.log_every < 1 or args.warmup < args.log_every or args.warmup % args.log_every:
        parser.error(f"--warmup {args.warmup} must be a positive multiple of --log-every {args.log_every} (the first "
                     "log interval holds the trainer's setup; a mean must start at an interval boundary)")
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    try:
        args.parsed_rows = [parse_row(spec, args.nproc) for spec in args.rows]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def text_shape(flavor: str) -> tuple[int, int] | None:
    """(text_len, text_dim) of a text flavor, None for a class one."""
    from moedit.models.flavors import get_flavor

    cfg = get_flavor(flavor)
    return (cfg.text_len, cfg.text_dim) if cfg.condition == "text" else None


def synthetic_data(args: argparse.Namespace, suffix: str, extra: list[str]) -> str:
    """Synthetic latents at `--data`_`suffix` with the `moedit prepare` options `extra` (prepared
    once), --text-samples of them."""
    path = f"{args.data}_{suffix}"
    if not (Path(path) / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "moedit.cli", "prepare", "--source", "synthetic", "--output", path,
                        "--latent-shape", args.latent_shape, "--num-classes", str(args.num_classes),
                        "--num-samples", str(args.text_samples), *extra, "--no-progress"], cwd=ROOT, check=True)
    return path


def text_data(args: argparse.Namespace, shape: tuple[int, int]) -> str:
    """Captions with random text features of `shape`: a text row pays for reading and attending to
    T5-sized features without needing a T5."""
    return synthetic_data(args, f"text{shape[0]}x{shape[1]}",
                          ["--text-encoder", f"random:{shape[1]}", "--text-max-length", str(shape[0])])


def repa_data(args: argparse.Namespace) -> str:
    """A `repa` field of --repa-width random features on the patch-2 token grid: a REPA row pays for
    reading the targets and the projector and its loss."""
    _, h, _ = (int(v) for v in args.latent_shape.split(","))
    return synthetic_data(args, f"repa{args.repa_width}",
                          ["--repa-encoder", f"random:{args.repa_width}", "--repa-grid", str(h // 2)])


def command(row: Row, run_dir: Path, args: argparse.Namespace) -> list[str]:
    c, h, _ = (int(v) for v in args.latent_shape.split(","))
    text = text_shape(row.flavor)
    repa = REPA_ON in [*args.overrides, *row.overrides]
    if text and repa:
        raise ValueError(f"{row.spec}: a text row with REPA: prepare such data yourself and pass --data")
    data = text_data(args, text) if text else repa_data(args) if repa else args.data
    overrides = [
        f"model.flavor={row.flavor}", f"model.input_size={h}", f"model.in_channels={c}",
        *([] if text else [f"model.num_classes={args.num_classes}"]),
        f"train.global_batch_size={row.batch}", f"parallel.engine={row.engine}",
        f"train.run_dir={run_dir}", "train.resume=never", f"train.steps={args.steps}",
        f"data.path={data}", f"data.num_workers={args.num_workers}",
        "data.shuffle_buffer=1000",
        f"logging.log_every={args.log_every}", "logging.tensorboard=false", "logging.progress=lines",
        "train.sample_every=0", "train.num_sample_images=0", f"checkpoint.every={10 * args.steps}",
        *([] if args.repo else ["checkpoint.final=false"]), *args.overrides, *row.overrides,
    ]
    config = Path(args.repo or ROOT) / CONFIG.relative_to(ROOT)
    if row.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={row.nproc}",
                "-m", "moedit.cli", "train", str(config), *overrides]
    return [sys.executable, "-m", "moedit.cli", "train", str(config), *overrides]


def summarize(rows: list[dict], warmup: int, batch: int) -> dict:
    """The log intervals that end after `warmup` steps, weighted by their time: images/s = images /
    seconds over them, MFU likewise (it is proportional to images/s within a run)."""
    logged = [r for r in rows if "images_per_s" in r and "step" in r]
    images = seconds = mfu_seconds = 0.0
    intervals, previous = 0, 0
    for r in logged:
        steps, previous = r["step"] - previous, r["step"]
        if r["step"] <= warmup or steps <= 0 or r["images_per_s"] <= 0:
            continue
        n = steps * batch
        t = n / r["images_per_s"]
        images, seconds, intervals = images + n, seconds + t, intervals + 1
        mfu_seconds = mfu_seconds + r["mfu"] * t if mfu_seconds is not None and "mfu" in r else None
    if not intervals:
        return {}
    peaks = [r["mem/peak_gib"] for r in logged if r["step"] > warmup and "mem/peak_gib" in r]
    return {"images_per_s": images / seconds, "mfu": mfu_seconds / seconds if mfu_seconds is not None else None,
            "loss": logged[-1].get("loss"), "peak_gib": max(peaks) if peaks else None, "intervals": intervals,
            "world_size": logged[-1].get("world_size")}


def run_row(row: Row, runs: Path, args: argparse.Namespace) -> dict:
    run_dir = runs / row.name
    cmd = command(row, run_dir, args)
    log = runs / f"{row.name}.log"
    t0 = time.time()
    code = run_logged(cmd, log, args.timeout, cwd=args.repo or ROOT)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # an L-size checkpoint is tens of GB
    launcher = ["torchrun", *cmd[cmd.index("--standalone"):cmd.index("-m", 3)]] if row.nproc > 1 else []
    out = {"row": row.spec, "flavor": row.flavor, "batch": row.batch, "engine": row.engine, "nproc": row.nproc,
           "overrides": row.overrides, "wall_s": time.time() - t0, "exit": code, "log": str(log),
           "command": " ".join([*launcher, "moedit", *cmd[cmd.index("train"):]])}
    if args.repo:
        out["repo"] = args.repo
    metrics = run_dir / "metrics.jsonl"
    if code != 0 or not metrics.is_file():
        out["error"] = log.read_text(errors="replace")[-2000:]
        return out
    out.update(summarize([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()],
                         args.warmup, row.batch))
    info = run_dir / "model_info.json"
    if info.is_file():  # whether the step ran as a CUDA graph (train.cuda_graph; auto decides per run)
        out["cuda_graph"] = json.loads(info.read_text()).get("cuda_graph")
    if out.get("images_per_s"):
        out["step_ms"] = 1000.0 * row.batch / out["images_per_s"]
    else:
        out["error"] = f"no log interval after step {args.warmup} in {metrics}"
    return out


def twin_of(flavor: str) -> str:
    """The flavor a row's step time is compared with: a text flavor's class twin, an MoE flavor's dense DiT."""
    return flavor[: -len("-T")] if flavor.endswith(("-T", "-t")) else DENSE_OF.get(flavor, "")


def table(rows: list[dict]) -> str:
    first_of_batch: dict[int, dict] = {}
    same: dict[tuple, dict] = {}
    for r in rows:
        if "step_ms" in r:
            first_of_batch.setdefault(r["batch"], r)
            same.setdefault((r["flavor"], r["batch"], r["engine"], r["nproc"], tuple(r["overrides"])), r)
    lines = ["| row | procs | img/s | img/s per proc | step ms | MFU per GPU | peak GiB (rank 0) | img/s vs first row "
             "of batch | step vs dense (text: vs class) | step vs no REPA | exit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"| {r['row']} | {r['nproc']} | - | - | - | - | - | - | - | - | {r['exit']} |")
            continue
        base = first_of_batch[r["batch"]]
        key = (r["batch"], r["engine"], r["nproc"])
        twin = same.get((twin_of(r["flavor"]), *key, tuple(r["overrides"])))
        # REPA's overhead: the same row without train.repa.enabled=true, if the table has it
        plain = tuple(o for o in r["overrides"] if o != REPA_ON)
        no_repa = same.get((r["flavor"], *key, plain)) if plain != tuple(r["overrides"]) else None
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        vs_dense = f"{r['step_ms'] / twin['step_ms']:.3f}x" if twin else "-"
        vs_plain = f"{r['step_ms'] / no_repa['step_ms']:.3f}x" if no_repa else "-"
        lines.append(f"| {r['row']} | {r['nproc']} | {r['images_per_s']:.1f} | {r['images_per_s'] / r['nproc']:.1f} | "
                     f"{r['step_ms']:.1f} | {mfu} | {peak} | {r['images_per_s'] / base['images_per_s']:.3f}x | "
                     f"{vs_dense} | {vs_plain} | {r['exit']} |")
    return "\n".join(lines)


def prepare_data(args: argparse.Namespace) -> None:
    if (Path(args.data) / "dataset.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "moedit.cli", "prepare", "--source", "synthetic", "--output", args.data,
                    "--latent-shape", args.latent_shape, "--num-classes", str(args.num_classes),
                    "--num-samples", str(args.samples), "--no-progress"], cwd=ROOT, check=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    prepare_data(args)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="moedit_bench_"))
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for row in args.parsed_rows:
        results.append(run_row(row, runs, args))
        r = results[-1]
        print(f"{row.spec}: exit {r['exit']}, {r.get('images_per_s', float('nan')):.1f} img/s, "
              f"{r['wall_s']:.0f} s wall; {r['command']}" + (f"\n{r['error']}" if "error" in r else ""), flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0 if all(r["exit"] == 0 and "error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
