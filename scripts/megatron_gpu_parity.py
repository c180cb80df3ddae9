#!/usr/bin/env python3
"""Parity of `moedit train` on the Megatron-Core engine with the local engine, on GPUs: the real
Trainer on both sides, compared through the rows each run logs in its own metrics.jsonl.

    python scripts/megatron_gpu_parity.py --layouts tp2 --json parity_tp2.json   # or ep2, pp2, dp2
    python scripts/megatron_gpu_parity.py                    # every layout this machine's GPUs fit
    python scripts/megatron_gpu_parity.py --layouts one      # TP=EP=PP=1 on one GPU
    python scripts/megatron_gpu_parity.py --compare RUN_A RUN_B --rtol 1e-4   # two existing runs

For each precision (train.precision: fp32, bf16) and flavor, the local engine trains the model for
--steps steps on one GPU (the reference, kept in --runs and reused while its command and moedit's
sources are the same); then for each layout the megatron engine trains the same config (same
seed, data and global batch) under `torchrun --nproc_per_node WORLD`. Every logged row (log_every = 1) is
compared: `loss`, each `loss/<term>` and `grad_norm`, as relative differences
|a - b| / max(|a|, |b|) (plus --atol); the table shows the worst one over the steps and names it.
The trainer draws the noise, t and label dropout of each micro-batch from (seed, step, global
micro-batch index) on every engine, and every layout runs micro-batches of --micro-batch images
(the reference accumulates global batch / micro-batch of them; a layout with D data-parallel
replicas runs global batch / (D x micro-batch) per replica), so both sides see the same numbers
and route the same pools.

The model: the flavor (default DiffMoE-S-E16) at --depth blocks (default 4; MoE in blocks 1 and
3, one per stage at PP=2) on synthetic 4x16x16 latents over 10 classes (`moedit prepare --source
synthetic`, once, at --data), from configs/megatron_diffmoe_s_e16_synthetic.yaml, no LR warm-up.

Tolerances (--rtol-fp32, --rtol-bf16), as the earlier one-step parity script documented them:
- fp32: 1e-4, the exact check of the GPU code paths (NCCL collectives, CUDA kernels). Runs get
  NVIDIA_TF32_OVERRIDE=0, so no cuBLAS/cuDNN call of either side uses TF32 (torch leaves cuDNN
  convolutions on TF32 by default).
- bf16: 2e-2. train.precision=bf16 is bf16 autocast over fp32 weights on both engines (the
  megatron engine's default optimizer, torch AdamW); `--megatron-set
  parallel.megatron_optimizer=distributed` compares Megatron's own recipe (bf16 parameters, fp32
  master weights) instead. Routing is discontinuous: a near-tied token that switches experts moves
  an expert's gradient by about 1/K (K tokens per expert), which this tolerance absorbs in the
  logged means, not in single gradients.

`--engine ddp` (or deepspeed) compares that engine instead on the layouts it runs (one, dp2):
with `--device cpu` the whole script, runs and comparison included, works on a CPU machine.

Exit status 1 if any row fails; rows are printed as they finish and the table at the end; --json
writes the rows. Each run's output is in RUNS/<name>.log. Run this script with python, not
torchrun (it launches torchrun itself); under torchrun, rank 0 does the work and the others exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from runner import run_logged  # noqa: E402 (benchmarks/runner.py)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "megatron_diffmoe_s_e16_synthetic.yaml"

# name -> (tensor, pipeline, expert, world size)
LAYOUTS = {"one": (1, 1, 1, 1), "tp2": (2, 1, 1, 2), "ep2": (1, 1, 2, 2), "pp2": (1, 2, 1, 2), "dp2": (1, 1, 1, 2),
           # issue 12: the pairs on 4 GPUs, all three on 8 (scripts/megatron_3d_check.sh)
           "tp2-ep2": (2, 1, 2, 4), "pp2-ep2": (1, 2, 2, 4), "tp2-pp2": (2, 2, 1, 4), "tp2-pp2-ep2": (2, 2, 2, 8)}
DEFAULT_FLAVORS = ("DiffMoE-S-E16",)
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
# what the launcher sets; stripped from the environment of the runs this script starts
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


# ----- the comparison (no torch: reusable by tests and on any machine) --------------------------------------
def compared_keys(row: dict) -> list[str]:
    """The logged training terms of a metrics.jsonl row: loss, loss/<term>, grad_norm."""
    return sorted(k for k in row if k in ("loss", "grad_norm") or k.startswith("loss/"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a run directory's metrics.jsonl (or of that file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rel_diff(a: float, b: float, atol: float = 0.0) -> float:
    """|a - b| / max(|a|, |b|), with differences up to `atol` counted as 0; inf if either is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if a == b else math.inf
    d = abs(a - b)
    return 0.0 if d <= atol else d / max(abs(a), abs(b), 1e-30)


