"""Reference statistics: from an ADM reference batch (.npz) or computed from a shard set, cached.

- ADM reference batch (`VIRTUAL_imagenet256_labeled.npz` and friends): `mu`, `sigma` (pool_3) and
  `mu_s`, `sigma_s` (spatial) are used as they are when their size matches the feature network;
  the images in `arr_0` (uint8, N x H x W x 3) are run through the network for precision/recall,
  and for the moments a file lacks or whose size does not match (another network).
- A shard set (`moedit prepare` output): latents are decoded to images through the manifest's
  decoder (so the reference is VAE reconstructions, not the original pixels) and fed through
  the network; the first `num_samples` of the loader's seeded shuffled order are used.

Computed statistics are cached as `.npz` (ADM keys plus `pool_features`) under a cache directory,
keyed by the source, the network and the settings, and reused by later evaluations.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moedit.errors import MoeditError
from moedit.eval.features import FeatureExtractor, to_network_input
from moedit.eval.metrics import FeatureStats, Reference

CACHE_VERSION = 1


def accumulate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], extractor: FeatureExtractor,
               stats: FeatureStats) -> None:
    """Feed (images in [0, 1] (B, C, H, W), global indices (B,)) batches through the network into `stats`."""
    device = stats.tensors["kept"].device
    for images, indices in batches:
        if len(indices):
            stats.update(extractor(to_network_input(images.to(device))), indices)


def iter_npz_images(path: Path, batch_size: int, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream `arr_0` of an ADM .npz in batches without loading it whole: ((B, 3, H, W) in [0, 1], indices)."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or fortran_order:
            raise MoeditError(f"{path}: arr_0 has shape {shape} and dtype {dtype}; expected uint8 images (N, H, W, 3)")
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        total = min(shape[0], limit)
        for start in range(0, total, batch_size):
            count = min(batch_size, total - start)
            rows = np.frombuffer(stream.read(count * row_bytes), dtype=np.uint8).reshape(count, *shape[1:])
            images = torch.from_numpy(rows.copy()).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
            yield images, torch.arange(start, start + count)


def iter_shard_images(data_cfg, batch_size: int, limit: int, vae_path: str | None,
                      device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded images of the first `limit` samples of a shard set, with their global indices."""
    from moedit.data import build_decoder, build_loader
    from moedit.data.manifest import load_manifest, manifest_path

    manifest = load_manifest(manifest_path(data_cfg))
    decoder = build_decoder(manifest, vae_path=vae_path)
    loader = build_loader(data_cfg, batch_size=batch_size, rank=0, world_size=1, seed=0)
    seen = 0
    for latents, _labels in loader:
        count = min(len(latents), limit - seen)
        yield decoder(latents[:count].to(device)).float(), torch.arange(seen, seen + count)
        seen += count
        if seen >= limit:
            break


def _own(batches, rank: int, world_size: int):
    """This rank's share of every batch: the images whose global index is rank modulo world_size."""
    for images, indices in batches:
        mine = indices % world_size == rank
        yield images[mine], indices[mine]


def _npz_keys(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files if key != "arr_0"} | (
                {"arr_0": None} if "arr_0" in data.files else {})
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MoeditError(f"--ref {path}: not a readable .npz reference batch ({exc})") from exc


def _npz_count(path: Path) -> int:
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return int(read_header(stream)[0][0])


