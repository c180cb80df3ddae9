"""The registry of named model flavors. A flavor is data: a `ModelConfig`.

- DiT-{S,B,L,XL}/{2,4,8}: the DiT paper's dense models (256px, 32x32x4 latents, learned sigma).
- DiffMoE-{S-E16,B-E16,L-E8,L-E16}: MoE FFN in every second block (1, 3, ...), full-width experts,
  expert choice over the batch pool, capacity predictor. Shapes in `DIFFMOE_SHAPES`, each number's
  source in docs/models.md (S-E16 has 16 heads as in the official config, not DiT-S's 6).
- Dense-DiT-{S,B,L,XL}, TC-DiT-*, EC-DiT-*: the DiffMoE paper's baselines with the same shapes
  (TC: top-1 token choice + balance loss 0.01; EC: per-sample expert choice at capacity 1).
- DiT-MoE-{S,B,L,XL}/2-8E2A, DiT-MoE-S/2-16E2A, DiT-MoE-G/2-16E2A: MoE in every block, top-2
  softmax token choice without renormalisation, SwiGLU experts (hidden 4D) plus one SwiGLU shared
  expert of hidden 2D, balance loss 0.01 (DiT-MoE's code).
- tiny-*: two-block models for CPU tests and demos (4x16x16 latents, 10 classes).
- Text variants (`condition: text`, cross-attention to caption tokens): `DiffMoE-<tag>-T`,
  `TC-DiT-<tag>-T`, `EC-DiT-<tag>-T`, `Dense-DiT-<size>-T` (T5-XXL features: 4096 wide, 120 tokens,
  as PixArt-alpha) and `tiny-{dense,diffmoe,tc,ec}-t` (a 64-wide, 16-token stand-in encoder).
"""

from __future__ import annotations

import dataclasses

from moedit.models.config import ModelConfig, MoEConfig