@dataclasses.dataclass
class Comparison:
    """`other`'s logged terms against `reference`'s, step by step."""

    steps: list[int]
    keys: list[str]
    worst: dict[str, float]  # key -> max relative difference over the steps
    worst_step: dict[str, int]
    problems: list[str]  # structural: steps or keys that differ, nothing logged
    rtol: float

    @property
    def max_err(self) -> float:
        return max(self.worst.values(), default=math.nan)

    @property
    def worst_key(self) -> str:
        return max(self.worst, key=self.worst.get) if self.worst else ""

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.worst) and all(e <= self.rtol for e in self.worst.values())


def compare_metrics(reference: list[dict], other: list[dict], rtol: float, atol: float = 0.0) -> Comparison:
    """Compare every logged `loss`, `loss/<term>` and `grad_norm` of `other` with `reference` (rows of
    metrics.jsonl). Both must have logged the same steps with the same terms; each value passes if
    its relative difference (rel_diff) is <= rtol."""
    ref = {r["step"]: r for r in reference if compared_keys(r)}
    oth = {r["step"]: r for r in other if compared_keys(r)}
    problems = []
    if not ref or not oth:
        problems.append(f"nothing logged: reference {len(ref)} rows, other {len(oth)} rows")
    if set(ref) != set(oth):
        only_ref, only_oth = sorted(set(ref) - set(oth)), sorted(set(oth) - set(ref))
        problems.append(f"logged steps differ: only in the reference {only_ref[:8]}, only in the other {only_oth[:8]}")
    steps = sorted(set(ref) & set(oth))
    keys = compared_keys(ref[steps[0]]) if steps else []
    worst: dict[str, float] = {}
    worst_step: dict[str, int] = {}
    for s in steps:
        a, b = ref[s], oth[s]
        if compared_keys(a) != compared_keys(b):
            problems.append(f"step {s}: terms differ: reference {compared_keys(a)}, other {compared_keys(b)}")
            continue
        for k in compared_keys(a):
            e = rel_diff(float(a[k]), float(b[k]), atol)
            if not e <= worst.get(k, -1.0):  # also takes nan/inf
                worst[k], worst_step[k] = e, s
    return Comparison(steps, keys, worst, worst_step, problems, rtol)


def format_comparison(reference: list[dict], other: list[dict], comparison: Comparison) -> str:
    """Per step: each term of both runs and their relative difference."""
    ref = {r["step"]: r for r in reference}
    oth = {r["step"]: r for r in other}
    lines = ["| step | term | reference | other | rel diff |", "|---|---|---|---|---|"]
    for s in comparison.steps:
        for k in compared_keys(ref[s]):
            if k in oth[s]:
                a, b = ref[s][k], oth[s][k]
                lines.append(f"| {s} | {k} | {a:.8g} | {b:.8g} | {rel_diff(a, b):.2e} |")
    return "\n".join(lines)


# ----- rows ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    layout: str
    flavor: str
    dtype: str
    engine: str = "megatron"
    steps: int = 0
    max_err: float = math.nan
    worst_key: str = ""
    worst_step: int = 0
    errors: dict = dataclasses.field(default_factory=dict)  # term -> max relative difference
    tol: float = math.nan
    seconds: float = math.nan
    problems: list = dataclasses.field(default_factory=list)
    error: str = ""
    skipped: str = ""
    command: str = ""
    reference_command: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and (bool(self.skipped) or (not self.problems and self.max_err <= self.tol))

    @property
    def verdict(self) -> str:
        return "FAIL" if not self.passed else "SKIP" if self.skipped else "PASS"


