"""REPA in the trainer: the model's repa_* fields from `train.repa` and the data's feature width.

The model side (projector, the `repa` term, the inference strip) is moedit/models/repa.py; the
trainer hands each micro-batch's features to the model as `repa_target` (trainer.py).
"""

from __future__ import annotations

import dataclasses

from moedit.errors import MoeditError
from moedit.models.repa import without_repa


def configure_repa(cfg) -> None:
    """Set `cfg.model`'s REPA fields: a projector after block train.repa.depth to the width C of the
    shards' feature field, weight train.repa.coef; none when train.repa is off."""
    repa, m = cfg.train.repa, cfg.model
    if not repa.enabled:
        cfg.model = without_repa(m)
        return
    width = encoder_width(cfg) if repa.encoder else feature_width(cfg)
    if m.repa_dim and m.repa_dim != width:
        raise MoeditError(f"the shards' {repa.field!r} features are {width} wide, but model.repa_dim = {m.repa_dim} "
                          f"(this run's projector maps to {m.repa_dim}); train on the features it was trained with, "
                          f"or start a new train.run_dir with model.repa_dim={width}")
    cfg.model = dataclasses.replace(m, repa_depth=repa.depth, repa_dim=width, repa_hidden=repa.projector_hidden,
                                    repa_coef=float(repa.coef))


def feature_width(cfg) -> int:
    """C of the shards' REPA field (T, C), from dataset.json; named errors for a missing field or a
    token count other than the model's."""
    from moedit.data import load_manifest
    from moedit.data.manifest import manifest_path

    field, m = cfg.train.repa.field, cfg.model
    path = manifest_path(cfg.data)
    manifest = load_manifest(path)
    if field not in manifest.fields:
        stored = ", ".join(sorted(manifest.fields)) or "none"
        raise MoeditError(f"train.repa.enabled = true: {path} lists no per-sample field {field!r} (stored fields: "
                          f"{stored}); prepare encoder features with `moedit prepare ... --repa-encoder DIR` "
                          "(docs/training.md, REPA), or set train.repa.field to the field that holds them")
    _, shape = manifest.field_spec(field)
    if len(shape) != 2 or shape[0] != m.num_tokens:
        raise MoeditError(f"train.repa: the shards' {field!r} features have per-sample shape {list(shape)}; REPA "
                          f"needs (T, C) with T = {m.num_tokens}, the model's tokens ((input_size / patch_size)^2 "
                          f"= ({m.input_size} / {m.patch_size})^2), in its token order")
    return int(shape[1])


def encoder_width(cfg) -> int:
    """C of the features `train.repa.encoder` computes during training (read from its config, or
    the WIDTH of random:WIDTH); a named error unless the shards hold pixels (identity encoder)."""
    from moedit.data import load_manifest
    from moedit.data.manifest import manifest_path
    from moedit.data.repa import RandomPatchFeatures, read_repa_config

    repa, path = cfg.train.repa, manifest_path(cfg.data)
    kind = load_manifest(path).encoder.get("type")
    if kind != "identity":
        raise MoeditError(f"train.repa.encoder = {repa.encoder}: features are computed from pixels during training, "
                          f"but {path} holds latents (encoder type {kind}), not pixels; prepare the features with `moedit prepare ... "
                          f"--repa-encoder DIR` and leave train.repa.encoder unset")
    if str(repa.encoder).startswith("random:"):
        return RandomPatchFeatures.parse_width(str(repa.encoder))
    return read_repa_config(repa.encoder)[1]


def pixel_encoder(cfg, device):
    """The frozen encoder of `train.repa.encoder` on the model's token grid (None without one); its
    `encode(images)` takes a list of (C, H, W) arrays in [-1, 1] and returns (B, T, C) float32."""
    from moedit.data.repa import load_repa_encoder

    repa, m = cfg.train.repa, cfg.model
    if not (repa.enabled and repa.encoder):
        return None
    return load_repa_encoder(repa.encoder, m.input_size // m.patch_size, repa.image_size, device=str(device))
