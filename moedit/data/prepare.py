"""`moedit prepare`: encode a dataset into WebDataset latent shards plus dataset.json.

Sample i of the output is item i // copies of the source (copy 1 is the horizontal flip when
--flip is on); shard s holds samples [s * shard_size, (s + 1) * shard_size). With captions, each
sample also holds the caption (`KEY.txt`) and its text-encoder features (`KEY.text.npy`, float16
(max_length, width)) and mask (`KEY.text_mask.npy`, bool (max_length,)), encoded once here. With a
REPA encoder, each sample holds its image's patch features (`KEY.repa.npy`, float16 (grid^2, width);
moedit.data.repa), the flipped copy those of the flipped image. Shards are encoded
independently by a pool of processes, written atomically and recorded in `.prepare/` with their
checksum; a rerun skips every shard whose checksum still matches, and dataset.json comes last.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
from typing import Any

import numpy as np

from moedit.data.manifest import (
    MANIFEST_NAME, Manifest, ShardInfo, file_sha256, load_manifest, write_manifest,
)
from moedit.data.sources import SOURCES, SourceSpec, open_source
from moedit.data.tario import write_tar
from moedit.errors import MoeditError

PROGRESS_DIR = ".prepare"
TEXT_ENCODER_RECORD = "text_encoder.json"
REPA_ENCODER_RECORD = "repa_encoder.json"
STAND_IN_DIR = "text_encoder"
BUILTIN_TEXT_MAX_LENGTH = 16
"""Tokens per caption of `digits_text`: the longest digit caption is 8 tokens with [BOS]/[EOS]."""
BUILTIN_REPA_ENCODER, BUILTIN_REPA_GRID = "random:32", 8
"""`digits_repa`: fixed random features of width 32 on the 8 x 8 token grid (64 tokens)."""
# New settings at these values leave the fingerprint of older preparations unchanged.
_FINGERPRINT_DEFAULTS = {"text_encoder": None, "text_max_length": None, "repa_encoder": None, "repa_grid": None,
                         "repa_image_size": 224}
_SOURCE_FINGERPRINT_DEFAULTS = {"captions": False, "caption_column": "caption", "caption_key": "caption"}


@dataclasses.dataclass
class PrepareSpec:
    """Everything that determines the shards' bytes (its hash is the dataset fingerprint)."""

    source: SourceSpec
    encoder: str = "identity"
    vae: str | None = None
    image_size: int | None = None
    channels: int = 3
    flip: bool = False
    latent_sample: str = "mean"
    dtype: str = "float16"
    shard_size: int = 1000
    batch_size: int = 32
    seed: int = 0
    text_encoder: str | None = None
    """Local text encoder directory; None with source.captions: the tiny stand-in (digits only)."""
    text_max_length: int | None = None
    """Tokens per caption (None: 77 for CLIP, 120 for T5)."""
    repa_encoder: str | None = None
    """Local DINOv2 directory, or random:WIDTH, whose patch features go into the field `repa`; None: none."""
    repa_grid: int | None = None
    """The model's token grid G the features are resampled to (None: the latent's H // 2, patch size 2)."""
    repa_image_size: int = 224
    """The REPA encoder's input size (images are resized to it)."""

    def fingerprint(self) -> str:
        data = dataclasses.asdict(self)
        data["vae"] = os.path.abspath(self.vae) if self.vae else None
        for name in ("text_encoder", "repa_encoder"):  # random:WIDTH stays as given
            value = getattr(self, name)
            data[name] = os.path.abspath(value) if value and not value.startswith("random:") else value
        for defaults, where in ((_FINGERPRINT_DEFAULTS, data), (_SOURCE_FINGERPRINT_DEFAULTS, data["source"])):
            for key, value in defaults.items():
                if where[key] == value:
                    del where[key]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="digits",
                        help="digits (built in), folder (ROOT/<class>/<images>), webdataset (image tars, e.g. "
                             "LAION-style), hf (save_to_disk dir), parquet (file, dir or glob), synthetic, or "
                             "shards (index existing latent shards in --output)")
    parser.add_argument("--input", help="source path (folder, webdataset, hf, parquet)")
    parser.add_argument("--output", required=True, help="shard directory to write")
    parser.add_argument("--encoder", choices=("identity", "vae"), default="identity",
                        help="identity: pixels in [-1, 1]; vae: diffusers AutoencoderKL from --vae")
    parser.add_argument("--vae", help="local AutoencoderKL directory (config.json + weights)")
    parser.add_argument("--image-size", type=int, help="center crop + resize to this size (vae default 256)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="identity: image channels (digits 1, else 3)")
    parser.add_argument("--flip", action="store_true", help="add a horizontally flipped copy of every image")
    parser.add_argument("--latent-sample", choices=("mean", "sample"), default="mean",
                        help="vae: store the posterior mean or a seeded sample")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch size")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (GPUs are shared round-robin)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampled latents and synthetic data")
    parser.add_argument("--num-samples", type=int, help="synthetic: how many; others: use only the first N items")
    parser.add_argument("--num-classes", type=int, default=10, help="synthetic and shards: number of classes")
    parser.add_argument("--latent-shape", default="4,32,32", help="synthetic: C,H,W")
    parser.add_argument("--image-key", default="image", help="hf/parquet image column")
    parser.add_argument("--label-key", default="label", help="hf/parquet label column")
    parser.add_argument("--captions", action="store_true",
                        help="store captions and their text-encoder features (implied by --text-encoder); "
                             "digits without --text-encoder: a tiny random stand-in encoder")
    parser.add_argument("--text-encoder", metavar="DIR",
                        help="local transformers CLIP text model or T5 encoder directory (with its tokenizer); "
                             "random:WIDTH: random features per caption, no model (benchmarks)")
    parser.add_argument("--text-max-length", type=int, help="tokens per caption, padded or cut (default: clip 77, t5 and random 120)")
    parser.add_argument("--caption-column", default="caption", help="hf/parquet caption column")
    parser.add_argument("--caption-key", default="caption",
                        help="webdataset: key of the caption in KEY.json (when a sample has no KEY.txt)")
    parser.add_argument("--repa-encoder", metavar="DIR",
                        help="store REPA patch features (field repa): a local transformers DINOv2 directory "
                             "(Dinov2Model), or random:WIDTH, a fixed random map of pooled pixels (no model)")
    parser.add_argument("--repa-grid", type=int,
                        help="the model's token grid G the features are resampled to, N = G*G tokens "
                             "(default: latent H // 2, the DiT's patch size 2; pass H // patch_size otherwise)")
    parser.add_argument("--repa-image-size", type=int, default=224,
                        help="REPA encoder input size, a multiple of its patch size (default 224, DINOv2's)")
    parser.add_argument("--scaling-factor", type=float, default=1.0, help="shards: scaling factor to record")
    parser.add_argument("--shift-factor", type=float, default=0.0, help="shards: shift factor to record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace) -> PrepareSpec:
    try:
        shape = tuple(int(x) for x in args.latent_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise MoeditError(f"--latent-shape {args.latent_shape!r}: give C,H,W, e.g. 4,32,32")
    for name in ("shard_size", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise MoeditError(f"--{name.replace('_', '-')} {getattr(args, name)}: use 1 or more")
    captions = bool(args.captions or args.text_encoder)
    if args.text_max_length is not None and args.text_max_length < 1:
        raise MoeditError(f"--text-max-length {args.text_max_length}: use 1 or more")
    if args.repa_grid is not None and args.repa_grid < 1:
        raise MoeditError(f"--repa-grid {args.repa_grid}: the model's token grid must be 1 or more")
    if args.repa_image_size < 1:
        raise MoeditError(f"--repa-image-size {args.repa_image_size}: use 1 or more")
    source = SourceSpec(kind=args.source, input=args.input, image_key=args.image_key, label_key=args.label_key,
                        num_samples=args.num_samples, num_classes=args.num_classes, latent_shape=shape, seed=args.seed,
                        captions=captions, caption_column=args.caption_column, caption_key=args.caption_key)
    if args.source != "synthetic" and args.source != "digits" and not args.input:
        raise MoeditError(f"--source {args.source} needs --input PATH")
    image_size = args.image_size or (256 if args.encoder == "vae" else None)
    channels = args.channels or (1 if args.source == "digits" else 3)
    return PrepareSpec(source=source, encoder=args.encoder, vae=args.vae, image_size=image_size, channels=channels,
                       flip=args.flip, latent_sample=args.latent_sample, dtype=args.dtype,
                       shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                       text_encoder=args.text_encoder, text_max_length=args.text_max_length,
                       repa_encoder=args.repa_encoder, repa_grid=args.repa_grid, repa_image_size=args.repa_image_size)


# ---- per-process encoding ----------------------------------------------------------------
_PROCESS: dict[str, Any] = {}


def _init_process(spec: PrepareSpec, device_queue: Any, text_encoder: Any = None, repa_encoder: Any = None) -> None:
    device = device_queue.get() if device_queue is not None else "cpu"
    if device_queue is not None and device == "cpu":
        import torch

        # Several encoding processes share the CPU: one thread each avoids oversubscription.
        torch.set_num_threads(1)
    _PROCESS.clear()
    _PROCESS.update(source=open_source(spec.source), device=device, spec=spec, text=text_encoder, repa=repa_encoder)
    if spec.source.captions and text_encoder is None:
        from moedit.data.text import load_text_encoder

        _PROCESS["text"] = load_text_encoder(spec.text_encoder, device)
    if spec.repa_encoder and repa_encoder is None:
        from moedit.data.repa import load_repa_encoder

        _PROCESS["repa"] = load_repa_encoder(spec.repa_encoder, spec.repa_grid, spec.repa_image_size, device)
    if spec.source.kind == "synthetic":
        _PROCESS["encoder"] = None
    elif spec.encoder == "vae":
        from moedit.data.encoders import VAEEncoder

        _PROCESS["encoder"] = VAEEncoder(spec.vae, spec.image_size, spec.latent_sample == "sample", device)
    else:
        from moedit.data.encoders import IdentityEncoder

        _PROCESS["encoder"] = IdentityEncoder(spec.image_size, spec.channels)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _encode_shard(task: tuple[int, int, int, str]) -> dict[str, Any]:
    """Encode samples [lo, hi) into shard `index`; returns its ShardInfo fields."""
    index, lo, hi, output = task
    spec, source, encoder, text = _PROCESS["spec"], _PROCESS["source"], _PROCESS["encoder"], _PROCESS["text"]
    copies = 2 if spec.flip else 1
    samples: list[tuple[str, dict[str, bytes]]] = []
    for start in range(lo, hi, spec.batch_size):
        ids = list(range(start, min(start + spec.batch_size, hi)))
        items = [source.get(i // copies) for i in ids]
        flips = [i % copies == 1 for i in ids]
        if encoder is None:
            latents = np.stack([img for img, _ in items])  # synthetic: already latents
        else:
            # One seed per encoder batch, fixed by position: reruns and any process count agree.
            latents = encoder.encode([img for img, _ in items], flips, seed=spec.seed * 1_000_003 + start)
        extras = _text_members([i // copies for i in ids], source, text, spec) if text is not None else [{} for _ in ids]
        if _PROCESS["repa"] is not None:
            for extra, member in zip(extras, _repa_members(items, flips, latents, spec)):
                extra.update(member)
        for n, (i, latent, (_, label)) in enumerate(zip(ids, latents.astype(spec.dtype), items)):
            key = f"{i // copies:09d}" + ("_flip" if i % copies else "")
            samples.append((key, {"npy": npy_bytes(latent), "cls": str(label).encode(), **extras[n]}))
    path = os.path.join(output, shard_name(index))
    write_tar(path, samples)
    record = {"name": shard_name(index), "num_samples": hi - lo, "sha256": file_sha256(path),
              "size_bytes": os.path.getsize(path), "latent_shape": list(latents.shape[1:])}
    _write_json(os.path.join(output, PROGRESS_DIR, shard_name(index) + ".json"), record)
    return record


def _text_members(items: list[int], source: Any, text: Any, spec: PrepareSpec) -> list[dict[str, bytes]]:
    """The caption members of a batch of source items: KEY.txt, KEY.text.npy, KEY.text_mask.npy."""
    captions = [source.caption(i) for i in items]
    features, mask = text.encode(captions, spec.text_max_length, batch_size=spec.batch_size)  # (b, L, D), (b, L)
    limit = float(np.finfo(np.float16).max)  # stored as float16: clamp rather than overflow to inf
    features = features.clamp(-limit, limit).numpy().astype(np.float16)
    mask = mask.numpy().astype(bool)
    return [{"txt": caption.encode("utf-8"), "text.npy": npy_bytes(f), "text_mask.npy": npy_bytes(m)}
            for caption, f, m in zip(captions, features, mask)]


def _repa_members(items: list, flips: list[bool], latents: np.ndarray, spec: PrepareSpec) -> list[dict[str, bytes]]:
    """KEY.repa.npy of a batch: the REPA encoder's features of each image as the latent sees it
    (center-cropped to --image-size, flipped for the flipped copy); synthetic: of the latent."""
    if spec.source.kind == "synthetic" or spec.encoder == "identity":
        images = list(latents)  # (C, H, W): the pixels in [-1, 1] (identity), or the synthetic latent itself
    else:
        from moedit.data.encoders import to_array

        images = [to_array(img, spec.image_size, 3) for img, _ in items]
        images = [a[:, :, ::-1] if flip else a for a, flip in zip(images, flips)]
    features = _PROCESS["repa"].encode(images)  # (b, N, C)
    limit = float(np.finfo(np.float16).max)  # stored as float16: clamp rather than overflow to inf
    features = features.clamp(-limit, limit).numpy().astype(np.float16)
    return [{"repa.npy": npy_bytes(f)} for f in features]


def text_fields(text_encoder: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's `fields` for shards with captions made by `text_encoder` (its record)."""
    length, width = text_encoder["max_length"], text_encoder["width"]
    return {"text": {"dtype": "float16", "shape": [length, width]}, "text_mask": {"dtype": "bool", "shape": [length]},
            "txt": {"dtype": "str", "shape": []}}


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _finished(output: str, index: int) -> dict[str, Any] | None:
    """The progress record of a shard whose file still matches its checksum, else None."""
    record_path = os.path.join(output, PROGRESS_DIR, shard_name(index) + ".json")
    path = os.path.join(output, shard_name(index))
    if not (os.path.isfile(record_path) and os.path.isfile(path)):
        return None
    with open(record_path) as f:
        record = json.load(f)
    return record if file_sha256(path) == record["sha256"] else None


def _devices(workers: int) -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{w % torch.cuda.device_count()}" for w in range(workers)]
    return ["cpu"] * workers


def _start_output(output: str, fingerprint: str) -> None:
    """Create the output dir; refuse one prepared with other settings; clear half-written files."""
    os.makedirs(os.path.join(output, PROGRESS_DIR), exist_ok=True)
    stamp = os.path.join(output, PROGRESS_DIR, "fingerprint")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            previous = f.read().strip()
        if previous != fingerprint:
            raise MoeditError(f"{output} holds shards prepared with other settings (fingerprint {previous}, "
                              f"now {fingerprint}): choose a new --output or delete it")
    elif glob.glob(os.path.join(output, "*.tar")):
        raise MoeditError(f"{output} already holds shards not made by this preparation: choose a new --output")
    else:
        with open(stamp, "w") as f:
            f.write(fingerprint + "\n")
    for stale in glob.glob(os.path.join(output, "*.tmp-*")) + glob.glob(os.path.join(output, PROGRESS_DIR, "*.tmp-*")):
        os.remove(stale)  # left by a killed run; atomic renames mean no finished file is partial


def _run_tasks(spec: PrepareSpec, tasks: list, workers: int, progress: bool,
               text_encoder: Any = None, repa_encoder: Any = None) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="shard", desc="prepare", disable=not progress or not tasks)
    results = []
    if workers == 1 or len(tasks) <= 1:
        _init_process(spec, None, text_encoder, repa_encoder)
        for task in tasks:
            results.append(_encode_shard(task))
            bar.update()
    else:
        devices = _devices(workers)
        # CUDA cannot be re-initialised in a forked child.
        context = multiprocessing.get_context("spawn" if devices[0] != "cpu" else "fork")
        queue = context.Queue()
        for device in devices:
            queue.put(device)
        with context.Pool(workers, initializer=_init_process, initargs=(spec, queue)) as pool:
            for record in pool.imap_unordered(_encode_shard, tasks):
                results.append(record)
                bar.update()
    bar.close()
    return results


def prepare(spec: PrepareSpec, output: str, workers: int = 1, progress: bool = True) -> Manifest:
    """Encode (or finish encoding) a dataset into `output`; returns the written manifest."""
    fingerprint = spec.fingerprint()
    source = open_source(spec.source)  # bad inputs (a missing caption too) fail here, before any process starts
    encoder_fields = _encoder_fields(spec)
    text_encoder, spec = _text_encoder(spec, output)
    repa_encoder, spec = _repa_encoder(spec, source, encoder_fields, output)
    _start_output(output, fingerprint)
    if text_encoder is not None:
        _write_json(os.path.join(output, PROGRESS_DIR, TEXT_ENCODER_RECORD),
                    text_encoder.manifest_entry(spec.text_max_length))
    if repa_encoder is not None:
        _write_json(os.path.join(output, PROGRESS_DIR, REPA_ENCODER_RECORD), repa_encoder.manifest_entry())
    copies = 2 if spec.flip else 1
    items = len(source) if spec.source.num_samples is None else min(len(source), spec.source.num_samples)
    total = items * copies
    num_shards = math.ceil(total / spec.shard_size)
    done = {i: r for i in range(num_shards) if (r := _finished(output, i)) is not None}
    tasks = [(i, i * spec.shard_size, min((i + 1) * spec.shard_size, total), output)
             for i in range(num_shards) if i not in done]
    for record in _run_tasks(spec, tasks, workers, progress, text_encoder if workers == 1 else None,
                             repa_encoder if workers == 1 else None):
        done[int(record["name"][6:12])] = record
    records = [done[i] for i in range(num_shards)]
    manifest = Manifest(
        latent_shape=records[0]["latent_shape"], latent_dtype=spec.dtype,
        num_classes=len(source.class_names), class_names=list(source.class_names),
        shards=[ShardInfo(r["name"], r["num_samples"], r["sha256"], r["size_bytes"]) for r in records],
        samples_per_shard=spec.shard_size, source={**dataclasses.asdict(spec.source), "items": items, "flip": spec.flip},
        fingerprint=fingerprint, **encoder_fields,
    )
    if text_encoder is not None:
        manifest.text_encoder = text_encoder.manifest_entry(spec.text_max_length)
        manifest.fields = text_fields(manifest.text_encoder)
    if repa_encoder is not None:
        from moedit.data.repa import repa_field

        manifest.repa_encoder = repa_encoder.manifest_entry()
        manifest.fields = {**manifest.fields, **repa_field(manifest.repa_encoder)}
    write_manifest(manifest, output)
    return load_manifest(output)


def _text_encoder(spec: PrepareSpec, output: str) -> tuple[Any, PrepareSpec]:
    """The loaded text encoder of a preparation with captions (None without), and the spec with
    its directory and max length resolved. Captions of the built-in digits without --text-encoder
    use the tiny random stand-in, written to OUTPUT/text_encoder. The feature width is checked
    against shards already in `output` before the weights load."""
    if not spec.source.captions:
        return None, spec
    from moedit.data.text import default_max_length, load_text_encoder, make_tiny_text_encoder, read_encoder_config

    path = spec.text_encoder
    if path is None and spec.source.kind == "digits":
        path = make_tiny_text_encoder(os.path.join(output, STAND_IN_DIR))
    kind, width, _ = read_encoder_config(path)  # no path: the error says to pass --text-encoder DIR
    spec = dataclasses.replace(spec, text_encoder=path, text_max_length=spec.text_max_length or default_max_length(kind))
    _check_text_width(output, {"path": path if kind == "random" else os.path.abspath(path), "type": kind,
                               "width": width, "max_length": spec.text_max_length})
    return load_text_encoder(path), spec


def _check_text_width(output: str, entry: dict[str, Any]) -> None:
    """Resuming into an output whose shards hold features of another width is an error (the
    fingerprint covers the encoder's path, not what the directory holds now)."""
    for path, previous in ((os.path.join(output, MANIFEST_NAME), "text_encoder"),
                           (os.path.join(output, PROGRESS_DIR, TEXT_ENCODER_RECORD), None)):
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            record = json.load(f)
        record = record.get(previous) if previous else record
        if record and (record.get("width"), record.get("max_length")) != (entry["width"], entry["max_length"]):
            raise MoeditError(
                f"{output} holds text features {record.get('max_length')} x {record.get('width')} (text encoder "
                f"{record.get('path')}), but text encoder {entry['path']} gives {entry['max_length']} x "
                f"{entry['width']}: use the encoder and --text-max-length the shards were made with, or a new --output")


def _repa_encoder(spec: PrepareSpec, source: Any, encoder_fields: dict[str, Any],
                  output: str) -> tuple[Any, PrepareSpec]:
    """The loaded REPA encoder (None without --repa-encoder) and the spec with its grid resolved:
    --repa-grid, else the latent's H // 2 (the DiT's patch size 2). Width and grid are checked
    against features already in `output` before the weights load."""
    if not spec.repa_encoder:
        return None, spec
    from moedit.data.repa import check_grid, check_stored_shape, load_repa_encoder, read_repa_config

    kind, width, _ = read_repa_config(spec.repa_encoder)
    if kind == "dinov2" and spec.source.kind == "synthetic":
        raise MoeditError("--source synthetic holds latents, not images: a DINOv2 cannot encode them; use "
                          "--repa-encoder random:WIDTH for synthetic data")
    grid = spec.repa_grid
    if grid is None:
        grid = _latent_height(spec, source, encoder_fields) // 2
        if grid < 1:
            raise MoeditError("the latents are 1 pixel high: no default REPA grid (H // 2); pass --repa-grid")
    spec = dataclasses.replace(spec, repa_grid=check_grid(grid))
    path = spec.repa_encoder if kind == "random" else os.path.abspath(spec.repa_encoder)
    check_stored_shape(output, [os.path.join(output, MANIFEST_NAME), os.path.join(output, PROGRESS_DIR, REPA_ENCODER_RECORD)],
                       {"path": path, "width": width, "grid": grid})
    return load_repa_encoder(spec.repa_encoder, grid, spec.repa_image_size), spec


def _latent_height(spec: PrepareSpec, source: Any, encoder_fields: dict[str, Any]) -> int:
    """H of the stored latents, known before encoding."""
    if spec.source.kind == "synthetic":
        return spec.source.latent_shape[1]
    if spec.encoder == "vae":
        return spec.image_size // encoder_fields["encoder"]["downsample"]
    if spec.image_size is not None:
        return spec.image_size
    from moedit.data.encoders import to_array

    return to_array(source.get(0)[0], None, spec.channels).shape[1]


def _encoder_fields(spec: PrepareSpec) -> dict[str, Any]:
    if spec.source.kind == "synthetic":
        return {"encoder": {"type": "none"}, "scaling_factor": 1.0, "shift_factor": 0.0}
    if spec.encoder == "vae":
        from moedit.data.encoders import VAEEncoder

        return VAEEncoder(spec.vae, spec.image_size, spec.latent_sample == "sample").manifest_fields()
    from moedit.data.encoders import IdentityEncoder

    return IdentityEncoder(spec.image_size, spec.channels).manifest_fields()


def prepare_builtin(source: str, path: str | os.PathLike, *, image_size: int | None = None,
                    num_samples: int = 4096, latent_shape: tuple[int, int, int] = (4, 16, 16),
                    progress: bool = True) -> Manifest:
    """Prepare a built-in dataset into `path` (used when a config sets data.prepare).

    digits: all 1,797 images, 1 channel, pixel space, float32, 100 per shard (18 shards), optionally
    resized to image_size. digits_text: the same with captions made from the labels
    (moedit.data.text.digit_caption), encoded by the tiny random stand-in text encoder written to
    `path/text_encoder`, 16 tokens per caption. digits_repa: digits with REPA features `repa` from
    `random:32` on the 8 x 8 grid (N = 64 tokens: the quickstart's patch 1 on the native 8x8 digits,
    or patch 2 on digits resized to 16). synthetic: `num_samples` latents of `latent_shape`, 10 classes, float16,
    256 per shard.
    """
    if source == "digits":
        spec = PrepareSpec(SourceSpec("digits"), image_size=image_size, channels=1, dtype="float32", shard_size=100)
    elif source == "digits_text":
        spec = PrepareSpec(SourceSpec("digits", captions=True), image_size=image_size, channels=1, dtype="float32",
                           shard_size=100, text_max_length=BUILTIN_TEXT_MAX_LENGTH)
    elif source == "digits_repa":
        spec = PrepareSpec(SourceSpec("digits"), image_size=image_size, channels=1, dtype="float32", shard_size=100,
                           repa_encoder=BUILTIN_REPA_ENCODER, repa_grid=BUILTIN_REPA_GRID)
    elif source == "synthetic":
        spec = PrepareSpec(SourceSpec("synthetic", num_samples=num_samples, latent_shape=tuple(latent_shape)),
                           dtype="float16", shard_size=256)
    else:
        raise MoeditError(f"built-in dataset {source!r}: use digits, digits_text, digits_repa or synthetic")
    return prepare(spec, str(path), progress=progress)


def main(args: argparse.Namespace) -> int:
    if args.source == "shards":
        from moedit.data.index import index_shards

        manifest = index_shards(args.output, num_classes=args.num_classes, scaling_factor=args.scaling_factor,
                                shift_factor=args.shift_factor)
    else:
        manifest = prepare(spec_from_args(args), args.output, workers=args.workers, progress=not args.no_progress)
    text = ""
    if manifest.text_encoder:
        encoder = manifest.text_encoder
        origin = encoder["path"] or "an unknown encoder: `moedit sample --prompt` needs --text-encoder DIR"
        text = (f", captions with {encoder['type']} text features {encoder['max_length']} x {encoder['width']} "
                f"(from {origin})")
    if manifest.repa_encoder:
        repa = manifest.repa_encoder
        text += (f", REPA features {repa['grid'] ** 2} x {repa['width']} on a {repa['grid']} x {repa['grid']} grid "
                 f"(from {repa['path'] or 'an unknown encoder'})")
    described = ({"text", "text_mask", "txt"} if manifest.text_encoder else set()) | \
        ({"repa"} if manifest.repa_encoder else set())
    other = sorted(set(manifest.fields) - described)
    if other:
        text += f", fields {', '.join(other)}"
    print(f"wrote {len(manifest.shards)} shards, {manifest.num_samples} samples of latent shape "
          f"{manifest.latent_shape} ({manifest.latent_dtype}){text} and {os.path.join(args.output, MANIFEST_NAME)}")
    return 0
