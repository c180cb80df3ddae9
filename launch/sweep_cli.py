"""`moedit sweep expand|submit|status|resubmit`: sweeps as SLURM job arrays."""

from __future__ import annotations

import argparse
import json

from moedit.errors import MoeditError
from moedit.launch import common, manifest
from moedit.launch.sweep import load_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    expand = actions.add_parser("expand", help="list the runs a sweep file expands to (writes nothing)")
    expand.add_argument("sweep_file")
    expand.add_argument("--sweep-dir", help="sweep directory (default: the file's sweep_dir or runs/sweeps/NAME)")
    expand.add_argument("--json", action="store_true", help="print the runs as JSON")

    submit = actions.add_parser("submit", help="expand a sweep file and submit it as one job array")
    submit.add_argument("sweep_file")
    submit.add_argument("--sweep-dir", help="sweep directory (default: the file's sweep_dir or runs/sweeps/NAME)")
    submit.add_argument("--max-concurrent", type=int, help="run at most N array tasks at once")
    common.add_slurm_arguments(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")

    status = actions.add_parser("status", help="pending/running/completed/failed/cancelled of each run")
    status.add_argument("sweep_dir")
    status.add_argument("--json", action="store_true", help="print the states as JSON")

    resubmit = actions.add_parser("resubmit", help="submit failed runs again (they resume from checkpoints)")
    resubmit.add_argument("sweep_dir")
    resubmit.add_argument("--failed", action="store_true", help="resubmit the failed runs")
    resubmit.add_argument("--cancelled", action="store_true", help="resubmit the runs cancelled with scancel")
    common.add_slurm_arguments(resubmit)
    resubmit.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")


def main(args: argparse.Namespace) -> int:
    return {"expand": expand, "submit": submit, "status": status, "resubmit": resubmit}[args.action](args)


def expand(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_file, args.sweep_dir)
    if args.json:
        print(json.dumps([{"index": r.index, "name": r.name, "overrides": r.overrides} for r in sweep.runs], indent=1))
        return 0
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.sweep_dir}")
    for run in sweep.runs:
        print(f"{run.index:4d}  {run.name}  {' '.join(run.args())}")
    return 0


def submit(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_file, args.sweep_dir)
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise MoeditError(f"--max-concurrent {args.max_concurrent}: must be at least 1")
        sweep.max_concurrent = args.max_concurrent
    common.check_config(sweep.config)
    if args.job_name is None and "job_name" not in sweep.slurm:
        args.job_name = f"moedit-{sweep.name}"
    options = common.slurm_options(args, sweep.slurm)
    record = manifest.merge_existing(sweep.sweep_dir, manifest.new_manifest(sweep))
    submitted = [r["name"] for r in record["runs"] if r["job_id"]]
    if submitted:
        raise MoeditError(f"{sweep.sweep_dir}: sweep already submitted ({len(submitted)} runs have jobs); "
                          "see `moedit sweep status` and `moedit sweep resubmit --failed`")
    indices = [r["index"] for r in record["runs"]]
    for run in record["runs"]:  # every run's config, checked before anything is submitted
        try:
            common.validate_training_config(sweep.config, [*common.training_args(run["args"]),
                                                           f"train.run_dir={run['run_dir']}"])
        except MoeditError as exc:
            raise MoeditError(f"run {run['index']} ({run['name']}): {exc}") from None
    if args.dry_run:
        print(manifest.render_array(sweep.sweep_dir, record, indices, options), end="")
        return 0
    record["max_concurrent"] = sweep.max_concurrent
    array_id = manifest.submit_array(sweep.sweep_dir, record, indices, options)
    print(f"submitted sweep {sweep.name}: job array {array_id} with {len(indices)} runs; "
          f"track with `moedit sweep status {sweep.sweep_dir}`")
    return 0


def status(args: argparse.Namespace) -> int:
    record = manifest.load_manifest(args.sweep_dir)
    states = manifest.update_states(args.sweep_dir, record)
    if args.json:
        print(json.dumps(states, indent=1))
        return 0
    print(f"sweep {record['sweep']}: {manifest.summary(states)}")
    width = max(len(s["name"]) for s in states)
    for s in states:
        print(f"{s['index']:4d}  {s['name']:<{width}}  {s['state']:<11}  {s['job_id'] or '-':<12}  {s['detail']}")
    return 0


def resubmit(args: argparse.Namespace) -> int:
    record = manifest.load_manifest(args.sweep_dir)
    states = manifest.update_states(args.sweep_dir, record)
    wanted = {"failed"} if args.failed else set()
    wanted |= {"cancelled"} if getattr(args, "cancelled", False) else set()
    if not wanted:
        raise MoeditError("resubmit needs --failed and/or --cancelled: which runs to submit again")
    failed = [s["index"] for s in states if s["state"] in wanted]
    if not failed:
        print(f"sweep {record['sweep']}: no {' or '.join(sorted(wanted))} runs ({manifest.summary(states)})")
        return 0
    last = record["arrays"][-1]["options"] if record["arrays"] else dict(record["slurm"])
    options = common.slurm_options(args, last)
    if args.dry_run:
        print(manifest.render_array(args.sweep_dir, record, failed, options), end="")
        return 0
    array_id = manifest.submit_array(args.sweep_dir, record, failed, options)
    names = ", ".join(record["runs"][i]["name"] for i in failed)
    print(f"resubmitted {len(failed)} failed run(s) as job array {array_id}: {names}")
    return 0
