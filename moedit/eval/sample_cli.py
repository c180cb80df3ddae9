"""`moedit sample`: images from a checkpoint, as a PNG grid plus a JSON of the MoE capacity used.

    moedit sample runs/quickstart --num-samples 16 --classes 1,2,3 --steps 50 --cfg-scale 1.5
    moedit sample runs/t2i --prompt "a handwritten 7" --prompt "the digit three" --per-prompt 8
    moedit sample ckpts/dit_xl2 --print-config      # the sampling settings it would use, as JSON

The JSON (next to the PNG, same name) records the settings (sampler, steps, guidance, how guidance
batches its forwards, batch size), the labels or prompts, for every model call the capacity each
DiffMoE layer used (tokens processed / (S / E); 1.0 = the training capacity) and the routing
statistics of the whole sampling (tokens per expert, by noise level and by class, or by prompt
for a text run). Settings not given on the command line come from the checkpoint's `diffusion`
section, which for a converted checkpoint holds the source authors' sampling defaults
(docs/interop.md). The same seed gives the same images and JSON.

A text run (model.condition = text) samples `--per-prompt` images for each prompt, each prompt in
batches of its own (so a prompt's images do not depend on the other prompts), from the same
initial noise for every prompt (column j of the grid shares its noise), guided against the
model's null caption; the grid has one row per prompt under its caption.
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
    parser.add_argument("--num-samples", type=int, default=None,
                        help="images to generate (default 16; a text run: prompts x --per-prompt, and a given "
                        "value must be a multiple of the number of prompts)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class labels, repeated to fill --num-samples (default: random)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help="a caption to sample (text runs; repeat for several)")
    parser.add_argument("--prompts-file", default=None, metavar="FILE",
                        help="captions to sample, one a line (blank lines and lines starting with # skipped); "
                        "after any --prompt")
    parser.add_argument("--per-prompt", type=int, default=None, metavar="N",
                        help="images per prompt (default 4, or --num-samples / number of prompts)")
    parser.add_argument("--text-encoder", default=None, metavar="DIR",
                        help="local text encoder directory overriding the dataset manifest's text_encoder")
    parser.add_argument("--save-npz", default=None, metavar="PATH",
                        help="also write the images, latents and each image's label or prompt index as .npz")
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

    def __init__(self, model, noise_level, null_label: int | None = None, prompt_load=None):
        self.model, self.noise_level, self.null_label = model, noise_level, null_label
        self.prompt_load = prompt_load  # a PromptLoad: text runs split the expert load by prompt
        self.records: list[dict] = []
        self.batch = 0
        self.prompt: int | None = None  # text runs: the prompt of the current batch

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **text) -> torch.Tensor:
        """`model(x, t, y)` for labels; guidance calls a text model as `model(x, t, text=..., text_mask=...,
        drop_text=...)`, and those keywords pass through."""
        from moedit.models.stats import capture_routing, last_capacity

        null_rows = None
        if text:
            drop = text.get("drop_text")
            dropped = torch.zeros(x.shape[0], dtype=torch.bool) if drop is None else drop.bool().cpu()
            null_rows = int(dropped.sum())
        elif y is not None and self.null_label is not None:
            null_rows = int((y == self.null_label).sum())
        if self.prompt_load is not None and text:
            with capture_routing(self.model) as routing:
                out = self.model(x, t, y, **text)
            groups = torch.full((x.shape[0],), self.prompt, dtype=torch.long)  # (B,)
            groups[dropped] = self.prompt_load.num_prompts  # the null caption's row
            self.prompt_load.add(routing, groups)
        else:
            out = self.model(x, t, y, **text)
        capacity = last_capacity(self.model)
        if capacity:
            record = {"batch": self.batch, "call": sum(r["batch"] == self.batch for r in self.records),
                      "rows": int(x.shape[0]), "null_rows": null_rows,
                      "t": float(t[0]), "noise_level": float(self.noise_level(t[:1])[0]),
                      "capacity": {str(block): value for block, value in sorted(capacity.items())}}
            if self.prompt is not None:
                record["prompt"] = self.prompt
            self.records.append(record)
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
    from moedit.eval.prompts import check_condition, read_prompts
    from moedit.models.flavors import describe
    from moedit.models.stats import reset_routing_stats, snapshot_routing_stats
    from moedit.train.checkpoint import load_for_inference

    for name in ("num_samples", "per_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    prompts = read_prompts(args.prompt, args.prompts_file)
    device = _device(args.device)
    torch.manual_seed(args.seed)  # label dropout is off in eval mode; this pins anything else random
    model, cfg = load_for_inference(args.checkpoint, use_ema=not args.raw, device=device)
    model.eval()
    settings = sampling_settings(args, cfg)
    if args.print_config:
        print(json.dumps({"checkpoint": str(args.checkpoint), "architecture": describe(cfg.model),
                          "sampling": settings, "source": checkpoint_source(args.checkpoint)}, indent=1))
        return 0
    check_condition(cfg.model, prompts, args.classes)
    diffusion = build_diffusion(cfg.diffusion)
    decoder = build_decoder(load_manifest(manifest_path(cfg.data)), vae_path=args.vae_path)
    reset_routing_stats(model)  # the JSON's routing statistics cover this sampling only
    if cfg.model.is_text:
        latents, images, records, extra = _sample_prompts(args, cfg, model, diffusion, decoder, device, prompts,
                                                          settings)
    else:
        latents, images, records, extra = _sample_classes(args, cfg, model, diffusion, decoder, device, settings)
    routing = snapshot_routing_stats(model)
    prompt_load = extra.pop("prompt_load", None)
    if prompt_load is not None:
        for layer in routing["layers"]:
            layer["tokens_per_expert_by_prompt"] = prompt_load.get(layer["block"])
    out = Path(args.out)
    summary = {
        "checkpoint": str(args.checkpoint), "weights": "raw" if args.raw else "ema", "seed": args.seed,
        **settings, "num_samples": int(latents.shape[0]), **extra,
        "mean_capacity": _mean_capacity(records), "capacity_per_call": records, "routing": routing,
    }
    if args.save_npz:
        summary["npz"] = str(args.save_npz)
        _save_npz(args.save_npz, images, latents, extra)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} and {json_path}" + (f" and {args.save_npz}" if args.save_npz else ""))
    return 0


def _sample_classes(args, cfg, model, diffusion, decoder, device, settings):
    """(latents, images, capacity records, JSON entries) of a class-conditional or unconditional run."""
    from moedit.diffusion.grid import save_grid

    num_samples = args.num_samples or 16
    generator = torch.Generator().manual_seed(args.seed)  # CPU: same numbers on any device
    num_classes = cfg.model.num_classes
    labels = parse_classes(args.classes, num_samples, num_classes, generator)
    shape = (num_samples, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise = torch.randn(shape, generator=generator)
    latents, records = generate(model, diffusion, noise=noise, labels=labels, batch_size=args.batch_size,
                                generator=generator, null_label=num_classes or None, steps=settings["steps"],
                                sampler=settings["sampler"], cfg_scale=settings["cfg_scale"],
                                guidance_channels=settings["guidance_channels"],
                                cfg_batching=settings["cfg_batching"])
    images = decoder(latents.to(device)).float().cpu()
    save_grid(images, args.out, nrow=args.nrow or max(1, math.ceil(math.sqrt(num_samples))))
    return latents, images, records, {"classes": None if labels is None else labels.tolist()}


def _per_prompt(args, num_prompts: int) -> int:
    """Images per prompt: --per-prompt (default 4), or --num-samples / prompts when only that is given."""
    if args.num_samples is None:
        return args.per_prompt or 4
    if args.num_samples % num_prompts or (args.per_prompt and args.per_prompt * num_prompts != args.num_samples):
        raise ValueError(f"--num-samples {args.num_samples}: a text run samples the same number of images for "
                         f"each of its {num_prompts} prompt(s); give --per-prompt N instead"
                         + (f" (--per-prompt {args.per_prompt} makes {args.per_prompt * num_prompts})"
                            if args.per_prompt else ""))
    return args.num_samples // num_prompts


def _sample_prompts(args, cfg, model, diffusion, decoder, device, prompts: list[str], settings):
    """(latents, images, capacity records, JSON entries) of a text run: `per_prompt` images for each
    prompt, prompt-major; prompt p's images are `moedit.eval.sampling.sample_chunk` of a plan of
    `per_prompt` images with only that prompt (the same chunk seed, so every prompt starts from
    the same noise)."""
    from moedit.eval.prompts import PromptLoad, encode_prompts, run_text_encoder, save_captioned_grid
    from moedit.eval.sampling import Captions, SamplingPlan, sample_chunk

    per_prompt = _per_prompt(args, len(prompts))
    encoder = run_text_encoder(cfg, args.text_encoder)
    captions = encode_prompts(encoder, prompts)
    load = PromptLoad(len(prompts))
    recorder = CapacityRecorder(model, diffusion.noise_level, prompt_load=load)
    latents, images = [], []

    def decode(z):
        latents.append(z.float().cpu())
        return decoder(z)

    for p in range(len(prompts)):
        one = Captions(captions.text[p:p + 1], captions.text_mask[p:p + 1])
        plan = prompt_plan(cfg, settings, per_prompt, args.seed, one)
        recorder.prompt = p
        for batch_images, _ in sample_chunk(plan, 0, recorder, diffusion, decode, device, one):
            images.append(batch_images.cpu())
            recorder.batch += 1
    images_t = torch.cat(images)
    save_captioned_grid(images_t.view(len(prompts), per_prompt, *images_t.shape[1:]), prompts, args.out)
    extra = {"classes": None, "prompts": prompts, "per_prompt": per_prompt,
             "prompt_index": torch.arange(len(prompts)).repeat_interleave(per_prompt).tolist(),
             "noise": "the same for every prompt (grid column j shares its initial noise)",
             "text_encoder": encoder, "guidance": "against the model's null caption (drop_text)",
             "prompt_load": {block: table for block, table in load.by_block().items()}}
    return torch.cat(latents), images_t, recorder.records, extra


def prompt_plan(cfg, settings: dict, per_prompt: int, seed: int, captions) -> "SamplingPlan":
    """The eval SamplingPlan `moedit sample` uses for one prompt: its `per_prompt` images as one chunk."""
    from moedit.eval.sampling import SamplingPlan

    m = cfg.model
    return SamplingPlan(num_samples=per_prompt, chunk_size=per_prompt, batch_size=settings["batch_size"],
                        seed=seed, num_classes=0, latent_shape=(m.in_channels, m.input_size, m.input_size),
                        sampler=settings["sampler"], steps=settings["steps"], cfg_scale=settings["cfg_scale"],
                        guidance_channels=settings["guidance_channels"], cfg_batching=settings["cfg_batching"],
                        captions=captions.digest())


def _save_npz(path, images: torch.Tensor, latents: torch.Tensor, extra: dict) -> None:
    """images (N, C', H', W') in [0, 1], latents (N, C, H, W), and `labels` (N,) or `prompt_index` (N,) with
    `prompts` (P,), so a classifier can score the samples."""
    import numpy as np

    arrays = {"images": images.float().numpy(), "latents": latents.float().numpy()}
    if extra.get("prompts") is not None:
        arrays["prompt_index"] = np.asarray(extra["prompt_index"], dtype=np.int64)
        arrays["prompts"] = np.asarray(extra["prompts"])
    elif extra.get("classes") is not None:
        arrays["labels"] = np.asarray(extra["classes"], dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _mean_capacity(records: list[dict]) -> dict[str, float]:
    """Per layer, the capacity averaged over all model calls."""
    sums: dict[str, list[float]] = {}
    for record in records:
        for block, value in record["capacity"].items():
            sums.setdefault(block, []).append(value)
    return {block: sum(values) / len(values) for block, values in sums.items()}