HEADER = ("| layout | engine | flavor | precision | steps | max rel diff | worst term (step) | loss | grad_norm | tol "
          "| s | result |")


def format_row(row: Row) -> str:
    tol = f"{row.tol:.0e}"
    if row.error or row.skipped or row.problems:
        last = (row.error.strip().splitlines() or [""])[-1]  # one table line; main() prints the whole error
        what = f"FAIL: {last[:200]}" if row.error else f"SKIP: {row.skipped[:90]}" if row.skipped else \
            f"FAIL: {'; '.join(row.problems)[:200]}"
        return (f"| {row.layout} | {row.engine} | {row.flavor} | {row.dtype} | {row.steps} | - | - | - | - | {tol} | - "
                f"| {what} |")

    def num(key: str) -> str:
        v = row.errors.get(key, math.nan)
        return "-" if v != v else f"{v:.2e}"

    return (f"| {row.layout} | {row.engine} | {row.flavor} | {row.dtype} | {row.steps} | {row.max_err:.2e} | "
            f"{row.worst_key} ({row.worst_step}) | {num('loss')} | {num('grad_norm')} | {tol} | {row.seconds:.0f} | "
            f"{row.verdict} |")


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [format_row(r) for r in rows])


# ----- runs -----------------------------------------------------------------------------------------------------
def common_overrides(args: argparse.Namespace, flavor: str, dtype: str) -> list[str]:
    """Everything but the engine and the run directory, identical for the reference and the layouts."""
    from moedit.models import get_flavor

    c, h, _ = (int(v) for v in args.latent_shape.split(","))
    moe = get_flavor(flavor).moe is not None
    return [
        f"model.flavor={flavor}", f"model.input_size={h}", f"model.in_channels={c}",
        f"model.num_classes={args.num_classes}", f"model.depth={args.depth}",
        *(["moe.every=2", "moe.first=1"] if moe else []),
        f"data.path={args.data}", "data.prepare=null", "data.split=sample", f"data.num_workers={args.num_workers}",
        f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}", f"train.precision={dtype}",
        f"train.seed={args.seed}", "train.resume=never", "train.sample_every=0", "train.num_sample_images=0",
        f"train.device={args.device}", "optim.warmup_steps=0",
        "logging.log_every=1", "logging.tensorboard=false", "logging.progress=lines",
        f"checkpoint.every={10 * args.steps}", *args.overrides,
    ]


