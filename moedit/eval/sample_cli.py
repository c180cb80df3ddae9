"""`moedit sample`: images from a checkpoint, as a PNG grid plus a JSON of the MoE capacity used.

    moedit sample runs/quickstart --num-samples 16 --classes 1,2,3 --steps 50 --cfg-scale 1.5
    moedit sample ckpts/dit_xl2 --print-config      # the sampling settings it would use, as JSON

The JSON (next to the PNG, same name) records the settings (sampler, steps, guidance, how guidance
batches its forwards, batch size), the labels and, for every model call, the capacity each
DiffMoE layer used (tokens processed / (S / E); 1.0 = the training capacity). Settings not given
on the command line come from the checkpoint's `diffusion` section, which for a converted
checkpoint holds the source authors' sampling defaults (docs/interop.md).
The same seed gives the same images and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moedit.lazy import LazyModule

torch = LazyModule("torch")  # imported when used: `--help` needs no torch

from moedit.diffusion.config import CFG_BATCHING, DDPM_SAMPLERS, FLOW_SAMPLERS
from moedit.errors import MoeditError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="run directory (newest checkpoint), checkpoint directory or exported .safetensors file")
    parser.add_argument("--num-samples", type=int, default=16, help="images to generate (default 16)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class labels, repeated to fill --num-samples (default: random)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's diffusion.sample_steps)")
    parser.add_argument("--sampler", default=None, choices=FLOW_SAMPLERS + DDPM_SAMPLERS,
                        help="default: the run's diffusion.sampler (euler for flow, ddpm for ddpm)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--guidance-channels", type=int, default=None,
                        help="guide only the first N channels (DiT: 3 of 4); default: the run's setting")
    parser.add_argument("--cfg-batching", default=None, choices=CFG_BATCHING,
                        help="guidance as one forward of 2B (joint) or two of B (separate); default: the run's "
                        "diffusion.cfg_batching. Changes DiffMoE's routing (docs/diffusion.md)")
    parser.add_argument("--seed", type=int, default=0, help="seeds labels, initial noise and sampler noise")
    parser.add_argument("--out", default="samples.png", help="PNG grid path; the JSON goes next to it")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--vae-path", default=None, help="local VAE directory overriding the one in the dataset manifest")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampler batch (default 64)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available")
    parser.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(N))")
    parser.add_argument("--print-config", action="store_true",
                        help="print the architecture and the resolved sampling settings as JSON and exit")


class CapacityRecorder:
    """Calls the model and records the capacity each MoE layer used in that call."""

    def __init__(self, model, noise_level, null_label: int | None = None):
        self.model, self.noise_level, self.null_label = model, noise_level, null_label
        self.records: list[dict] = []
        self.batch = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        from moedit.models.stats import last_capacity

        out = self.model(x, t, y)
        capacity = last_capacity(self.model)
        if capacity:
            null = None if y is None or self.null_label is None else int((y == self.null_label).sum())
            self.records.append({"batch": self.batch, "call": sum(r["batch"] == self.batch for r in self.records),
                                 "rows": int(x.shape[0]), "null_rows": null,
                                 "t": float(t[0]), "noise_level": float(self.noise_level(t[:1])[0]),
                                 "capacity": {str(block): value for block, value in sorted(capacity.items())}})
        return out


def parse_classes(text: str | None, num_samples: int, num_classes: int, generator: torch.Generator) -> torch.Tensor | None:
    """(N,) labels from '--classes 1,2,3' (repeated) or drawn at random; None for an unconditional model."""
    if num_classes == 0:
        if text:
            raise ValueError(f"--classes {text}: this model is unconditional (num_classes = 0)")
        return None
    if not text:
        return torch.randint(0, num_classes, (num_samples,), generator=generator)
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--classes {text!r}: expected comma-separated integers like 1,2,3") from None
    bad = [c for c in labels if not 0 <= c < num_classes]
    if not labels or bad:
        raise ValueError(f"--classes {text!r}: labels must be in 0..{num_classes - 1}" + (f" (got {bad})" if bad else ""))
    return torch.tensor(labels * math.ceil(num_samples / len(labels)))[:num_samples]


def generate(model, diffusion, *, noise: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
             generator: torch.Generator, null_label: int | None, progress: bool = True, **sample_kwargs):
    """Sample in batches; returns (latents (N, C, H, W), capacity records)."""
    from tqdm.auto import tqdm

    recorder = CapacityRecorder(model, diffusion.noise_level, null_label)
    device = next(model.parameters()).device
    chunks = []
    starts = range(0, noise.shape[0], batch_size)
    for batch, start in enumerate(tqdm(starts, desc="batches", disable=not progress or len(starts) == 1)):
        recorder.batch = batch
        y = None if labels is None else labels[start:start + batch_size].to(device)
        chunk = diffusion.sample(recorder, noise[start:start + batch_size].to(device), y, generator=generator,
                                 null_label=null_label, progress=progress, **sample_kwargs)
        chunks.append(chunk.float().cpu())
    return torch.cat(chunks), recorder.records


def sampling_settings(args: argparse.Namespace, cfg) -> dict:
    """Every setting that decides the samples: the command line over the checkpoint's `diffusion` section."""
    d = cfg.diffusion
    return {"objective": d.objective,
            "sampler": args.sampler or d.default_sampler,
            "steps": args.steps if args.steps is not None else d.sample_steps,
            "cfg_scale": d.cfg_scale if args.cfg_scale is None else float(args.cfg_scale),
            "guidance_channels": d.guidance_channels if args.guidance_channels is None else args.guidance_channels,
            "guidance_interval": None if d.guidance_interval is None else list(d.guidance_interval),
            "cfg_batching": args.cfg_batching or d.cfg_batching,
            "batch_size": args.batch_size}


