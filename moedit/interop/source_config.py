"""What a source checkpoint says about itself: the architecture its training run saved, and how
its authors sampled from it.

Attention heads leave no trace in a state dict (qkv is (3D, D) for any head count), so a wrong
head count converts without error into a different model. The official training scripts save
their arguments beside the weights: facebookresearch/DiT's train.py an `argparse.Namespace` with
`model="DiT-XL/2"` and `image_size`; KwaiVGI/DiffMoE's train.py one with `config=<yaml path>`,
the YAML being copied into the experiment directory (`<exp>/config_<time>.yaml`, the checkpoint
in `<exp>/checkpoints/`). `saved_architecture` reads whichever is there; `check_architecture`
refuses a model config that contradicts it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from moedit.errors import MoeditError
from moedit.models import FLAVORS, ModelConfig, get_flavor, override

_DDPM_AS_DIT = {"sampler": "ddpm", "sample_steps": 250, "cfg_scale": 1.5, "guidance_channels": 3,
                "cfg_batching": "joint"}
SAMPLING_DEFAULTS: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("dit", "ddpm"): (_DDPM_AS_DIT, "facebookresearch/DiT sample_ddp.py: DDPM ancestral, 250 steps, cfg 1.5 "
                      "(FID 2.27); forward_with_cfg: one 2B forward, guidance on the first 3 channels"),
    ("diffmoe", "flow"): ({"sampler": "euler", "sample_steps": 250, "cfg_scale": 1.5, "guidance_channels": None,
                           "cfg_batching": "separate"},
                          "KwaiVGI/DiffMoE sample_ddp_feature.py (250 steps, cfg 1.5) with RectifiedFlow.sample: "
                          "Euler, conditional and unconditional velocity as two forwards, guidance on all channels"),
    ("diffmoe", "ddpm"): (_DDPM_AS_DIT, "KwaiVGI/DiffMoE sample_ddp_feature.py (250 steps, cfg 1.5) with "
                          "p_sample_loop and forward_with_cfg: one 2B forward, guidance on the first 3 channels"),
    ("ditmoe", "ddpm"): (_DDPM_AS_DIT, "feizc/DiT-MoE sample_ddp.py (250 steps, cfg 1.5) with forward_with_cfg: "
                         "one 2B forward, guidance on the first 3 channels"),
    ("ditmoe", "flow"): ({"sampler": "euler", "sample_steps": 50, "cfg_scale": 7.0, "guidance_channels": None,
                          "cfg_batching": "separate"},
                         "feizc/DiT-MoE sample.py (rectified flow): Euler, 50 steps, cfg 7.0, two forwards, "
                         "guidance on all channels"),
    ("diffusers", "ddpm"): ({"sample_steps": 50, "cfg_scale": 4.0, "guidance_channels": None,
                             "cfg_batching": "joint"},
                            "diffusers DiTPipeline defaults: 50 steps, guidance 4.0 on all latent channels, one 2B "
                            "forward (its scheduler is not part of a transformer directory: moedit's ddpm)"),
}
"""(layout, objective) -> (diffusion fields, where they come from)."""


def sampling_defaults(layout: str, objective: str) -> tuple[dict[str, Any], str]:
    """The source authors' sampling settings for a converted checkpoint's `diffusion` section."""
    values, source = SAMPLING_DEFAULTS.get((layout, objective), ({}, ""))
    return dict(values), source or f"none published for --from {layout} with {objective}: moedit's defaults"


# ----- the architecture a training run saved ---------------------------------------------------

_PARAMS = {  # official DiT / DiffMoE constructor argument -> moedit model field
    "input_size": "input_size", "patch_size": "patch_size", "depth": "depth", "hidden_size": "hidden_size",
    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "num_classes": "num_classes",
}
_MOE_PARAMS = {"num_experts": "moe.num_experts", "capacity": "moe.capacity", "n_shared_experts": "moe.num_shared_experts"}


def _as_dict(obj: Any) -> dict | None:
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return obj if isinstance(obj, dict) else None


def _from_model_params(params: dict) -> dict[str, Any]:
    """Fields from an official model `params` mapping (the YAML's model.params)."""
    fields = {field: params[key] for key, field in _PARAMS.items() if params.get(key) is not None}
    if "use_swiglu" in params:
        fields["ffn_type"] = "swiglu" if params["use_swiglu"] else "gelu"
    moe = _as_dict(params.get("MoE_config")) or {}
    fields.update({field: moe[key] for key, field in _MOE_PARAMS.items() if moe.get(key) is not None})
    if "interleave" in moe:  # official: interleave -> MoE in odd blocks, else in every block
        fields.update({"moe.every": 2, "moe.first": 1} if moe["interleave"] else {"moe.every": 1, "moe.first": 0})
    return fields


def _config_files(config: str, checkpoint: Path) -> list[Path]:
    """Where the YAML named by DiffMoE's saved `args.config` may be: the path itself, then the copy
    train.py writes into the experiment directory (the checkpoint's grandparent)."""
    named = Path(config)
    found = [named] if named.is_file() else []
    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints":  # the newest copy (config_<time>.yaml) in the experiment directory
        found += sorted(folder.parent.glob("config*.yaml"))[-1:]
    return found


def saved_architecture(args: Any, checkpoint: str | Path) -> tuple[dict[str, Any], str | None, str]:
    """(model fields as dotted overrides, the objective or None, where they were found) from the
    `args` a training checkpoint holds; ({}, None, why not) when it states nothing usable."""
    import yaml

    checkpoint = Path(checkpoint)
    data = _as_dict(args)
    if data is None:
        return {}, None, "the checkpoint holds no training arguments"
    model = data.get("model")
    if isinstance(model, str) and model in FLAVORS and model.startswith("DiT-") and "MoE" not in model:
        flavor = get_flavor(model)  # DiT's train.py: --model DiT-XL/2, --image-size 256
        fields = {"depth": flavor.depth, "hidden_size": flavor.hidden_size, "num_heads": flavor.num_heads,
                  "patch_size": flavor.patch_size}
        if data.get("image_size"):
            fields["input_size"] = int(data["image_size"]) // 8
        if data.get("num_classes") is not None:
            fields["num_classes"] = int(data["num_classes"])
        return fields, None, f"saved args model={model!r}"
    if _as_dict(model) is not None:  # a whole config saved as args
        params = _as_dict(_as_dict(model).get("params")) or _as_dict(model)
        return _from_model_params(params), _objective(data), "saved args model.params"
    if any(key in data for key in _PARAMS):
        return _from_model_params(data), None, "saved args"
    if isinstance(data.get("config"), str):
        unreadable = []
        for path in _config_files(data["config"], checkpoint):
            try:
                loaded = yaml.safe_load(path.read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                unreadable.append(f"{path} ({type(exc).__name__})")
                continue
            model_section = _as_dict(loaded.get("model")) if isinstance(loaded, dict) else None
            params = _as_dict((model_section or {}).get("params"))
            if params:
                return _from_model_params(params), _objective(loaded), f"saved args config -> {path}"
            unreadable.append(f"{path} (no model.params)")
        return {}, None, (f"saved args name config {data['config']!r}: "
                          + (f"unusable {', '.join(unreadable)}" if unreadable else
                             "found neither there nor as config*.yaml beside the checkpoints/ folder"))
    return {}, None, "the saved training arguments state no architecture"


def _objective(config: dict) -> str | None:
    basic = _as_dict(config.get("basic")) or {}
    return None if "rf" not in basic else ("flow" if basic["rf"] else "ddpm")


def _matching_flavor(model: ModelConfig) -> str | None:
    for name, flavor in FLAVORS.items():
        if dataclasses.replace(flavor, name=model.name, learn_sigma=model.learn_sigma) == model:
            return name
    return None


def _value(model: ModelConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    target = model.moe if section == "moe" else model
    return None if target is None else getattr(target, name)


def check_architecture(model: ModelConfig, flavor: str, saved: dict[str, Any], where: str, source: str) -> None:
    """MoeditError naming each field where `model` contradicts the saved training config, the
    `--set` that fixes it and the registry flavor that matches, if any."""
    saved = {k: v for k, v in saved.items() if not (k.startswith("moe.") and model.moe is None)}
    wrong = {key: value for key, value in saved.items() if _value(model, key) != value}
    if not wrong:
        return
    def key(k: str) -> str:
        return k if "." in k else f"model.{k}"

    says = ", ".join(f"{key(k)} = {v}" for k, v in wrong.items())
    has = ", ".join(f"{key(k)} = {_value(model, k)}" for k in wrong) if len(wrong) > 1 else f"{_value(model, *wrong)}"
    sets = " ".join(f"{key(k)}={v}" for k, v in wrong.items())
    try:
        match = _matching_flavor(override(model, saved))
    except ValueError:
        match = None
    hint = f", or --flavor {match} (it matches the saved config)" if match and match != flavor else ""
    heads = " Heads leave no trace in the weights, so this would convert silently into a different model." \
        if "num_heads" in wrong else ""
    raise MoeditError(f"{source}: its training config ({where}) says {says}, but the model from --flavor {flavor} "
                      f"(after any --config/--set) has {has}.{heads} Pass --set {sets}{hint}")