def layout_overrides(args: argparse.Namespace, layout: str) -> tuple[int, list[str]]:
    """(world size, engine overrides) of `layout` on args.engine, at micro-batches of args.micro_batch."""
    tp, pp, ep, world = LAYOUTS[layout]
    data = world // (tp * pp)
    if args.global_batch % (data * args.micro_batch):
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of data-parallel replicas x "
                         f"--micro-batch = {data} x {args.micro_batch} (layout {layout})")
    if args.engine != "megatron":
        return world, [f"parallel.engine={args.engine}", "parallel.expert=1",
                       f"train.micro_batch_size={args.micro_batch}"]
    return world, [
        "parallel.engine=megatron", f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.expert={ep}",
        f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
        f"parallel.num_microbatches={args.global_batch // (data * args.micro_batch)}", *args.megatron_set,
    ]


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    env["NVIDIA_TF32_OVERRIDE"] = "0"  # no TF32 in cuBLAS / cuDNN on either side
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def train(run_dir: Path, overrides: list[str], world: int, timeout: float) -> tuple[int, str, float]:
    """`moedit train CONFIG overrides` into a fresh `run_dir` (torchrun when world > 1, or always for
    megatron). Returns (exit status, command, seconds); the output goes to RUN_DIR.log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    train_args = ["-m", "moedit.cli", "train", str(CONFIG), *overrides, f"train.run_dir={run_dir}"]
    if world > 1 or "parallel.engine=megatron" in overrides:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *train_args]
        shown = ["torchrun", "--standalone", f"--nproc_per_node={world}", *train_args]
    else:
        cmd, shown = [sys.executable, *train_args], ["python", *train_args]
    log = run_dir.with_name(run_dir.name + ".log")
    t0 = time.time()
    code = run_logged(cmd, log, timeout, run_env(), cwd=ROOT)
    return code, " ".join(shown), time.time() - t0


def log_tail(run_dir: Path, chars: int = 1500) -> str:
    log = run_dir.with_name(run_dir.name + ".log")
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def code_digest() -> str:
    """Of the config and moedit's sources: a reference run is reused only for the same code."""
    h = hashlib.sha256(CONFIG.read_bytes())
    for path in sorted((ROOT / "moedit").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def reference_run(args: argparse.Namespace, flavor: str, dtype: str, runs: Path) -> tuple[Path, str, str]:
    """The local engine's run (reused from --runs while its command is the same). Returns
    (run directory, command, error or '')."""
    overrides = [*common_overrides(args, flavor, dtype), "parallel.engine=local", "parallel.expert=1",
                 f"train.micro_batch_size={args.micro_batch}"]
    key = hashlib.sha256(json.dumps([str(CONFIG), overrides, code_digest()]).encode()).hexdigest()[:10]
    run_dir = runs / f"reference-{flavor.replace('/', '_')}-{dtype}-{key}"
    stamp = run_dir / "parity_command.json"
    if (run_dir / "DONE").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == overrides:
        return run_dir, f"(reused {run_dir}: same overrides and code)", ""
    code, command, _ = train(run_dir, overrides, 1, args.timeout)
    if code != 0 or not (run_dir / "metrics.jsonl").is_file():
        return run_dir, command, f"the local reference run failed (exit {code}):\n{log_tail(run_dir)}"
    stamp.write_text(json.dumps(overrides))
    return run_dir, command, ""


def run_case(args: argparse.Namespace, layout: str, flavor: str, dtype: str, runs: Path, reference: Path,
             reference_command: str) -> Row:
    from moedit.models import get_flavor

    row = Row(layout, flavor, dtype, engine=args.engine, tol=args.rtol_by_dtype[dtype],
              reference_command=reference_command)
    tp, pp, ep, world = LAYOUTS[layout]
    if ep > 1 and get_flavor(flavor).moe is None:
        row.skipped = "dense flavor: no experts to split"
        return row
    if args.engine != "megatron" and (tp, pp, ep) != (1, 1, 1):
        row.skipped = f"engine {args.engine} runs data parallelism only"
        return row
    try:
        world, overrides = layout_overrides(args, layout)
    except ValueError as exc:
        row.error = str(exc)
        return row
    run_dir = runs / f"{args.engine}-{layout}-{flavor.replace('/', '_')}-{dtype}"
    code, row.command, row.seconds = train(run_dir, [*common_overrides(args, flavor, dtype), *overrides], world,
                                           args.timeout)
    if code != 0 or not (run_dir / "metrics.jsonl").is_file():
        row.error = f"exit {code}: {log_tail(run_dir, 600)}"
        return row
    ref_rows, rows = read_metrics(reference), read_metrics(run_dir)
    comparison = compare_metrics(ref_rows, rows, row.tol, args.atol)
    row.steps, row.errors, row.problems = len(comparison.steps), comparison.worst, comparison.problems
    row.max_err, row.worst_key = comparison.max_err, comparison.worst_key
    row.worst_step = comparison.worst_step.get(row.worst_key, 0)
    if comparison.steps and len(comparison.steps) != args.steps:
        row.problems.append(f"{len(comparison.steps)} steps logged, expected {args.steps}")
    if args.verbose or not row.passed:
        print(format_comparison(ref_rows, rows, comparison), flush=True)
    return row


def prepare_data(args: argparse.Namespace) -> None:
    if (Path(args.data) / "dataset.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "moedit.cli", "prepare", "--source", "synthetic", "--output", args.data,
                    "--latent-shape", args.latent_shape, "--num-classes", str(args.num_classes),
                    "--num-samples", str(args.samples), "--no-progress"], cwd=ROOT, check=True, env=run_env())


