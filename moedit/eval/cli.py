"""`moedit evaluate`: FID, sFID, Inception Score and precision/recall of a checkpoint's samples.

    moedit evaluate runs/dit_b --num-samples 50000 --cfg-scale 1.5 \\
        --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 8 -m moedit.eval.cli runs/dit_b ...   # the same, on 8 GPUs

Writes RUN/eval/<name>/step_XXXXXXX.json (metrics, settings, step, images seen, training FLOPs),
the sample statistics beside it (.npz, ADM reference keys) and TensorBoard scalars
eval/<name>/<metric> at the checkpoint's step. An interrupted evaluation resumes when rerun with
the same settings. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from moedit.lazy import LazyModule

np = LazyModule("numpy")  # imported when used: `--help` needs neither
torch = LazyModule("torch")

from moedit.diffusion.config import CFG_BATCHING, DDPM_SAMPLERS, FLOW_SAMPLERS
from moedit.errors import MoeditError

# moedit.eval.features loads torch; tests/test_hardening_cli.py checks these equal its constants
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "MOEDIT_INCEPTION_WEIGHTS"

PR_K = 3  # neighbourhood size of the precision/recall manifolds (ADM)
IS_SPLIT_SIZE = 5000  # images per Inception Score split (ADM)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="run directory (newest checkpoint), checkpoint directory or exported .safetensors file")
    parser.add_argument("--num-samples", type=int, default=50000, help="images to generate (default 50000)")
    parser.add_argument("--features", default="inception",
                        help="feature network: inception (default) or random-test (tiny random net for tests)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help=f"local {INCEPTION_WEIGHTS_FILE} (default: ${WEIGHTS_ENV}); never downloaded")
    parser.add_argument("--ref", default=None, metavar="NPZ_OR_SHARDS",
                        help="ADM reference batch .npz or a shard set (default: the run's training data)")
    parser.add_argument("--ref-num-samples", type=int, default=50000,
                        help="reference images to use from a shard set or arr_0 (default 50000)")
    parser.add_argument("--ref-cache", default=None, metavar="DIR",
                        help="where computed reference statistics are cached (default: OUT/reference)")
    parser.add_argument("--sampler", default=None, choices=FLOW_SAMPLERS + DDPM_SAMPLERS,
                        help="default: the run's diffusion.sampler")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps (default: the run's diffusion.sample_steps)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's; 1 = none)")
    parser.add_argument("--guidance-channels", type=int, default=None, help="guide only the first N latent channels")
    parser.add_argument("--cfg-batching", default=None, choices=CFG_BATCHING,
                        help="guidance as one forward of 2B (joint) or two of B (separate); default: the run's "
                        "diffusion.cfg_batching. With --batch-size it decides DiffMoE's routing pool")
    parser.add_argument("--seed", type=int, default=0, help="seeds every chunk's noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampler batch per process (default 64)")
    parser.add_argument("--chunk-size", type=int, default=512,
                        help="images per resumable chunk; chunks go round-robin to processes (default 512)")
    parser.add_argument("--pr-num-samples", type=int, default=10000,
                        help="images kept (per side) for precision/recall (default 10000)")
    parser.add_argument("--name", default=None, help="evaluation name (default: built from the settings)")
    parser.add_argument("--out-dir", default=None, help="default: RUN/eval")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--vae-path", default=None,
                        help="local VAE directory overriding the one in the dataset manifest")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished or finished evaluation of this name")
    parser.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard scalars")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--prompts-file", default=None, metavar="FILE",
                        help="text runs: captions, one a line (blank lines and # comments skipped); "
                        "image i takes prompt i mod P")
    parser.add_argument("--text-encoder", default=None, metavar="DIR",
                        help="text runs: local text encoder directory overriding the dataset manifest's text_encoder")


def locate(checkpoint: str, out_dir: str | None) -> tuple[Path, Path | None, int | None]:
    """(output directory, run directory or None, checkpoint step or None) for a checkpoint argument."""
    from moedit.train.checkpoint import latest_checkpoint

    path = Path(checkpoint)
    run, ckpt = None, None
    if path.is_dir() and (path / "checkpoints").is_dir():
        run, ckpt = path, latest_checkpoint(path / "checkpoints")
    elif path.is_dir() and (path / "meta.json").is_file():
        ckpt = path
        run = path.parent.parent if path.parent.name == "checkpoints" else None
    step = json.loads((ckpt / "meta.json").read_text())["step"] if ckpt is not None else None
    default_out = (run / "eval") if run is not None else (path if path.is_dir() else path.parent) / "eval"
    return Path(out_dir) if out_dir else default_out, run, step


def compute_budget(run: Path | None, step: int | None, cfg) -> dict:
    """Images seen and training FLOPs at `step`, so sweeps can plot a metric against compute."""
    images_seen = None
    if run is not None and step is not None:
        metrics_file = run / "metrics.jsonl"
        if metrics_file.is_file():
            for line in metrics_file.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if record.get("step") == step and "images_seen" in record:
                    images_seen = int(record["images_seen"])
        if images_seen is None:
            images_seen = step * cfg.train.global_batch_size
    flops = None
    info_file = run / "model_info.json" if run is not None else None
    if images_seen is not None and info_file is not None and info_file.is_file():
        per_image = json.loads(info_file.read_text()).get("train_gflops_per_image")
        flops = None if per_image is None else per_image * 1e9 * images_seen
    return {"images_seen": images_seen, "train_flops": flops}


def default_name(args, plan) -> str:
    name = f"{args.features}-n{plan.num_samples}-{plan.sampler}{plan.steps}-cfg{plan.cfg_scale:g}-seed{plan.seed}"
    if plan.cfg_scale != 1.0 and plan.cfg_batching != "joint":
        name += f"-{plan.cfg_batching}"
    if plan.captions is not None:
        name += f"-prompts{plan.captions[:8]}"  # another prompts file: another evaluation
    return name + ("-raw" if args.raw else "")


def build_plan(args, cfg, captions=None):
    """The SamplingPlan of an evaluation; `captions` (moedit.eval.sampling.Captions) for a text run."""
    from moedit.eval.sampling import SamplingPlan

    d = cfg.diffusion
    return SamplingPlan(
        num_samples=args.num_samples, chunk_size=args.chunk_size, batch_size=args.batch_size, seed=args.seed,
        num_classes=cfg.model.num_classes,
        latent_shape=(cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size),
        sampler=args.sampler or d.default_sampler, steps=args.steps or d.sample_steps,
        cfg_scale=d.cfg_scale if args.cfg_scale is None else float(args.cfg_scale),
        guidance_channels=d.guidance_channels if args.guidance_channels is None else args.guidance_channels,
        cfg_batching=args.cfg_batching or d.cfg_batching,
        captions=None if captions is None else captions.digest(),
    )


def load_prompts(args, cfg):
    """(prompts, Captions, encoder record) of a text run's --prompts-file; (None, None, None) for a class run."""
    from moedit.eval.prompts import check_condition, encode_prompts, read_prompts, run_text_encoder

    prompts = read_prompts(None, args.prompts_file)
    if cfg.model.is_text and not prompts:
        raise MoeditError("this run is a text-to-image model (model.condition = text): pass --prompts-file FILE "
                          "(captions, one a line; image i takes prompt i mod P)")
    check_condition(cfg.model, prompts, None)
    if not prompts:
        return None, None, None
    encoder = run_text_encoder(cfg, args.text_encoder)
    return prompts, encode_prompts(encoder, prompts), encoder


