"""Distributed, resumable sampling of N images straight into feature statistics.

The N global sample indices are cut into chunks of `chunk_size`; chunk c goes to rank
c mod world_size. Everything random about chunk c comes from a generator seeded by (seed, c)
alone, and image i has label i mod num_classes (class-balanced, DiT's protocol) or, for a text
model, caption i mod P of the P encoded prompts (`Captions`), so an image
does not depend on how many ranks share the work (given the same chunk and batch sizes and
guidance batching: a DiffMoE layer's dynamic capacity depends on the batch it sees).

After each chunk a rank writes its running sums and the list of its finished chunks to
`state_rank<r>.pt` in the work directory (atomically); a restarted evaluation loads it and
skips those chunks, so nothing is sampled twice and an interrupted chunk is redone whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moedit.errors import MoeditError
from moedit.eval.features import FeatureExtractor
from moedit.eval.metrics import FeatureStats
from moedit.eval.reference import accumulate


@dataclass(frozen=True)
class SamplingPlan:
    """Everything that decides which images are made (part of the resume check)."""

    num_samples: int
    chunk_size: int
    batch_size: int
    seed: int
    num_classes: int
    latent_shape: tuple[int, int, int]
    sampler: str
    steps: int
    cfg_scale: float
    guidance_channels: int | None
    cfg_batching: str = "joint"
    """Guidance as one forward of 2B or two of B: with `batch_size`, what a DiffMoE layer's token pool holds."""
    captions: str | None = None
    """Text models: `Captions.digest()` of the prompts (image i takes prompt i mod P); None for class models."""

    def __post_init__(self):
        from moedit.diffusion.config import check_cfg_batching

        for name in ("num_samples", "chunk_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        check_cfg_batching(self.cfg_batching, where="--cfg-batching")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min(self.num_samples, (chunk + 1) * self.chunk_size)

    def chunks_of(self, rank: int, world_size: int) -> range:
        return range(rank, self.num_chunks, world_size)

    def chunk_seed(self, chunk: int) -> int:
        digest = hashlib.sha256(f"moedit-eval:{self.seed}:{chunk}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def labels(self, lo: int, hi: int) -> torch.Tensor | None:
        """(hi - lo,) class-balanced labels i mod num_classes; None for an unconditional model."""
        return torch.arange(lo, hi) % self.num_classes if self.num_classes > 0 else None


@dataclass(frozen=True)
class Captions:
    """Encoded prompts for a text model: features (P, L, text_dim) and mask (P, L) bool."""

    text: torch.Tensor
    text_mask: torch.Tensor

    def __post_init__(self):
        if self.text.dim() != 3 or self.text_mask.shape != self.text.shape[:2] or self.text_mask.dtype != torch.bool:
            raise ValueError(f"captions: text {tuple(self.text.shape)} and text_mask {tuple(self.text_mask.shape)} "
                             f"({self.text_mask.dtype}): expected (P, L, W) features and a (P, L) bool mask")

    def condition(self, lo: int, hi: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The model's text keywords for global images lo..hi-1 (image i: prompt i mod P)."""
        rows = torch.arange(lo, hi) % self.text.shape[0]
        return {"text": self.text[rows].to(device, torch.float32), "text_mask": self.text_mask[rows].to(device)}

    def digest(self) -> str:
        h = hashlib.sha256(self.text.float().cpu().numpy().tobytes())
        h.update(self.text_mask.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def sample_chunk(plan: SamplingPlan, chunk: int, model, diffusion, decoder: Callable,
                 device: torch.device, captions: Captions | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [0, 1] (B, C', H', W'), global indices (B,)) batches of one chunk. A text model
    takes `captions` and is guided against its null caption (moedit.diffusion.guidance)."""
    lo, hi = plan.chunk_range(chunk)
    generator = torch.Generator().manual_seed(plan.chunk_seed(chunk))  # CPU: same numbers on any device
    noise = torch.randn((hi - lo, *plan.latent_shape), generator=generator)  # (n, C, H, W)
    labels = plan.labels(lo, hi)
    for start in range(0, hi - lo, plan.batch_size):
        stop = min(start + plan.batch_size, hi - lo)
        if captions is not None:
            y = captions.condition(lo + start, lo + stop, device)
        else:
            y = None if labels is None else labels[start:stop].to(device)
        latents = diffusion.sample(model, noise[start:stop].to(device), y, steps=plan.steps, sampler=plan.sampler,
                                   cfg_scale=plan.cfg_scale, guidance_channels=plan.guidance_channels,
                                   cfg_batching=plan.cfg_batching, null_label=plan.num_classes or None,
                                   generator=generator)
        yield decoder(latents).float(), torch.arange(lo + start, lo + stop)


class WorkDir:
    """The per-evaluation work directory: settings.json and one state file per rank."""

    def __init__(self, path: Path, settings: dict, engine):
        self.path, self.settings, self.engine = path, settings, engine

    def state_file(self, rank: int) -> Path:
        return self.path / f"state_rank{rank:05d}.pt"

    def open(self) -> None:
        """Create or check the directory; every rank must call it."""
        settings_file = self.path / "settings.json"
        if self.engine.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not settings_file.is_file():
                _atomic_write(settings_file, json.dumps(self.settings, indent=1, sort_keys=True).encode())
        self.engine.barrier()
        saved = json.loads(settings_file.read_text())
        changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if changed:
            raise MoeditError(
                f"{self.path} holds an unfinished evaluation with other settings ({', '.join(changed)}): "
                "rerun with the same settings to resume it, pass --restart to discard it, or choose another --name"
            )
        states = sorted(self.path.glob("state_rank*.pt"))
        if states:
            world = torch.load(states[0], map_location="cpu", weights_only=True)["world_size"]
            if world != self.engine.world_size:
                raise MoeditError(
                    f"{self.path} was started with {world} processes: resume it with {world} processes "
                    "(chunks are assigned round-robin per rank) or pass --restart"
                )

    def load(self, stats: FeatureStats) -> set[int]:
        """This rank's finished chunks (their sums go into `stats`)."""
        path = self.state_file(self.engine.rank)
        if not path.is_file():
            return set()
        state = torch.load(path, map_location="cpu", weights_only=True)
        stats.load_state_dict(state["stats"])
        return set(state["chunks"])

    def save(self, stats: FeatureStats, chunks: set[int]) -> None:
        state = {"world_size": self.engine.world_size, "rank": self.engine.rank, "chunks": sorted(chunks),
                 "stats": stats.state_dict()}
        tmp = self.state_file(self.engine.rank).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_file(self.engine.rank))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def sample_statistics(plan: SamplingPlan, model, diffusion, decoder: Callable, extractor: FeatureExtractor,
                      engine, work: WorkDir, *, keep: int, progress: bool = True,
                      captions: Captions | None = None) -> FeatureStats:
    """Sample this rank's chunks (skipping finished ones), then sum the statistics over ranks.

    Every rank returns the global statistics.
    """
    from tqdm.auto import tqdm

    given = None if captions is None else captions.digest()
    if given != plan.captions:
        raise ValueError(f"sampling plan names captions {plan.captions} but {given} were given: build the plan "
                         "with captions=Captions(...).digest() for a text model, None for a class model")
    stats = FeatureStats(extractor.dims, num_samples=plan.num_samples, keep=keep, device=engine.device)
    work.open()
    done = work.load(stats)
    todo = [c for c in plan.chunks_of(engine.rank, engine.world_size) if c not in done]
    bar = tqdm(total=sum(plan.chunk_range(c)[1] - plan.chunk_range(c)[0] for c in todo), unit="img",
               desc=f"sampling (rank {engine.rank})", disable=not (progress and engine.is_main))
    for chunk in todo:
        batches = sample_chunk(plan, chunk, model, diffusion, decoder, engine.device, captions)
        accumulate(_counting(batches, bar), extractor, stats)
        done.add(chunk)
        work.save(stats, done)
    bar.close()
    engine.all_reduce_sum_(list(stats.tensors.values()))
    if stats.count != plan.num_samples:  # a lost or doubled chunk would show here
        raise MoeditError(f"{work.path}: statistics cover {stats.count} images, expected {plan.num_samples}; "
                          "pass --restart to start over")
    return stats


def _counting(batches, bar):
    for images, indices in batches:
        bar.update(len(indices))
        yield images, indices


def plan_settings(plan: SamplingPlan) -> dict:
    out = asdict(plan)
    out["latent_shape"] = list(plan.latent_shape)
    if out["captions"] is None:
        del out["captions"]  # class runs keep the settings of evaluations begun before text models
    return out
