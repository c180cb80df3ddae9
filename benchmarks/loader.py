"""Loader throughput: moedit's ShardLoader next to a bare webdataset pipeline on the same shards.

    python benchmarks/loader.py [--samples 40000] [--workers 2] [--batch-size 256] [--repeats 3]

Both read synthetic 4x32x32 float16 latents (the shape of 256px SD-VAE latents) from 1,000-sample
shards with the same number of DataLoader workers, and both hand out batches of tensors:
webdataset with its default decoder (`.npy` via np.load), `to_tuple`, `batched`; moedit with its
block shuffle, checks, scaling, and checksums on. Each pass is a full epoch, worker start included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def make_shards(root: str, samples: int) -> str:
    from moedit.data.prepare import PrepareSpec, prepare
    from moedit.data.sources import SourceSpec

    source = SourceSpec(kind="synthetic", num_samples=samples, num_classes=1000, latent_shape=(4, 32, 32))
    spec = PrepareSpec(source=source, dtype="float16", shard_size=1000, batch_size=256)
    prepare(spec, root, workers=2, progress=False)
    return root


def bare_webdataset(root: str, workers: int, batch_size: int) -> int:
    import webdataset as wds

    urls = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
               .decode().to_tuple("npy", "cls").batched(batch_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(labels) for _, labels in loader)


def moedit_loader(root: str, workers: int, batch_size: int) -> int:
    from moedit.data import DataConfig, build_loader

    cfg = DataConfig(path=root, num_workers=workers, shuffle_buffer=1000)
    loader = build_loader(cfg, batch_size=batch_size, rank=0, world_size=1, seed=0)
    return sum(len(labels) for _, labels in loader)


def measure(fn, root: str, workers: int, batch_size: int) -> float:
    start = time.perf_counter()
    count = fn(root, workers, batch_size)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_shards(os.path.join(tmp, "shards"), args.samples)
        bare_webdataset(root, args.workers, args.batch_size)  # warm the page cache
        rates: dict[str, list[float]] = {"webdataset": [], "moedit": []}
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
            rates["webdataset"].append(measure(bare_webdataset, root, args.workers, args.batch_size))
            rates["moedit"].append(measure(moedit_loader, root, args.workers, args.batch_size))
    bare, ours = statistics.median(rates["webdataset"]), statistics.median(rates["moedit"])
    print(f"samples: {args.samples} (4x32x32 float16, 1000 per shard), workers {args.workers}, "
          f"batch {args.batch_size}, median of {args.repeats}")
    print(f"bare webdataset : {bare:10,.0f} samples/s")
    print(f"moedit loader   : {ours:10,.0f} samples/s  ({ours / bare:.2f}x bare)")


if __name__ == "__main__":
    main()
