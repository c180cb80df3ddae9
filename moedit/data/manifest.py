"""`dataset.json`, the manifest beside the shards, and shard-list resolution."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from moedit.data.samples import FIELD_DTYPES, check_field_name
from moedit.errors import MoeditError

FORMAT_NAME = "moedit-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
LATENT_DTYPES = ("float16", "float32")
ENCODER_TYPES = ("identity", "autoencoderkl", "none")
# random: benchmark features, no model; unknown: features of shards indexed with --source shards (path None)
TEXT_ENCODER_TYPES = ("clip", "t5", "random", "unknown")
TEXT_ENCODER_KEYS = ("path", "type", "width", "max_length")
# random: a fixed random map of pooled pixels, no model; unknown: indexed with --source shards (path None)
REPA_ENCODER_TYPES = ("dinov2", "random", "unknown")
REPA_ENCODER_KEYS = ("path", "type", "width", "grid", "image_size")


@dataclass
class ShardInfo:
    """One shard as recorded in the manifest."""

    name: str
    """File name relative to the manifest's directory."""
    num_samples: int
    sha256: str
    size_bytes: int


@dataclass
class Manifest:
    """Mirror of dataset.json (see docs/data.md for every field)."""

    latent_shape: list[int]
    """(C, H, W) of every stored latent."""
    latent_dtype: str
    """float16 or float32: the dtype of the stored `.npy` arrays."""
    num_classes: int
    class_names: list[str]
    shards: list[ShardInfo]
    encoder: dict[str, Any] = field(default_factory=lambda: {"type": "identity"})
    """How latents were made: type identity | autoencoderkl | none, and its settings."""
    scaling_factor: float = 1.0
    """Model-space latents are (stored - shift_factor) * scaling_factor; the loader applies it."""
    shift_factor: float = 0.0
    samples_per_shard: int = 0
    num_samples: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    """Hash of the preparation settings; `moedit prepare` resumes only into a matching directory."""
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named per-sample fields stored beside the latent: name -> {"dtype", "shape"}; arrays are
    `KEY.<name>.npy`, dtype "str" is UTF-8 text `KEY.<name>` (text fields: `text` float16
    (max_length, width), `text_mask` bool (max_length,), `txt` the caption). Empty: none."""
    text_encoder: dict[str, Any] | None = None
    """The frozen text encoder that made the `text` field: {"path", "type" (clip | t5 | random |
    unknown), "width", "max_length"}; None when the shards hold no text features. Type unknown
    (path None): shards indexed with `--source shards`, whose encoder the shards cannot name."""
    repa_encoder: dict[str, Any] | None = None
    """The frozen vision encoder that made the `repa` field (float16 (grid^2, width) patch features
    on the model's token grid): {"path", "type" (dinov2 | random | unknown), "width", "grid",
    "image_size" (the encoder's input size; None for random and unknown)}; None when the shards hold
    no REPA features. Type unknown (path None): shards indexed with `--source shards`."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    root: str = ""
    """Directory the manifest was loaded from (not stored)."""

    def __post_init__(self) -> None:
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        self._by_name: dict[str, ShardInfo] = {}
        if not self.num_samples:
            self.num_samples = sum(s.num_samples for s in self.shards)

    def validate(self, where: str) -> None:
        if self.format != FORMAT_NAME:
            raise MoeditError(f"{where}: format {self.format!r} is not {FORMAT_NAME!r}")
        if self.format_version > FORMAT_VERSION:
            raise MoeditError(
                f"{where}: format_version {self.format_version} is newer than this moedit reads "
                f"({FORMAT_VERSION}); upgrade moedit"
            )
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1:
            raise MoeditError(f"{where}: latent_shape {self.latent_shape} must be [C, H, W] of positive sizes")
        if self.latent_dtype not in LATENT_DTYPES:
            raise MoeditError(f"{where}: latent_dtype {self.latent_dtype!r} must be one of {LATENT_DTYPES}")
        if self.num_classes < 1:
            raise MoeditError(f"{where}: num_classes {self.num_classes} must be at least 1")
        if self.scaling_factor == 0:
            raise MoeditError(f"{where}: scaling_factor must not be 0")
        if not self.shards:
            raise MoeditError(f"{where}: lists no shards")
        if self.num_samples != sum(s.num_samples for s in self.shards):
            raise MoeditError(f"{where}: num_samples {self.num_samples} != sum of per-shard counts")
        self._validate_fields(where)

    def _validate_fields(self, where: str) -> None:
        if not isinstance(self.fields, dict):
            raise MoeditError(f"{where}: fields must map field names to {{dtype, shape}}")
        for name, spec in self.fields.items():
            try:
                check_field_name(name, f"{where}: fields")
            except ValueError as exc:
                raise MoeditError(str(exc)) from None
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if not isinstance(spec, dict) or spec.get("dtype") not in FIELD_DTYPES or not isinstance(shape, list) \
                    or any(not isinstance(n, int) or n < 1 for n in shape):
                raise MoeditError(f"{where}: field {name!r} = {spec!r}: give {{\"dtype\": one of {FIELD_DTYPES}, "
                                  "\"shape\": [positive sizes]}")
        encoder = self.text_encoder
        if encoder is not None:
            if not isinstance(encoder, dict) or sorted(encoder) != sorted(TEXT_ENCODER_KEYS):
                raise MoeditError(f"{where}: text_encoder {encoder!r} must have exactly the keys {list(TEXT_ENCODER_KEYS)}")
            if encoder["type"] not in TEXT_ENCODER_TYPES:
                raise MoeditError(f"{where}: text_encoder type {encoder['type']!r} must be one of {TEXT_ENCODER_TYPES}")
            text = self.fields.get("text")
            if text is not None and text["shape"] != [encoder["max_length"], encoder["width"]]:
                raise MoeditError(f"{where}: field 'text' has shape {text['shape']}, but the text_encoder gives "
                                  f"[max_length, width] = [{encoder['max_length']}, {encoder['width']}]")

        self._validate_repa(where)

    def _validate_repa(self, where: str) -> None:
        encoder = self.repa_encoder
        if encoder is None:
            return
        if not isinstance(encoder, dict) or sorted(encoder) != sorted(REPA_ENCODER_KEYS):
            raise MoeditError(f"{where}: repa_encoder {encoder!r} must have exactly the keys {list(REPA_ENCODER_KEYS)}")
        if encoder["type"] not in REPA_ENCODER_TYPES:
            raise MoeditError(f"{where}: repa_encoder type {encoder['type']!r} must be one of {REPA_ENCODER_TYPES}")
        repa = self.fields.get("repa")
        if repa is not None and repa["shape"] != [encoder["grid"] ** 2, encoder["width"]]:
            raise MoeditError(f"{where}: field 'repa' has shape {repa['shape']}, but the repa_encoder gives "
                              f"[grid^2, width] = [{encoder['grid'] ** 2}, {encoder['width']}]")

    def field_spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of a stored field; a one-line MoeditError when the manifest lacks it."""
        spec = self.fields.get(name)
        if spec is None:
            stored = ", ".join(sorted(self.fields)) or "none"
            if name in ("text", "text_mask", "txt"):
                hint = "prepare the shards with captions (`moedit prepare ... --text-encoder DIR`, see docs/data.md)"
            elif name == "repa":
                hint = ("prepare the shards with REPA features (`moedit prepare ... --repa-encoder DIR`, or "
                        "data.prepare: digits_repa; see docs/data.md)")
            else:
                hint = "prepare shards that store it"
            raise MoeditError(f"{os.path.join(self.root, MANIFEST_NAME)} does not list field {name!r} that "
                              f"data.fields asks for (stored fields: {stored}): {hint}, or remove {name!r} "
                              "from data.fields")
        return spec["dtype"], tuple(spec["shape"])

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("root")
        # Latent-only datasets keep the manifest they always had (older readers take it unchanged).
        if not data["fields"]:
            data.pop("fields")
        for key in ("text_encoder", "repa_encoder"):
            if data[key] is None:
                data.pop(key)
        return data

    def shard(self, name: str) -> ShardInfo:
        """The manifest entry for a shard URL or path, matched by base name."""
        if len(self._by_name) != len(self.shards):
            self._by_name = {os.path.basename(s.name): s for s in self.shards}
        info = self._by_name.get(shard_basename(name))
        if info is not None:
            return info
        raise MoeditError(
            f"shard {name} is not listed in {os.path.join(self.root, MANIFEST_NAME)}; "
            "index the shards with `moedit prepare --source shards --output DIR`"
        )


def shard_basename(url: str) -> str:
    """The shard's file name in a path or a `pipe:` command (its last `.tar` word)."""
    if url.startswith("pipe:"):
        words = [w for w in re.split(r"[\s'\"]+", url[5:]) if w.endswith((".tar", ".tar.gz", ".tgz"))]
        url = words[-1] if words else url
    return os.path.basename(url)


def model_changes_for(manifest: Manifest, *, in_channels: int, input_size: int, num_classes: int) -> dict[str, Any]:
    """The `model.*` settings that a model needs to train on these shards and does not have:
    {"model.in_channels": C, "model.input_size": H, "model.num_classes": K}, each only where the
    model's value does not fit (a model with more classes than the shards fits; num_classes = 0,
    an unconditional model, ignores labels)."""
    c, h, w = manifest.latent_shape
    if h != w:
        raise MoeditError(f"{os.path.join(manifest.root, MANIFEST_NAME)}: latents are {h}x{w}; the DiT takes "
                          "square inputs only (model.input_size)")
    changes: dict[str, Any] = {}
    if in_channels != c:
        changes["model.in_channels"] = c
    if input_size != h:
        changes["model.input_size"] = h
    if num_classes and num_classes < manifest.num_classes:
        changes["model.num_classes"] = manifest.num_classes
    return changes


def load_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """Read `dataset.json` given a shard directory, the json's own path, or a data.path shard
    pattern (the manifest beside its first shard; `pipe:` URLs need the json path)."""
    shard_dir = os.fspath(shard_dir)
    if shard_dir.endswith(".json"):
        path = shard_dir
    elif shard_dir.startswith("pipe:"):
        raise MoeditError(f"{shard_dir!r}: for a pipe: URL give the path of dataset.json (data.manifest)")
    else:
        path = default_manifest_path(shard_dir)
    if not os.path.isfile(path):
        raise MoeditError(
            f"no manifest at {path}: prepare shards with `moedit prepare`, or index existing "
            "WebDataset shards with `moedit prepare --source shards --output DIR`"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise MoeditError(f"{path}: not valid JSON ({exc})") from None
    known = {f.name for f in dataclasses.fields(Manifest)} - {"root"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MoeditError(f"{path}: unknown fields {unknown} (written by a newer moedit?)")
    try:
        manifest = Manifest(**data, root=os.path.dirname(os.path.abspath(path)))
    except TypeError as exc:
        raise MoeditError(f"{path}: {exc}") from None
    manifest.validate(path)
    return manifest


def write_manifest(manifest: Manifest, shard_dir: str) -> str:
    """Write dataset.json atomically; returns its path."""
    path = os.path.join(shard_dir, MANIFEST_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a..b}` numeric ranges (zero padding kept) and `{x,y}` lists, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.group(1), span.group(2)
        width = len(lo) if lo.startswith("0") else 0
        values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        values = body.split(",")
    return [out for v in values for out in expand_braces(head + v + tail)]


def same_directory(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def directory_shards(manifest: Manifest, directory: str) -> tuple[list[str], list[str], list[str]]:
    """The shards of a directory that holds `manifest`: (paths of every shard the manifest lists,
    in file-name order; those of them missing from the directory; `*.tar` files in the directory
    that the manifest does not list). The manifest, not the directory listing, says what the
    dataset is, so a lost shard is noticed instead of silently shrinking the data."""
    listed = sorted(os.path.join(directory, s.name) for s in manifest.shards)
    missing = [p for p in listed if not os.path.isfile(p)]
    names = {os.path.normpath(s.name) for s in manifest.shards}
    extra = sorted(p for p in glob.glob(os.path.join(directory, "*.tar"))
                   if os.path.normpath(os.path.relpath(p, directory)) not in names)
    return listed, missing, extra


def resolve_shards(path: str, manifest: Manifest | None = None) -> list[str]:
    """Shard URLs for a directory, brace pattern, glob, `pipe:` URL or `::`-joined list of these.
    A directory that holds `manifest` gives the shards the manifest lists (see directory_shards);
    other directories give their `*.tar` files."""
    urls: list[str] = []
    for part in filter(None, path.split("::")):
        if part.startswith("pipe:") or "://" in part:
            urls.extend(expand_braces(part))
        elif os.path.isdir(part) and manifest is not None and same_directory(part, manifest.root):
            urls.extend(directory_shards(manifest, part)[0])
        elif os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise MoeditError(f"no *.tar shards in directory {part}")
            urls.extend(found)
        else:
            for expanded in expand_braces(part):
                matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
                missing = [m for m in matches if not os.path.isfile(m)]
                if missing or not matches:
                    raise MoeditError(f"shards not found: {missing[0] if missing else expanded} (data.path = {path!r}; "
                                      "prepare them with `moedit prepare --output DIR`)")
                urls.extend(matches)
    if not urls:
        raise MoeditError(f"data.path {path!r} names no shards")
    return urls


def manifest_path(data_cfg) -> str:
    """The dataset.json a `data` config section names: `data.manifest` if set, else the default
    beside `data.path`. Use it wherever a manifest is loaded from a config."""
    return data_cfg.manifest or default_manifest_path(data_cfg.path)


def default_manifest_path(path: str) -> str:
    """Where dataset.json is when data.manifest is not given."""
    first = path.split("::")[0]
    if os.path.isdir(first):
        return os.path.join(first, MANIFEST_NAME)
    return os.path.join(os.path.dirname(expand_braces(first)[0]), MANIFEST_NAME)
