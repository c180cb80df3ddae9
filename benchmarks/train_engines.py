"""Training throughput of the ddp engine next to DeepSpeed ZeRO on the same model, data and batch.

    torchrun --nproc_per_node=2 benchmarks/train_engines.py [--flavor DiffMoE-S-E16] [--global-batch 256]
        [--steps 50] [--warmup 10] [--engines ddp zero2] [--data /tmp/moedit_synthetic_4x32x32]

Every rank runs the real Trainer (same config apart from parallel.engine) on synthetic 4x32x32
latents (the shape of 256px SD-VAE latents), prepared once by rank 0. Engines run one after the
other in the same processes over one process group, each from freshly seeded weights; after
`--warmup` steps the next `--steps` optimizer steps are timed (CUDA synchronised). Rank 0 prints
one line per engine: images/s, MFU against the card's dense bf16 peak, peak GPU memory, last loss.
Precision is the trainer's default: bf16 autocast over fp32 weights for every engine; the
`zero2-bf16` engine uses DeepSpeed's bf16 mode (bf16 weights, fp32 master weights) instead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ENGINES = {
    "ddp": {"parallel": {"engine": "ddp"}},
    "zero1": {"parallel": {"engine": "deepspeed"}, "deepspeed": {"zero_stage": 1}},
    "zero2": {"parallel": {"engine": "deepspeed"}, "deepspeed": {"zero_stage": 2}},
    "zero2-bf16": {"parallel": {"engine": "deepspeed"}, "deepspeed": {"zero_stage": 2, "bf16": True}},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="DiffMoE-S-E16")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps per engine")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocation, autotuning)")
    parser.add_argument("--engines", nargs="+", default=["ddp", "zero2"], choices=list(ENGINES))
    parser.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"))
    parser.add_argument("--samples", type=int, default=8192, help="synthetic latents to prepare")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "moedit_synthetic_4x32x32"))
    return parser.parse_args()


def init_process_group() -> tuple[int, int]:
    """One group for all engines (each engine finds it initialised and uses it)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    return rank, world


def prepare_data(path: Path, latent: list[int], samples: int, rank: int) -> None:
    if rank == 0 and not (path / "dataset.json").is_file():
        from moedit.data.prepare import prepare_builtin

        prepare_builtin("synthetic", path, latent_shape=tuple(latent), num_samples=samples, progress=True)
    dist.barrier()


def build_config(args: argparse.Namespace, engine: str, run_dir: Path):
    from moedit.train.config import config_from_dict

    channels, size, _ = args.latent
    sections = {
        # As configs/diffmoe_l_e16_imagenet256.yaml trains DiffMoE: rectified flow, no learned sigma.
        "model": {"flavor": args.flavor, "input_size": size, "in_channels": channels, "learn_sigma": False},
        "diffusion": {"objective": "flow"},
        "data": {"path": args.data, "num_workers": 4},
        "train": {"run_dir": str(run_dir), "steps": args.warmup + args.steps, "global_batch_size": args.global_batch,
                  "num_sample_images": 0, "resume": "never"},
        "logging": {"log_every": 10**9, "tensorboard": False, "progress": "none"},
        "checkpoint": {"every": 10**9},
    }
    for name, values in ENGINES[engine].items():
        sections.setdefault(name, {}).update(values)
    return config_from_dict(sections)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_engine(args: argparse.Namespace, engine: str, rank: int, world: int, run_dir: Path) -> dict:
    from moedit.engines import build_engine
    from moedit.train.trainer import Trainer, _peak_flops

    cfg = build_config(args, engine, run_dir)
    trainer = Trainer(cfg, engine=build_engine(cfg.parallel, cfg.train.device, deepspeed_cfg=cfg.deepspeed))
    trainer.setup()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync()
    elapsed = time.perf_counter() - start
    images_per_s = args.steps * args.global_batch / elapsed
    peak = _peak_flops(trainer.device)
    # model_info counts multiply-adds; training = 3x forward, 2 FLOPs per multiply-add.
    flops = images_per_s * trainer.model_info["train_gflops_per_image"] * 1e9 * 2 if rank == 0 else 0.0
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    result = {
        "engine": engine,
        "images_per_s": images_per_s,
        "mfu": flops / (peak * world) if peak else float("nan"),
        "peak_mem_gib": memory,
        "loss": float(trainer._interval.get("loss", float("nan"))) / max(trainer._interval_steps, 1),
        "micro_batch": trainer.micro_batch,
        "accum": trainer.accum_steps,
    }
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args()
    rank, world = init_process_group()
    prepare_data(Path(args.data), args.latent, args.samples, rank)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run_root = Path(tmp)  # per rank: nothing is shared, the runs write no checkpoints
        for engine in args.engines:
            results.append(bench_engine(args, engine, rank, world, run_root / engine))
            dist.barrier()
    if rank == 0:
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"{args.flavor}, {world} x {card}, global batch {args.global_batch}, "
              f"{args.steps} timed steps after {args.warmup} warm-up steps")
        print(f"{'engine':<12} {'images/s':>10} {'MFU':>7} {'peak GiB':>9} {'mean loss':>10}  micro x accum")
        for r in results:
            print(f"{r['engine']:<12} {r['images_per_s']:>10.1f} {r['mfu']:>7.1%} {r['peak_mem_gib']:>9.2f} "
                  f"{r['loss']:>10.4f}  {r['micro_batch']} x {r['accum']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