SIZES = {  # DiT paper sizes: name -> (depth, hidden, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}

# The DiffMoE paper's family (and its Dense-/TC-/EC- baselines): size -> (depth, hidden, heads).
# S differs from DiT-S: the official config/000_DiffMoE_S_E16_Flow.yaml has 16 heads (head dim 24).
# Heads leave no trace in a state dict, so this table is the only place they come from; the source
# of each number is in docs/models.md ("DiffMoE family shapes"), which a test parses.
DIFFMOE_SIZES = {
    "S": (12, 384, 16),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
TEXT = {"condition": "text", "text_dim": 4096, "text_len": 120, "num_classes": 0}
"""Text-flavor defaults: T5-XXL's feature width and PixArt-alpha's 120 caption tokens."""
TINY_TEXT = {"condition": "text", "text_dim": 64, "text_len": 16, "num_classes": 0}

DIFFMOE_SHAPES = {"S-E16": ("S", 16), "B-E16": ("B", 16), "L-E8": ("L", 8), "L-E16": ("L", 16)}
"""DiffMoE tag -> (size in DIFFMOE_SIZES, experts). MoE in blocks 1, 3, 5, ... (official `interleave: true`)."""


def _dit(size: str, patch: int, name: str, sizes: dict = SIZES, **kw) -> ModelConfig:
    depth, hidden, heads = sizes[size]
    return ModelConfig(name=name, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kw)


def _diffmoe_family() -> dict[str, ModelConfig]:
    out = {}
    for tag, (size, experts) in DIFFMOE_SHAPES.items():
        diffmoe = MoEConfig(router="diffmoe", num_experts=experts, every=2, first=1)
        tc = MoEConfig(router="token_choice", num_experts=experts, every=2, first=1, top_k=1, balance_coef=0.01,
                       gate_init_std=0.006)
        ec = MoEConfig(router="expert_choice", num_experts=experts, every=2, first=1)
        out[f"DiffMoE-{tag}"] = _dit(size, 2, f"DiffMoE-{tag}", DIFFMOE_SIZES, moe=diffmoe)
        out[f"TC-DiT-{tag}"] = _dit(size, 2, f"TC-DiT-{tag}", DIFFMOE_SIZES, moe=tc)
        out[f"EC-DiT-{tag}"] = _dit(size, 2, f"EC-DiT-{tag}", DIFFMOE_SIZES, moe=ec)
    for size in DIFFMOE_SIZES:
        out[f"Dense-DiT-{size}"] = _dit(size, 2, f"Dense-DiT-{size}", DIFFMOE_SIZES)
    return out


def _text_variants(flavors: dict[str, ModelConfig], names: list[str], suffix: str, fields: dict) -> dict[str, ModelConfig]:
    """`name + suffix`: the same shape conditioned on text (`fields`) instead of classes."""
    return {name + suffix: dataclasses.replace(flavors[name], name=name + suffix,
                                               moe=dataclasses.replace(flavors[name].moe) if flavors[name].moe else None,
                                               **fields)
            for name in names}


def _ditmoe(size: str, experts: int) -> ModelConfig:
    name = f"DiT-MoE-{size}/2-{experts}E2A"
    moe = MoEConfig(router="token_choice", num_experts=experts, every=1, first=0, top_k=2, score_func="softmax",
                    renormalize=False, balance_coef=0.01, num_shared_experts=1, shared_expert_ratio=0.5,
                    gate_init_std=None)
    return _dit(size, 2, name, ffn_type="swiglu", moe=moe)


def _tiny(name: str, moe: MoEConfig | None, **kw) -> ModelConfig:
    return ModelConfig(name=name, input_size=16, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                       num_classes=10, moe=moe, **kw)


def _build_registry() -> dict[str, ModelConfig]:
    flavors: dict[str, ModelConfig] = {}
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            flavors[f"DiT-{size}/{patch}"] = _dit(size, patch, f"DiT-{size}/{patch}")
    flavors.update(_diffmoe_family())
    for size in ("S", "B", "L", "XL"):
        flavors[f"DiT-MoE-{size}/2-8E2A"] = _ditmoe(size, 8)
    flavors["DiT-MoE-S/2-16E2A"] = _ditmoe("S", 16)
    flavors["DiT-MoE-G/2-16E2A"] = _ditmoe("G", 16)
    flavors["tiny-dense"] = _tiny("tiny-dense", None)
    flavors["tiny-diffmoe"] = _tiny("tiny-diffmoe", MoEConfig(router="diffmoe", num_experts=4, every=2, first=1))
    flavors["tiny-tc"] = _tiny("tiny-tc", MoEConfig(router="token_choice", num_experts=4, every=2, first=1,
                                                    top_k=1, balance_coef=0.01))
    flavors["tiny-ec"] = _tiny("tiny-ec", MoEConfig(router="expert_choice", num_experts=4, every=2, first=1))
    flavors["tiny-ditmoe"] = _tiny("tiny-ditmoe", MoEConfig(
        router="token_choice", num_experts=4, every=1, first=0, top_k=2, balance_coef=0.01,
        num_shared_experts=1, shared_expert_ratio=0.5, gate_init_std=None), ffn_type="swiglu")
    family = list(_diffmoe_family())
    flavors.update(_text_variants(flavors, family, "-T", TEXT))
    flavors.update(_text_variants(flavors, ["tiny-dense", "tiny-diffmoe", "tiny-tc", "tiny-ec"], "-t", TINY_TEXT))
    return flavors


FLAVORS: dict[str, ModelConfig] = _build_registry()


def get_flavor(name: str) -> ModelConfig:
    """A fresh copy of a registry flavor (safe to modify)."""
    if name not in FLAVORS:
        import difflib

        close = difflib.get_close_matches(name, list(FLAVORS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `moedit models` for the list"
        raise ValueError(f"model flavor {name!r} is not in the registry{hint}")
    cfg = FLAVORS[name]
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe) if cfg.moe else None)


def _condition(cfg: ModelConfig) -> str:
    if not cfg.is_text:
        return f"{cfg.num_classes} classes"
    pooled = ", pooled caption on adaLN" if cfg.text_pooled else ""
    return f"text: cross-attention to {cfg.text_len} caption tokens of width {cfg.text_dim}{pooled}"


def describe(cfg: ModelConfig) -> str:
    """One line naming every architecture choice, heads included (what `moedit convert` assumed)."""
    head_dim = cfg.hidden_size // cfg.num_heads
    text = (f"{cfg.name}: {cfg.depth} blocks x {cfg.hidden_size} wide, {cfg.num_heads} heads (head dim {head_dim}), "
            f"patch {cfg.patch_size} on {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents "
            f"({cfg.num_tokens} tokens), {cfg.ffn_type} FFN {cfg.ffn_hidden}, {_condition(cfg)}, "
            f"{cfg.out_channels} output channels" + (", qk-norm" if cfg.qk_norm else ""))
    m = cfg.moe
    if m is None:
        return text + "; dense"
    blocks = cfg.moe_blocks()
    shown = ",".join(map(str, blocks[:4])) + (",..." if len(blocks) > 4 else "")
    route = {"diffmoe": f"expert choice over the batch pool at capacity {m.capacity:g}, capacity predictor, "
                        f"inference {m.inference_mode}",
             "expert_choice": f"per-sample expert choice at capacity {m.capacity:g}",
             "token_choice": f"top-{m.top_k} token choice"}[m.router]
    shared = f", {m.num_shared_experts} shared" if m.num_shared_experts else ""
    return text + f"; MoE in blocks {shown} ({len(blocks)}): {m.num_experts} experts of hidden {cfg.expert_hidden}{shared}, {route}"