class ReferenceSource:
    """Where reference statistics come from: an ADM .npz or a shard set (a DataConfig)."""

    def __init__(self, spec: str | None, run_data_cfg, *, num_samples: int, vae_path: str | None = None):
        self.num_samples, self.vae_path = num_samples, vae_path
        self.npz = Path(spec) if spec and spec.endswith(".npz") else None
        if self.npz is not None:
            if not self.npz.is_file():
                raise MoeditError(f"--ref {spec}: file not found (give an ADM reference batch .npz or a shard set)")
            self.stored = _npz_keys(self.npz)
            self.available = _npz_count(self.npz) if "arr_0" in self.stored else 0
            self.identity = {"npz": str(self.npz.resolve()), "bytes": self.npz.stat().st_size}
            return
        from moedit.data.manifest import load_manifest, manifest_path

        # A fixed, seeded order over the whole epoch: no workers, every shard, no resampling.
        base = run_data_cfg if spec is None else replace(run_data_cfg, path=spec, manifest=None)
        # fields=[]: the reference needs the images only (a text run's shards also hold caption features)
        self.data_cfg = replace(base, num_workers=0, resampled=False, split="shard", drop_last=False,
                                shuffle=True, prepare=None, fields=[])
        manifest = load_manifest(manifest_path(self.data_cfg))
        self.available = manifest.num_samples
        self.identity = {"shards": self.data_cfg.path, "manifest": manifest.to_json()}

    def describe(self) -> dict:
        kind = "adm-npz" if self.npz is not None else "shards"
        return {"kind": kind, "source": str(self.npz or self.data_cfg.path)}

    def stored_moments(self, dims: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Moments stored in an ADM .npz whose size fits the network (else they are recomputed)."""
        if self.npz is None:
            return {}
        out = {}
        for key, suffix in (("pool", ""), ("spatial", "_s")):
            mu, sigma = self.stored.get(f"mu{suffix}"), self.stored.get(f"sigma{suffix}")
            if key in dims and mu is not None and sigma is not None and mu.shape == (dims[key],):
                out[key] = (mu.astype(np.float64), sigma.astype(np.float64))
        return out

    def images(self, batch_size: int, device: torch.device):
        limit = min(self.num_samples, self.available)
        if self.npz is not None:
            return iter_npz_images(self.npz, batch_size, limit)
        return iter_shard_images(self.data_cfg, batch_size, limit, self.vae_path, device)


def cache_path(cache_dir: Path, source: ReferenceSource, extractor: FeatureExtractor, keep: int) -> Path:
    key = {"version": CACHE_VERSION, "source": source.identity, "network": extractor.identity(),
           "num_samples": source.num_samples, "keep": keep}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir / f"ref-{extractor.name}-{digest}.npz"


def load_cached(path: Path, info: dict) -> Reference:
    with np.load(path) as data:
        moments = {}
        for key, suffix in (("pool", ""), ("spatial", "_s")):
            if f"mu{suffix}" in data.files:
                moments[key] = (data[f"mu{suffix}"], data[f"sigma{suffix}"])
        kept = torch.from_numpy(data["pool_features"]) if "pool_features" in data.files else None
        return Reference(moments, kept, int(data["count"]), info | {"cache": str(path), "from_cache": True})


def build_reference(source: ReferenceSource, extractor: FeatureExtractor, engine, *, cache_dir: Path,
                    keep: int, batch_size: int, progress: bool = True) -> Reference | None:
    """The reference on rank 0 (None on other ranks); every rank must call it (it may compute)."""
    info = source.describe()
    stored = source.stored_moments(extractor.dims)
    if source.npz is not None and source.available == 0:
        missing = [key for key in ("pool", "spatial") if key in extractor.dims and key not in stored]
        if "pool" in missing:
            raise MoeditError(f"--ref {source.npz}: holds no images (arr_0) and no mu/sigma of size "
                              f"{extractor.dims['pool']} for --features {extractor.name}")
        return Reference(stored, None, 0, info | {"from_cache": False}) if engine.is_main else None
    path = cache_path(cache_dir, source, extractor, keep)
    if engine.broadcast_object(path.is_file()):
        return load_cached(path, info) if engine.is_main else None
    stats = compute_stats(source, extractor, engine, keep=keep, batch_size=batch_size, progress=progress)
    if not engine.is_main:
        return None
    reference = Reference.from_stats(stats, info | {"cache": str(path), "from_cache": False})
    reference.moments.update(stored)  # the published moments win where they fit
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **reference.to_npz())
    tmp.replace(path)
    return reference


def compute_stats(source: ReferenceSource, extractor: FeatureExtractor, engine, *, keep: int,
                  batch_size: int, progress: bool) -> FeatureStats:
    """Statistics of the reference images, shared over ranks by global index and summed."""
    from tqdm.auto import tqdm

    limit = min(source.num_samples, source.available)
    if limit < 2:
        raise MoeditError(f"reference {source.describe()['source']}: {limit} image(s); need at least 2")
    stats = FeatureStats(extractor.dims, num_samples=limit, keep=keep, device=engine.device)
    batches = tqdm(source.images(batch_size, engine.device), total=-(-limit // batch_size),
                   desc="reference features", disable=not (progress and engine.is_main))
    accumulate(_own(batches, engine.rank, engine.world_size), extractor, stats)
    engine.all_reduce_sum_(list(stats.tensors.values()))
    if stats.count != limit:
        raise MoeditError(f"reference {source.describe()['source']}: read {stats.count} images, expected {limit}")
    return stats
