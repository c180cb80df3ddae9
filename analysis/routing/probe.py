"""Offline routing probe: run a checkpoint's EMA model and record per-token routing.

Two modes (docs/routing_analysis.md):
- fixed noise levels: held-out latents from shards are noised to each requested level
  (every sample of a forward shares the level, so last_capacity() is the capacity at it);
- trajectories: full sampling runs from noise (`build_diffusion(cfg.diffusion).sample`),
  where DiffMoE's dynamic capacity shows; consecutive forwards of a trajectory are compared.
Decisions are reduced on the fly (RoutingAccumulator); only --trace keeps per-token data.
A REPA checkpoint probed at fixed noise levels over shards with its feature field (or, for a run
trained with train.repa.encoder, over pixel shards: the features computed as the trainer does) also
gets each token's REPA similarity (cos of the projected hidden state after block repa_depth and the
token's encoder feature), so the report can set expert load against it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moedit.analysis.routing.accumulate import RoutingAccumulator
from moedit.analysis.routing.trace import TraceWriter
from moedit.errors import MoeditError


@dataclass
class ProbeOptions:
    noise_levels: list[float]
    trajectory: bool = False
    sampling_steps: int = 50
    num_samples: int = 256
    batch_size: int = 32
    predictor_threshold: float = 0.5
    device: str | None = None
    seed: int = 0
    shards: str | None = None
    trace: str | None = None
    trace_scores: bool = False
    cfg_scale: float = 1.0  # > 1 doubles the batch with null-class tokens (they are counted too)
    sampler: str | None = None  # None: the config's default sampler
    repa_bins: int = 5  # quantile bins of the REPA similarity (REPA checkpoints only)


class _Session:
    """Model + capture list + accumulator (+ trace); `forward_done` drains the capture list."""

    def __init__(self, model, records: list, accumulator: RoutingAccumulator,
                 writer: TraceWriter | None, repa: "RepaSimilarity | None" = None):
        from moedit.models.stats import last_capacity

        self.model, self.records, self.repa = model, records, repa
        self.accumulator, self.writer = accumulator, writer
        self._last_capacity = last_capacity
        self.step: int | None = None
        self.stream = 0
        self.batch = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.model(x, t, y)
        self.forward_done()
        if self.step is not None:
            self.step += 1
        return out

    def forward_done(self) -> None:
        records = list(self.records)
        self.records.clear()  # the capture list would otherwise grow with every forward
        if not records:
            raise MoeditError("the model ran but recorded no routing: it has no MoE layers "
                              "(a dense checkpoint?); the routing probe needs a MoE model")
        capacities = self._last_capacity(self.model)
        similarity = self.repa.take() if self.repa is not None else None
        self.accumulator.update(records, capacities, step=self.step, stream=self.stream, similarity=similarity)
        if self.writer is not None:
            self.writer.add(records, capacities, self.step, self.stream, similarity)


class RepaSimilarity:
    """Each token's REPA similarity in a forward: cos(repa_projector(h), target) of the hidden tokens h
    after block repa_depth (a forward hook on that block; the model's forward is unchanged), for the
    `target` features set before the forward. `take()` gives (B * T,) in the routing records' token
    order (sample-major, as the MoE layers flatten (B, T)) and clears it."""

    def __init__(self, model):
        self.model, self.target, self.value = model, None, None
        block = model.blocks[model.cfg.repa_depth - 1]
        self.handle = block.register_forward_hook(lambda module, inputs, output: self._hook(output))

    def _hook(self, h):
        from moedit.models.repa import repa_similarity

        if self.target is not None:
            self.value = repa_similarity(self.model.repa_projector(h), self.target).reshape(-1)  # (B*T,), h (B, T, D)

    def take(self):
        value, self.value = self.value, None
        return value

    def close(self):
        self.handle.remove()


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeditError(f"--device {name}: CUDA is not available on this machine; use cpu")
    return device


def load_model(path: str | Path, device: torch.device):
    """EMA model and config with the training-only REPA projector when the checkpoint has one (the
    REPA similarity; the forward without a target is the inference model's); a dense checkpoint is
    an error (nothing routes)."""
    from moedit.train.checkpoint import load_for_inference

    model, cfg = load_for_inference(path, use_ema=True, device=device, training_only=True)
    if getattr(cfg.model, "moe", None) is None:
        raise MoeditError(f"checkpoint {path} is a dense model (model.moe is null): there is no "
                          "expert routing to analyse")
    return model, cfg


def probe(path: str | Path, edges, options: ProbeOptions, loaded=None) -> dict:
    """Run the probe on the checkpoint at `path` (or `loaded` = (model, cfg) already built)."""
    from moedit.diffusion import build_diffusion
    from moedit.models.stats import capture_routing

    device = _device(options.device)
    model, cfg = loaded if loaded is not None else load_model(path, device)
    model.eval()
    edges = list(getattr(model, "noise_bin_edges", None) or edges)
    moe = cfg.model.moe
    token_choice = moe.router == "token_choice"
    accumulator = RoutingAccumulator(edges, top_k=moe.top_k if token_choice else None,
                                     capacity=None if token_choice else moe.capacity,
                                     predictor_threshold=options.predictor_threshold,
                                     train_capacity=moe.capacity, similarity_bins=options.repa_bins)
    field, encoder = repa_targets(cfg, options, device)
    measured = field is not None or encoder is not None
    writer = TraceWriter(scores=options.trace_scores, repa_depth=cfg.model.repa_depth if measured else 0) \
        if options.trace else None
    diffusion = build_diffusion(cfg.diffusion)
    repa = RepaSimilarity(model) if measured else None
    try:
        with torch.no_grad(), capture_routing(model) as records:
            session = _Session(model, records, accumulator, writer, repa)
            if options.trajectory:
                samples = _run_trajectories(session, cfg, diffusion, options, device)
            else:
                samples = _run_noise_levels(session, cfg, diffusion, options, device, field, encoder)
    finally:
        if repa is not None:
            repa.close()
    result = accumulator.result()
    if "repa" in result:
        result["repa"].update(depth=cfg.model.repa_depth, field=field,
                              encoder=cfg.train.repa.encoder if encoder is not None else None)
    result["samples"] = samples
    result.update(mode="trajectory" if options.trajectory else "noise_levels",
                  source=str(path), noise_levels=None if options.trajectory else options.noise_levels,
                  sampling_steps=options.sampling_steps if options.trajectory else None,
                  # the routing pool of a guided trajectory: one call of 2B or two of B (docs/diffusion.md)
                  batch_size=options.batch_size, cfg_scale=options.cfg_scale if options.trajectory else None,
                  cfg_batching=cfg.diffusion.cfg_batching if options.trajectory and options.cfg_scale != 1.0 else None)
    if writer is not None:
        result["trace"] = str(writer.save(options.trace))
    return result


def _noised(diffusion, x: torch.Tensor, noise: torch.Tensor, level: float):
    """(x_t, t) at noise level `level` in the model's time convention (docs/DESIGN.md)."""
    batch = x.shape[0]
    if diffusion.objective == "flow":
        t = torch.full((batch,), 1.0 - level, device=x.device)
        return diffusion.interpolate(x, noise, t), t
    # DDPM: integer timestep index, 0 = clean; noise level = t / num_timesteps
    index = min(int(round(level * diffusion.num_timesteps)), diffusion.num_timesteps - 1)
    k = torch.full((batch,), index, device=x.device, dtype=torch.long)
    return diffusion.q_sample(x, k, noise), k.float()


def _held_out_data(cfg, options: ProbeOptions):
    """The data config of the held-out shards (unshuffled; --shards replaces the path)."""
    changes = {"shuffle": False, "resampled": False, "num_workers": 0}
    if options.shards:
        changes["path"] = options.shards
        changes["manifest"] = None
    return dataclasses.replace(cfg.data, **changes)


def repa_targets(cfg, options: ProbeOptions, device):
    """Where the probe takes the REPA targets from: (field, None) for the shards' feature field,
    (None, encoder) for a run trained with train.repa.encoder (its pixel_encoder, applied to the
    clean images as the trainer does), (None, None) for no REPA similarity: not a REPA checkpoint
    (with its projector), a trajectory probe, shards without the field (a note on stderr for a
    REPA checkpoint). Features of another shape and an encoder run probed on latents are named errors."""
    if not cfg.model.has_repa:
        return None, None
    if options.trajectory:
        print("routing probe: no REPA similarity for sampling trajectories (it needs the clean images' encoder "
              "features: probe fixed noise levels)", file=sys.stderr)
        return None, None
    if cfg.train.repa.encoder:
        return None, _pixel_encoder(cfg, options, device)
    return repa_field(cfg, options), None


def _pixel_encoder(cfg, options: ProbeOptions, device):
    """The run's train.repa.encoder (moedit.train.repa.pixel_encoder) after checking that the held-out
    shards hold pixels, which is what it encodes."""
    from moedit.data import load_manifest
    from moedit.data.manifest import manifest_path
    from moedit.train.repa import pixel_encoder

    path = manifest_path(_held_out_data(cfg, options))
    kind = load_manifest(path).encoder.get("type")
    if kind != "identity":
        raise MoeditError(f"the run computed its REPA targets from pixels (train.repa.encoder = {cfg.train.repa.encoder}), "
                          f"but {path} holds latents (encoder type {kind}): probe pixel shards (--shards)")
    return pixel_encoder(cfg, device)


def repa_field(cfg, options: ProbeOptions) -> str | None:
    """The shards' REPA feature field when they hold it (None and a note on stderr otherwise);
    features of another shape than the checkpoint's projector are a named error."""
    from moedit.data import load_manifest
    from moedit.data.manifest import manifest_path

    field, m = cfg.train.repa.field, cfg.model
    data_cfg = _held_out_data(cfg, options)
    path = manifest_path(data_cfg)
    manifest = load_manifest(path)
    if field not in manifest.fields:
        print(f"routing probe: no REPA similarity: {path} lists no {field!r} field (shards prepared with "
              "--repa-encoder have it; runs trained with train.repa.encoder need none)", file=sys.stderr)
        return None
    _, shape = manifest.field_spec(field)
    if list(shape) != [m.num_tokens, m.repa_dim]:
        raise MoeditError(f"the held-out shards' {field!r} features have per-sample shape {list(shape)}, the "
                          f"checkpoint's REPA projector needs ({m.num_tokens}, {m.repa_dim}): probe shards with "
                          "the features the run was trained on (--shards)")
    return field


def _held_out_loader(cfg, options: ProbeOptions, field: str | None = None):
    from moedit.data import build_loader

    data_cfg = _held_out_data(cfg, options)
    # the probe feeds latents and labels; REPA features only when it measures the similarity
    fields = [name for name in data_cfg.fields if name != cfg.train.repa.field] + ([field] if field else [])
    data_cfg = dataclasses.replace(data_cfg, fields=fields)
    return build_loader(data_cfg, batch_size=options.batch_size, rank=0, world_size=1,
                        seed=options.seed)


def _run_noise_levels(session: _Session, cfg, diffusion, options: ProbeOptions, device, field: str | None = None,
                      encoder=None):
    generator = torch.Generator().manual_seed(options.seed)
    seen = 0
    bar = tqdm(total=options.num_samples, unit="sample", desc="routing probe")
    for batch in _held_out_loader(cfg, options, field):
        latents, labels = batch[0], batch[1]
        latents = latents[: options.num_samples - seen].to(device)  # (B, C, H, W)
        labels = labels[: latents.shape[0]].to(device)  # (B,)
        if field:  # (B, T, C) encoder features of the clean images, float16 in the shards
            session.repa.target = batch[2][field][: latents.shape[0]].to(device, torch.float32)
        elif encoder is not None:  # train.repa.encoder: from the clean pixels, as the trainer's _repa_field
            session.repa.target = encoder.encode(list(latents.float().cpu().numpy())).to(device, torch.float32)
        for level in options.noise_levels:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            x_t, t = _noised(diffusion, latents, noise, level)
            session.model(x_t, t, labels)
            session.forward_done()
            session.stream += 1
        seen += latents.shape[0]
        bar.update(latents.shape[0])
        if seen >= options.num_samples:
            break
    bar.close()
    if seen == 0:
        raise MoeditError(f"held-out shards ({options.shards or cfg.data.path}) yielded no samples")
    return seen


def _run_trajectories(session: _Session, cfg, diffusion, options: ProbeOptions, device):
    generator = torch.Generator().manual_seed(options.seed)
    model_cfg = cfg.model
    shape = (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    bar = tqdm(total=options.num_samples, unit="sample", desc="routing probe (sampling)")
    done = 0
    while done < options.num_samples:
        batch = min(options.batch_size, options.num_samples - done)
        noise = torch.randn((batch, *shape), generator=generator).to(device)  # (B, C, H, W)
        labels = None
        if model_cfg.num_classes > 0:
            labels = torch.randint(0, model_cfg.num_classes, (batch,), generator=generator).to(device)
        session.step = 0  # the session counts model calls: Heun makes two per step
        diffusion.sample(session, noise, labels, steps=options.sampling_steps,
                         sampler=options.sampler, cfg_scale=options.cfg_scale,
                         null_label=model_cfg.num_classes or None, generator=generator)
        session.step = None
        session.stream += 1
        done += batch
        bar.update(batch)
    bar.close()
    return done