def checkpoint_source(path: str | Path) -> dict | None:
    """`meta.json`'s `source` (written by `moedit convert`) of a checkpoint or run directory, if any."""
    from moedit.train.checkpoint import latest_checkpoint

    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = latest_checkpoint(path / "checkpoints") or path
    meta = path / "meta.json" if path.is_dir() else None
    if meta is None or not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("source")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MoeditError("--device cuda: CUDA is not available here; use --device cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def main(args: argparse.Namespace) -> int:
    from moedit.data import build_decoder, load_manifest
    from moedit.data.manifest import manifest_path
    from moedit.diffusion import build_diffusion
    from moedit.diffusion.grid import save_grid
    from moedit.models.flavors import describe
    from moedit.train.checkpoint import load_for_inference

    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples}: must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    device = _device(args.device)
    torch.manual_seed(args.seed)  # label dropout is off in eval mode; this pins anything else random
    model, cfg = load_for_inference(args.checkpoint, use_ema=not args.raw, device=device)
    model.eval()
    settings = sampling_settings(args, cfg)
    if args.print_config:
        print(json.dumps({"checkpoint": str(args.checkpoint), "architecture": describe(cfg.model),
                          "sampling": settings, "source": checkpoint_source(args.checkpoint)}, indent=1))
        return 0
    diffusion = build_diffusion(cfg.diffusion)
    generator = torch.Generator().manual_seed(args.seed)  # CPU: same numbers on any device
    num_classes = cfg.model.num_classes
    labels = parse_classes(args.classes, args.num_samples, num_classes, generator)
    shape = (args.num_samples, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise = torch.randn(shape, generator=generator)
    latents, records = generate(model, diffusion, noise=noise, labels=labels, batch_size=args.batch_size,
                                generator=generator, null_label=num_classes or None, steps=settings["steps"],
                                sampler=settings["sampler"], cfg_scale=settings["cfg_scale"],
                                guidance_channels=settings["guidance_channels"],
                                cfg_batching=settings["cfg_batching"])
    decoder = build_decoder(load_manifest(manifest_path(cfg.data)), vae_path=args.vae_path)
    images = decoder(latents.to(device)).float().cpu()
    out = Path(args.out)
    nrow = args.nrow or max(1, math.ceil(math.sqrt(args.num_samples)))
    save_grid(images, out, nrow=nrow)
    summary = {
        "checkpoint": str(args.checkpoint), "weights": "raw" if args.raw else "ema", "seed": args.seed,
        **settings, "num_samples": args.num_samples,
        "classes": None if labels is None else labels.tolist(),
        "mean_capacity": _mean_capacity(records), "capacity_per_call": records,
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {json_path}")
    return 0


def _mean_capacity(records: list[dict]) -> dict[str, float]:
    """Per layer, the capacity averaged over all model calls."""
    sums: dict[str, list[float]] = {}
    for record in records:
        for block, value in record["capacity"].items():
            sums.setdefault(block, []).append(value)
    return {block: sum(values) / len(values) for block, values in sums.items()}
