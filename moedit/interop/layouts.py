"""Name maps between moedit's state dict and foreign layouts, and the strict layout check.

- `official`: facebookresearch/DiT (`dit`), the official DiffMoE code (`diffmoe`) and DiT-MoE
  (`ditmoe`). The forward map (official -> moedit) is `moedit.models.convert`; `to_official`
  here is its inverse, so the expected official names and shapes of any flavor are derived from
  moedit's own model (built on the meta device) rather than written down twice.
- `diffusers`: `DiTTransformer2DModel` (dense DiT only). diffusers keeps a copy of the timestep
  and class embedders in every block and recomputes the sin-cos position table.
"""

from __future__ import annotations

import re

import torch

from moedit.errors import MoeditError
from moedit.models import ModelConfig, build_model

LAYOUTS = ("dit", "diffmoe", "ditmoe")
_MLP = re.compile(r"^blocks\.(\d+)\.mlp\.(.+)$")
_OFFICIAL_ROUTER = {"diffmoe": {"gate.weight": "gate_weight", "capacity_predictor": "capacity_predictor",
                                "expert_threshold": "expert_threshold"},
                    "ditmoe": {"gate.weight": "gate.weight"}}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def meta_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """moedit's state dict for `cfg` on the meta device (names and shapes, no memory)."""
    return build_model(cfg, device="meta").state_dict()


# ----- official layouts ------------------------------------------------------------------------

def _router_name(layout: str, rest: str) -> str:
    """`router.<x>` of moedit -> the layout's name relative to the MoE module."""
    inner = rest[len("router."):]
    for ours, theirs in _OFFICIAL_ROUTER.get(layout, {}).items():
        if inner == ours or inner.startswith(ours + "."):
            return theirs + inner[len(ours):]
    raise MoeditError(f"router tensor '{rest}' has no counterpart in the {layout} layout "
                      f"(e.g. a token-choice aux-free bias or a DiffMoE router exported as {layout})")


def to_official(state: dict[str, torch.Tensor], cfg: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """moedit state dict -> `layout` names: router tensors renamed, stacked experts split per expert.

    DiffMoE also gets its `ema_decay` buffer (= moe.threshold_decay). Values are views, not copies.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if layout == "dit" and cfg.moe is not None:
        raise MoeditError(f"flavor {cfg.name} has MoE layers: the dit layout is dense; use diffmoe or ditmoe")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _MLP.match(key)
        if layout == "dit" or not match or not cfg.is_moe_block(int(match.group(1))):
            out[key] = value
            continue
        block, rest = match.groups()
        prefix = f"blocks.{block}.{'moe' if layout == 'ditmoe' else 'mlp'}"
        if rest.startswith("router."):
            out[f"{prefix}.{_router_name(layout, rest)}"] = value
        elif rest.startswith("experts."):
            proj, kind = rest[len("experts."):].rsplit("_", 1)  # fc1_weight -> fc1, weight
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{proj}.{kind}"] = value[e]
        else:  # shared_experts.*
            out[f"{prefix}.{rest}"] = value
        if layout == "diffmoe" and rest == "router.expert_threshold":
            out[f"{prefix}.ema_decay"] = torch.tensor([cfg.moe.threshold_decay], dtype=value.dtype,
                                                      device=value.device)
    return out


def official_shapes(cfg: ModelConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every name and shape a `layout` checkpoint of this model holds (computed on the meta device)."""
    return {k: _shape(v) for k, v in to_official(meta_state(cfg), cfg, layout).items()}


# ----- diffusers DiTTransformer2DModel ---------------------------------------------------------

def check_diffusers_compatible(cfg: ModelConfig) -> None:
    """diffusers' DiT is the dense DiT of the paper: GELU-tanh MLP of ratio 4, class-conditional."""
    problems = []
    if cfg.moe is not None:
        problems.append("it has MoE layers (diffusers' DiT is dense; use --format safetensors)")
    if cfg.ffn_type != "gelu" or cfg.mlp_ratio != 4.0:
        problems.append(f"ffn_type={cfg.ffn_type}, mlp_ratio={cfg.mlp_ratio} (diffusers: gelu, 4)")
    if cfg.qk_norm:
        problems.append("qk_norm=true (diffusers' DiT has no query/key norm)")
    if cfg.num_classes < 1:
        problems.append("num_classes=0 (diffusers' DiT is class-conditional)")
    if problems:
        raise MoeditError(f"model {cfg.name} cannot be a diffusers DiTTransformer2DModel: " + "; ".join(problems))


def diffusers_config(cfg: ModelConfig) -> dict:
    """config.json of the equivalent DiTTransformer2DModel (DiT's LayerNorm eps is 1e-6)."""
    import diffusers

    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": diffusers.__version__,
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": cfg.input_size,
            "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": cfg.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": 1e-6}


_BLOCK_DIFFUSERS = {  # moedit name inside blocks.i -> diffusers name inside transformer_blocks.i
    "adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
}
_TOP_DIFFUSERS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
                  "final_layer.linear": "proj_out_2"}
_EMBEDDERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
              "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}


def to_diffusers(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """moedit dense DiT state dict -> DiTTransformer2DModel names (pos_embed is not stored there)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if key == "pos_embed":
            continue
        if module in _TOP_DIFFUSERS:
            out[f"{_TOP_DIFFUSERS[module]}.{kind}"] = value
        elif module in _EMBEDDERS:  # one copy per block in diffusers
            for i in range(cfg.depth):
                out[f"transformer_blocks.{i}.{_EMBEDDERS[module]}.{kind}"] = value
        elif (m := re.match(r"^blocks\.(\d+)\.(.+)$", module)) and m.group(2) in _BLOCK_DIFFUSERS:
            out[f"transformer_blocks.{m.group(1)}.{_BLOCK_DIFFUSERS[m.group(2)]}.{kind}"] = value
        elif (m := re.match(r"^blocks\.(\d+)\.attn\.qkv$", module)):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):  # qkv rows are [q; k; v]
                out[f"transformer_blocks.{m.group(1)}.attn1.{name}.{kind}"] = part
        else:
            raise MoeditError(f"tensor '{key}' has no counterpart in diffusers' DiTTransformer2DModel")
    return out


def from_diffusers(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `to_diffusers` (run `check_layout` first). pos_embed is rebuilt from the sin-cos table."""
    from moedit.models.layers import sincos_2d

    grid = cfg.input_size // cfg.patch_size
    out = {"pos_embed": sincos_2d(cfg.hidden_size, grid, grid).unsqueeze(0)}
    for ours, theirs in _TOP_DIFFUSERS.items():
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
    for ours, theirs in _EMBEDDERS.items():
        for kind in (("weight",) if "embedding_table" in ours else ("weight", "bias")):
            copies = [state[f"transformer_blocks.{i}.{theirs}.{kind}"] for i in range(cfg.depth)]
            if any(not torch.equal(copies[0], c) for c in copies[1:]):
                raise MoeditError(f"diffusers checkpoint: the per-block copies of {theirs}.{kind} differ; moedit "
                                  "shares one timestep/class embedder across blocks and cannot hold this model")
            out[f"{ours}.{kind}"] = copies[0]
    for i in range(cfg.depth):
        src = f"transformer_blocks.{i}"
        for ours, theirs in _BLOCK_DIFFUSERS.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = state[f"{src}.{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state[f"{src}.attn1.to_{n}.{kind}"] for n in "qkv"])
    return out


def diffusers_model_config(config: dict, base: ModelConfig) -> ModelConfig:
    """The moedit ModelConfig of a DiTTransformer2DModel config.json, laid over `base`."""
    import dataclasses

    unsupported = {k: config.get(k) for k, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                                                    ("attention_bias", True), ("norm_elementwise_affine", False))
                   if config.get(k, want) != want}
    if unsupported:
        raise MoeditError(f"diffusers config: unsupported settings {unsupported}")
    heads, in_ch = config["num_attention_heads"], config["in_channels"]
    out_ch = config.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise MoeditError(f"diffusers config: out_channels={out_ch} must be in_channels ({in_ch}) or twice it")
    return dataclasses.replace(
        base, hidden_size=heads * config["attention_head_dim"], num_heads=heads, depth=config["num_layers"],
        in_channels=in_ch, learn_sigma=out_ch == 2 * in_ch, input_size=config["sample_size"],
        patch_size=config["patch_size"], num_classes=config["num_embeds_ada_norm"], moe=None, mlp_ratio=4.0,
        ffn_type="gelu", qk_norm=False)


# ----- strict check ----------------------------------------------------------------------------

def check_layout(found: dict[str, tuple], expected: dict[str, tuple], what: str, hint: str = "") -> None:
    """Every expected name present with its shape and nothing else, or one error listing each problem."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what}: {len(expected) - len(missing) - len(mismatched)} of {len(expected)} expected tensors match"]
    lines += [f"  missing: {k} {list(expected[k])}" for k in missing]
    lines += [f"  unexpected: {k} {list(found[k])}" for k in unexpected]
    lines += [f"  shape mismatch: {k}: file {list(found[k])}, expected {list(expected[k])}" for k in mismatched]
    if hint:
        lines.append(hint)
    raise MoeditError("\n".join(lines))
