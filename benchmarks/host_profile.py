"""The host's share of a training step, on CPU: the real `Trainer.train_step()` of each engine on a
model with DiffMoE-L's structure (depth, experts, MoE placement of --flavor) at tiny widths, so
the arithmetic is small and what remains is what the host does per step (Python, autograd,
dispatch). On a GPU the same work decides whether the GPU waits for the host (see
benchmarks/profile_train.py's "GPU busy"); this finds where it goes without a GPU.

    python benchmarks/host_profile.py [--engines local megatron] [--steps 30] [--top 25] [--sort tottime] [--compile]

The megatron engine runs in one spawned process under the test suite's CPU stand-ins for
Megatron-Core's CUDA calls (tests/megatron/cpu_stubs.py), as the CPU tests do. Per engine:
--steps warm-up steps, a cProfile of --steps more `train_step()` calls, then `fit()` on to
--steps x 2 more steps; the ms per step printed is the run's own metrics.jsonl (images/s of the
last log interval, --steps steps). CPU timings vary by several percent from run to run, so
compare within one run and repeat. --compile adds the local/ddp engines with `train.compile=true` (each block
compiled by inductor's CPU backend: what is left of the host's work per block is one compiled
call, as on a GPU, though the generated kernels differ). Data: the built-in digits, prepared once
at --data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "megatron"))  # harness.py: spawned workers with the CPU stand-ins


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["local", "megatron"], choices=["local", "ddp", "megatron"])
    parser.add_argument("--flavor", default="DiffMoE-L-E8")
    parser.add_argument("--hidden", type=int, default=32, help="model.hidden_size (tiny: the host's work remains)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=25, help="rows of each profile (0: no profile)")
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "moedit_digits"))
    parser.add_argument("--compile", action="store_true",
                        help="also time each local/ddp engine with train.compile=true (its blocks compiled)")
    return parser.parse_args(argv)


def measure(rank: int, world: int, args: argparse.Namespace) -> tuple[float, str]:
    import cProfile
    import io
    import json
    import os
    import pstats

    os.environ["MOEDIT_MEGATRON_CPU"] = "1"  # the harness installed the stand-ins in this process
    import torch

    torch.set_num_threads(1)
    from moedit.train.config import config_from_dict
    from moedit.train.trainer import Trainer

    cfg = config_from_dict({
        "model": {"flavor": args.flavor, "input_size": 8, "in_channels": 1, "patch_size": 2, "num_classes": 10,
                  "hidden_size": args.hidden, "num_heads": 2, "learn_sigma": False},
        "diffusion": {"objective": "flow"},
        "data": {"path": args.data, "num_workers": 0, "shuffle_buffer": 64},
        "train": {"steps": 10**6, "global_batch_size": args.batch, "num_sample_images": 0, "device": "cpu",
                  "run_dir": tempfile.mkdtemp(prefix="moedit_host_"), "compile": args.compiled},
        "logging": {"log_every": args.steps, "tensorboard": False, "progress": "none"},
        "checkpoint": {"every": 10**6, "final": False},
        "parallel": {"engine": args.engine}})
    trainer = Trainer(cfg).setup()
    try:
        for _ in range(args.steps):  # warm-up (with --compile: the compilation)
            trainer.train_step()
        table = ""
        if args.top:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.steps):
                trainer.train_step()
            profile.disable()
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.top)
            table = out.getvalue().replace(str(ROOT) + "/", "").replace(str(Path(torch.__file__).parents[1]) + "/", "")
        # The time: the run's own log, as every benchmark of the trainer (the last interval of fit()).
        trainer.cfg.train.steps = trainer.step + 2 * args.steps
        trainer.fit()
        last = json.loads((Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        return 1000 * args.batch / last["images_per_s"], table
    finally:
        trainer.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (Path(args.data) / "dataset.json").is_file():
        from moedit.data.prepare import prepare_builtin

        prepare_builtin("digits", args.data, progress=False)
    from harness import run_distributed

    results = {}
    for engine in args.engines:
        for compiled in (False, True) if args.compile and engine != "megatron" else (False,):
            args.engine, args.compiled = engine, compiled
            results[engine + (" (train.compile)" if compiled else "")] = run_distributed(measure, 1, args,
                                                                                       timeout=1800.0)[0]
    print(f"| engine | ms per step ({args.flavor} structure, hidden {args.hidden}, batch {args.batch}, CPU) |")
    print("|---|---|")
    for engine, (ms, _) in results.items():
        print(f"| {engine} | {ms:.1f} |")
    for engine, (_, table) in results.items():
        if table:
            print(f"\n## {engine}: cProfile of {args.steps} steps, by {args.sort}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