# ----- entry point ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=None,
                        help="default: every layout of 1 and 2 processes (one tp2 ep2 pp2 dp2) that this machine's "
                             "GPUs fit")
    parser.add_argument("--flavors", nargs="+", default=list(DEFAULT_FLAVORS))
    parser.add_argument("--dtypes", nargs="+", choices=list(TOLERANCE), default=list(TOLERANCE),
                        help="train.precision of both sides")
    parser.add_argument("--engine", choices=["megatron", "ddp", "deepspeed"], default="megatron",
                        help="the engine compared with the local one")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4, help="images per forward on every layout")
    parser.add_argument("--depth", type=int, default=4, help="blocks (MoE in 1 and 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="train.device of every run (cpu: see --engine)")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "moedit_parity_4x16x16"))
    parser.add_argument("--latent-shape", default="4,16,16")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "moedit_parity_runs"),
                        help="run directories and logs (local references are reused from here)")
    parser.add_argument("--rtol-fp32", type=float, default=TOLERANCE["fp32"])
    parser.add_argument("--rtol-bf16", type=float, default=TOLERANCE["bf16"])
    parser.add_argument("--atol", type=float, default=1e-7, help="absolute differences up to this count as 0")
    parser.add_argument("--megatron-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for the megatron runs only, e.g. parallel.megatron_optimizer=distributed")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per training run")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print every step's terms of every row")
    parser.add_argument("--compare", nargs=2, metavar=("REFERENCE", "OTHER"), default=None,
                        help="only compare two existing run directories (or metrics.jsonl files); --rtol applies")
    parser.add_argument("--rtol", type=float, default=None, help="--compare: tolerance (default --rtol-fp32)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run (both sides)")
    args = parser.parse_args(argv)
    args.rtol_by_dtype = {"fp32": args.rtol_fp32, "bf16": args.rtol_bf16}
    return args


def default_layouts() -> list[str]:
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    return [name for name, spec in LAYOUTS.items() if spec[3] <= min(max(gpus, 1), 2)]


def compare_main(args: argparse.Namespace) -> int:
    rtol = args.rtol if args.rtol is not None else args.rtol_fp32
    ref_rows, rows = read_metrics(args.compare[0]), read_metrics(args.compare[1])
    comparison = compare_metrics(ref_rows, rows, rtol, args.atol)
    print(format_comparison(ref_rows, rows, comparison))
    for problem in comparison.problems:
        print(f"FAIL  {problem}")
    print(f"{'PASS' if comparison.passed else 'FAIL'}  {len(comparison.steps)} steps, terms {comparison.keys}: max "
          f"relative difference {comparison.max_err:.3g} ({comparison.worst_key}), tolerance {rtol:g}")
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(comparison) | {"passed": comparison.passed}, indent=1))
    return 0 if comparison.passed else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # launched under torchrun: rank 0 runs everything (this script starts torchrun itself)
    if args.compare:
        return compare_main(args)
    sys.path.insert(0, str(ROOT))  # the repo, for `moedit`
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    prepare_data(args)
    layouts = args.layouts or default_layouts()
    print(f"# moedit train parity: local vs {args.engine}, layouts {' '.join(layouts)}, "
          f"flavors {' '.join(args.flavors)}, "
          f"{args.steps} steps of global batch {args.global_batch} in micro-batches of {args.micro_batch}, depth "
          f"{args.depth}, seed {args.seed}; runs in {runs}", flush=True)
    print(HEADER, flush=True)
    rows: list[Row] = []
    for dtype in args.dtypes:
        for flavor in args.flavors:
            reference, reference_command, error = reference_run(args, flavor, dtype, runs)
            for layout in layouts:
                if error:
                    row = Row(layout, flavor, dtype, engine=args.engine, tol=args.rtol_by_dtype[dtype], error=error,
                              reference_command=reference_command)
                else:
                    row = run_case(args, layout, flavor, dtype, runs, reference, reference_command)
                rows.append(row)
                print(format_row(row), flush=True)
                if args.json:  # after every row: a run cut short keeps what it compared
                    Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"verdict": r.verdict}
                                                           for r in rows], indent=1))
    failed = [r for r in rows if not r.passed]
    skipped = sum(1 for r in rows if r.skipped)
    print("\n" + table(rows))
    print(f"\n{len(rows) - len(failed) - skipped} PASS, {skipped} SKIP, {len(failed)} FAIL"
          + (f": {', '.join(f'{r.layout}/{r.flavor}/{r.dtype}' for r in failed)}" if failed else ""), flush=True)
    for r in failed:
        if r.error:
            print(f"\n== {r.layout}/{r.flavor}/{r.dtype}: {r.command or r.reference_command}\n{r.error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