def check_args(args) -> None:
    for name in ("num_samples", "ref_num_samples", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.num_samples < 2:
        raise ValueError(f"--num-samples {args.num_samples}: FID needs at least 2 images")
    if args.pr_num_samples < 0:
        raise ValueError(f"--pr-num-samples {args.pr_num_samples}: use 0 (no precision/recall) or more")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise ValueError(f"--name {args.name!r}: use a plain directory name")


def main(args: argparse.Namespace) -> int:
    from moedit.engines import build_engine
    from moedit.engines.config import ParallelConfig

    check_args(args)
    out_dir, run, step = locate(args.checkpoint, args.out_dir)
    engine = build_engine(ParallelConfig(), args.device)  # ddp (collectives only) when launched with several processes
    try:
        return evaluate(args, engine, out_dir, run, step)
    finally:
        engine.shutdown()


def evaluate(args, engine, out_dir: Path, run: Path | None, step: int | None) -> int:
    from moedit.data import build_decoder, load_manifest
    from moedit.data.manifest import manifest_path
    from moedit.diffusion import build_diffusion
    from moedit.eval.features import build_features
    from moedit.eval.metrics import compare
    from moedit.eval.reference import ReferenceSource, build_reference
    from moedit.eval.sampling import WorkDir, plan_settings, sample_statistics
    from moedit.train.checkpoint import load_for_inference

    torch.manual_seed(args.seed + engine.rank)  # per-rank seed for anything not drawn from a chunk generator
    model, cfg = load_for_inference(args.checkpoint, use_ema=not args.raw, device=engine.device)
    diffusion = build_diffusion(cfg.diffusion)
    prompts, captions, encoder = load_prompts(args, cfg)
    plan = build_plan(args, cfg, captions)
    name = args.name or default_name(args, plan)
    stem = out_dir / name / (f"step_{step:07d}" if step is not None else "weights")
    result_path, work_path = stem.with_suffix(".json"), stem.with_suffix(".work")
    if args.restart and engine.is_main:
        shutil.rmtree(work_path, ignore_errors=True)
        result_path.unlink(missing_ok=True)
    engine.barrier()
    if result_path.is_file():
        if engine.is_main:
            print(f"{result_path} exists (pass --restart to redo it): {json.loads(result_path.read_text())['metrics']}")
        return 0
    progress = not args.quiet
    extractor = build_features(args.features, args.inception_weights, engine.device)
    source = ReferenceSource(args.ref, cfg.data, num_samples=args.ref_num_samples, vae_path=args.vae_path)
    keep = args.pr_num_samples
    reference = build_reference(source, extractor, engine, cache_dir=Path(args.ref_cache or out_dir / "reference"),
                                keep=keep, batch_size=args.batch_size, progress=progress)
    manifest = load_manifest(manifest_path(cfg.data))
    decoder = build_decoder(manifest, vae_path=args.vae_path)
    settings = {"checkpoint": str(Path(args.checkpoint).resolve()), "step": step,
                "weights": "raw" if args.raw else "ema",
                "features": extractor.identity(), "pr_num_samples": keep, "world_size": engine.world_size,
                **plan_settings(plan)}
    if prompts is not None:
        settings.update(prompts=prompts, prompts_file=str(Path(args.prompts_file).resolve()),
                        text_encoder=encoder["path"], text_max_length=encoder["max_length"])
    started = time.perf_counter()
    work = WorkDir(work_path, settings, engine)
    stats = sample_statistics(plan, model, diffusion, decoder, extractor, engine, work, keep=keep, progress=progress,
                              captions=captions)
    elapsed = time.perf_counter() - started
    if engine.is_main:
        metrics = compare(stats, reference, k=PR_K)
        result = {"name": name, "metrics": metrics, **settings, "features": extractor.name, "pr_k": PR_K,
                  "is_split_size": IS_SPLIT_SIZE, **compute_budget(run, step, cfg),
                  "reference": reference.info | {"num_samples": reference.count},
                  "sampling_s": elapsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_result(result_path, stats, result)
        if not args.no_tensorboard and step is not None:
            write_scalars(run or out_dir.parent, name, step, metrics)
        shutil.rmtree(work_path, ignore_errors=True)
        print(f"wrote {result_path}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))
    engine.barrier()
    return 0


def write_result(path: Path, stats, result: dict) -> None:
    """The JSON, and the sample statistics beside it (usable as a reference: ADM keys)."""
    from moedit.eval.metrics import Reference

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = Reference.from_stats(stats, {}).to_npz()
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path.with_suffix(".npz"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def write_scalars(run: Path, name: str, step: int, metrics: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tb"))
    for key, value in metrics.items():
        if value is not None:
            writer.add_scalar(f"eval/{name}/{key}", value, step)
    writer.close()


def cli(argv: list[str] | None = None) -> int:
    """`python -m moedit.eval.cli ...`: the same as `moedit evaluate ...` (for torchrun)."""
    parser = argparse.ArgumentParser(prog="moedit evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (MoeditError, ValueError, FileNotFoundError) as exc:
        print(f"moedit evaluate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
