"""`moedit launch slurm|local CONFIG [key=value ...]`: run `moedit train` on SLURM or with torchrun."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from moedit.errors import MoeditError
from moedit.launch import common, local, slurm
from moedit.launch.render import JobSpec, RunEntry, render_sbatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)

    on_slurm = targets.add_parser(
        "slurm", help="submit one training run as an sbatch job",
        description="Submit `moedit train CONFIG key=value ...` as a SLURM batch job: one task per node "
                    "running torchrun (c10d rendezvous), SIGUSR1 checkpointing and automatic requeue.")
    _add_training_arguments(on_slurm)
    on_slurm.add_argument("--run-dir", help="run directory (default: train.run_dir from overrides or config)")
    common.add_slurm_arguments(on_slurm)
    on_slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")

    on_host = targets.add_parser(
        "local", help="run training here with torchrun",
        description="Run `moedit train CONFIG key=value ...` under torchrun on this machine.")
    _add_training_arguments(on_host)
    on_host.add_argument("--nproc", type=int, default=1, help="training processes (default 1)")
    on_host.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra environment variable")
    on_host.add_argument("--dry-run", action="store_true", help="print the command, run nothing")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for moedit train (anywhere on the line)")


def main(args: argparse.Namespace) -> int:
    if args.target == "slurm":
        return launch_slurm(args)
    return launch_local(args)


def launch_slurm(args: argparse.Namespace) -> int:
    config = common.check_config(args.config)
    run_dir = common.resolve_run_dir(config, args.overrides, args.run_dir)
    if args.job_name is None:
        args.job_name = common.job_name_for(run_dir)
    options = common.slurm_options(args)
    train_args = common.training_args(args.overrides)
    # the job runs `moedit train CONFIG TRAIN_ARGS train.run_dir=RUN_DIR`: check exactly that now
    cfg = common.validate_training_config(config, [*train_args, f"train.run_dir={run_dir}"])
    common.check_resume_world_size(cfg, options.nodes * options.procs_per_node, "--nodes x --nproc-per-node",
                                   "--nodes and --nproc-per-node that make {saved} processes")
    max_cpus = None
    if not args.dry_run:
        slurm.require_slurm("sbatch")
        partitions = slurm.query_partitions()
        slurm.check_against_cluster(options, partitions)
        part = slurm.partition_of(options, partitions)
        max_cpus = part.max_cpus if part is not None and part.max_cpus > 0 else None
    log_dir = os.path.join(run_dir, "slurm")
    spec = JobSpec(config=config, runs=[RunEntry(run_dir, train_args)], options=options, log_dir=log_dir,
                   workdir=os.getcwd(), python=sys.executable, loader_workers=cfg.data.num_workers,
                   max_cpus=max_cpus)
    script = render_sbatch(spec)
    if options.cpus_per_task is None:
        cpus = slurm.default_cpus_per_task(options, cfg.data.num_workers, max_cpus)
        print(f"moedit launch: no --cpus-per-task given: asking for {cpus} CPUs per node "
              f"({options.procs_per_node} process(es), data.num_workers = {cfg.data.num_workers}); "
              "pass --cpus-per-task to choose", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        return 0
    os.makedirs(log_dir, exist_ok=True)
    script_path = Path(log_dir) / "job.sbatch"
    script_path.write_text(script)
    job_id = slurm.submit(str(script_path))
    print(f"submitted job {job_id}: run dir {run_dir}, logs {log_dir}/{options.job_name}-{job_id}.out")
    return 0


def launch_local(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise MoeditError(f"--nproc {args.nproc}: need at least one process")
    config = common.check_config(args.config)
    for text in args.overrides:
        common.split_override(text)
    # Validate before torchrun starts any worker: a bad key is one line here, not N tracebacks.
    cfg = common.validate_training_config(config, list(args.overrides))
    common.check_resume_world_size(cfg, args.nproc, "--nproc", "--nproc {saved}")
    command = local.torchrun_command(sys.executable, args.nproc, config, list(args.overrides))
    env = local.local_env(args.nproc, common.parse_env(args.env))
    if args.dry_run:
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())), shlex.join(command))
        return 0
    print(f"moedit launch: {shlex.join(command)}", file=sys.stderr)
    return subprocess.run(command, env=env).returncode
