"""`moedit upcycle`: a dense moedit checkpoint -> an MoE checkpoint (sparse upcycling).

Initialisation of each MoE layer (block i with `cfg.is_moe_block(i)`):
- every routed expert is a copy of block i's dense FFN; with `noise_std > 0` each expert weight
  matrix gets independent Gaussian noise of std `noise_std * std(dense matrix)` (biases are copied
  exactly), which breaks the symmetry between experts;
- the router is initialised as in a fresh moedit model: gate N(0, moe.gate_init_std^2) (nn.Linear's
  default when that is null), DiffMoE capacity predictor xavier-uniform with zero biases,
  DiffMoE thresholds 0 (as in the official code), aux-free biases 0;
- shared experts (if any): xavier-uniform input projections and a zero output projection, so they
  add exactly 0 at initialisation.

When the upcycled model equals the dense one: with noise 0 every expert computes the dense FFN
f(x), so an MoE layer outputs w_s * f(x_s), where w_s is the total combine weight token s gets
from the experts that took it. The model is the dense model (to float rounding) exactly when
w_s = 1 for every token:
- diffmoe: every expert takes every token, so w_s = sum of the softmax = 1. True at capacity C = E
  (`moe.capacity` in training, `inference_mode: static` with `inference_capacity` = E), and in
  `dynamic` inference right after upcycling: thresholds are 0 and sigmoid(.) > 0, so every token
  passes every expert's threshold. At the training capacity C = 1 it is not (w_s < 1, some 0).
- expert_choice: capacity = E.
- token_choice: `renormalize: true` (the top-k weights sum to 1) or top_k = E with softmax scores,
  and no dropped tokens. DiT-MoE's flavors (top-2 of 8, no renormalisation) give w_s = p1 + p2 < 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moedit.errors import MoeditError
from moedit.interop import layouts
from moedit.models import ModelConfig
from moedit.models.layers import build_dense_ffn
from moedit.models.routers import build_router

BACKBONE_FIELDS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                   "ffn_type", "num_classes", "learn_sigma", "qk_norm")
_PROJECTIONS = {"gelu": ("fc1", "fc2"), "swiglu": ("gate_proj", "up_proj", "down_proj")}


def check_upcycle(dense: ModelConfig, target: ModelConfig) -> None:
    if dense.moe is not None:
        raise MoeditError(f"source model {dense.name} already has MoE layers; upcycling starts from a dense model")
    if target.moe is None:
        raise MoeditError("target has no MoE layers: pass an MoE --flavor or moe.* overrides (e.g. moe.router=diffmoe)")
    diff = [f"{f}: dense {getattr(dense, f)!r}, target {getattr(target, f)!r}" for f in BACKBONE_FIELDS
            if getattr(dense, f) != getattr(target, f)]
    if diff:
        raise MoeditError("the target's backbone differs from the dense model's (" + "; ".join(diff) +
                          "); choose a matching flavor or override those fields")
    if target.moe.granularity != 1:
        raise MoeditError(f"moe.granularity = {target.moe.granularity}: upcycling copies the full dense FFN into "
                          "each expert, so it needs full-width experts (granularity 1)")


def _xavier_(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _new_layer_tensors(target: ModelConfig, block: int) -> dict[str, torch.Tensor]:
    """Router (and shared-expert) tensors of one MoE layer, named relative to `blocks.i.mlp`."""
    D = target.hidden_size
    router = build_router(target.moe, D)
    for name, module in router.named_modules():
        if isinstance(module, nn.Linear) and name != "gate":
            _xavier_(module)
    router.reset_gate()
    out = {f"router.{k}": v for k, v in router.state_dict().items()}
    if target.shared_hidden:
        shared = build_dense_ffn(target.ffn_type, D, target.shared_hidden)
        projections = _PROJECTIONS[target.ffn_type]
        for name in projections:
            _xavier_(getattr(shared, name))
        nn.init.zeros_(getattr(shared, projections[-1]).weight)  # output projection: adds 0 at init
        out.update({f"shared_experts.{k}": v for k, v in shared.state_dict().items()})
    return out


def upcycle_state_dict(dense_state: dict[str, torch.Tensor], dense: ModelConfig, target: ModelConfig, *,
                       noise_std: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """The target MoE model's state dict built from a dense state dict (see the module docstring).

    Deterministic in `seed`: the raw and EMA weights of one checkpoint get the same router init and
    the same noise draws.
    """
    check_upcycle(dense, target)
    if noise_std < 0:
        raise ValueError(f"--noise-std {noise_std}: must be >= 0")
    E = target.moe.num_experts
    generator = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in dense_state.items()
           if not (k.startswith("blocks.") and target.is_moe_block(int(k.split(".")[1])) and ".mlp." in k)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in target.moe_blocks():
            prefix = f"blocks.{i}.mlp"
            out.update({f"{prefix}.{k}": v for k, v in _new_layer_tensors(target, i).items()})
            for proj in _PROJECTIONS[dense.ffn_type]:
                for kind in ("weight", "bias"):
                    key = f"{prefix}.{proj}.{kind}"
                    if key not in dense_state:
                        continue
                    value = dense_state[key]
                    stacked = value.unsqueeze(0).repeat(E, *([1] * value.dim())).clone()  # (E, ...)
                    if kind == "weight" and noise_std > 0:
                        scale = noise_std * value.float().std()
                        stacked += (torch.randn(stacked.shape, generator=generator) * scale).to(stacked.dtype)
                    out[f"{prefix}.experts.{proj}_{kind}"] = stacked
    expected = {k: tuple(v.shape) for k, v in layouts.meta_state(target).items()}
    layouts.check_layout({k: tuple(v.shape) for k, v in out.items()}, expected,
                         f"upcycled weights do not fit {target.name}")
    return out


def upcycle_checkpoint(source: str | Path, out: str | Path, *, flavor: str | None = None,
                       overrides: list[str] | None = None, noise_std: float = 0.0, seed: int = 0) -> Path:
    """Upcycle a dense run / checkpoint directory / exported file into a new checkpoint directory.

    The target config is the source's resolved config with `model.flavor` replaced by `flavor`
    (if given; the flavor's own fields then apply) and the dotted `overrides` applied last.
    """
    from moedit.configtools import apply_overrides
    from moedit.interop.convert import write_checkpoint
    from moedit.interop.export import load_weights
    from moedit.train.config import config_from_dict, config_to_dict

    raw, src_cfg = load_weights(source, use_ema=False)
    ema, _ = load_weights(source, use_ema=True)
    data = config_to_dict(src_cfg)
    if flavor:
        data["model"] = {"flavor": flavor}
        data.pop("moe", None)
    apply_overrides(data, list(overrides or []))
    cfg = config_from_dict(data)
    check_upcycle(src_cfg.model, cfg.model)
    kwargs = dict(noise_std=noise_std, seed=seed)
    model_state = upcycle_state_dict(raw, src_cfg.model, cfg.model, **kwargs)
    ema_state = model_state if ema is raw else upcycle_state_dict(ema, src_cfg.model, cfg.model, **kwargs)
    info = {"tool": "moedit upcycle", "path": str(source), "dense_flavor": src_cfg.flavor,
            "noise_std": noise_std, "seed": seed}
    return write_checkpoint(out, cfg, model_state, ema_state, info)


__all__ = ["BACKBONE_FIELDS", "check_upcycle", "upcycle_checkpoint", "upcycle_state_dict"]
