"""Analytic parameter and FLOP accounting for any `ModelConfig`.

Parameters count exactly what `build_model(cfg)` instantiates, `pos_embed` included (DiT stores
it as a frozen parameter and its published 675,129,632 for DiT-XL/2 includes it); buffers
(DiffMoE thresholds, statistics) are not parameters.

FLOPs follow the DiT paper: one multiply-add = one FLOP, per image, forward pass; norms,
softmax, activations and additions are not counted. The `dit` convention includes the
attention score (QK^T) and value (AV) matmuls; the `ditmoe` convention leaves them out.
MoE layers count the router, the DiffMoE capacity predictor, shared experts and routed experts
weighted by the tokens each expert actually processes per token: top_k for token choice,
the capacity C for expert-choice routers (C = 1 at training; pass another for inference).
Training FLOPs per image = 3x forward (backward = 2x forward).

Text models (`condition: text`) count at their `text_len` caption tokens L (padding included:
the attention runs over all L and masks): the caption projection (L x (text_dim x D + D x D)),
the null caption (L x text_dim parameters), per block a cross-attention (queries T x D x D,
keys/values L x 2D x D, output T x D x D, and in the `dit` convention the 2 x T x L x D score and
value matmuls), and with `text_pooled` a D x D, D x D MLP per image.
"""

from __future__ import annotations

from dataclasses import dataclass

from moedit.models.config import ModelConfig

TIMESTEP_FREQUENCY_SIZE = 256
CONVENTIONS = ("dit", "ditmoe")


def _ffn_params(ffn_type: str, D: int, H: int) -> int:
    return 2 * D * H + H + D if ffn_type == "gelu" else 3 * D * H


def _ffn_macs(ffn_type: str, D: int, H: int) -> int:
    """Multiply-adds per token."""
    return (2 if ffn_type == "gelu" else 3) * D * H


@dataclass
class ParamBreakdown:
    embed: int  # pos_embed + patch, timestep and label (or caption) embedders
    attention: int  # all blocks (self- and, for text models, cross-attention)
    adaln: int  # all blocks' adaLN modulation
    dense_ffn: int  # dense FFN blocks
    routers: int  # gates (+ DiffMoE capacity predictors)
    routed_experts: int
    shared_experts: int
    final: int

    @property
    def total(self) -> int:
        return (self.embed + self.attention + self.adaln + self.dense_ffn + self.routers + self.routed_experts
                + self.shared_experts + self.final)


def param_breakdown(cfg: ModelConfig) -> ParamBreakdown:
    D, p, T = cfg.hidden_size, cfg.patch_size, cfg.num_tokens
    embed = T * D + D * cfg.in_channels * p * p + D + TIMESTEP_FREQUENCY_SIZE * D + D + D * D + D
    head_dim = D // cfg.num_heads
    per_attention = 4 * D * D + 4 * D + (4 * head_dim if cfg.qk_norm else 0)  # qkv (or q + kv), proj, qk-norm
    attention = cfg.depth * per_attention
    if cfg.is_text:
        embed += cfg.text_dim * D + D + D * D + D + cfg.text_len * cfg.text_dim  # caption MLP, null caption
        if cfg.text_pooled:
            embed += 2 * (D * D + D)
        attention += cfg.depth * per_attention
    elif cfg.num_classes:
        embed += (cfg.num_classes + 1) * D
    adaln = cfg.depth * (6 * D * D + 6 * D)
    n_moe = len(cfg.moe_blocks())
    dense_ffn = (cfg.depth - n_moe) * _ffn_params(cfg.ffn_type, D, cfg.ffn_hidden)
    routers = routed = shared = 0
    if cfg.moe is not None:
        E = cfg.moe.num_experts
        per_router = E * D + ((D * D + D + D * E + E) if cfg.moe.router == "diffmoe" else 0)
        routers = n_moe * per_router
        routed = n_moe * E * _ffn_params(cfg.ffn_type, D, cfg.expert_hidden)
        if cfg.shared_hidden:
            shared = n_moe * _ffn_params(cfg.ffn_type, D, cfg.shared_hidden)
    out = p * p * cfg.out_channels
    final = D * out + out + 2 * D * D + 2 * D
    return ParamBreakdown(embed, attention, adaln, dense_ffn, routers, routed, shared, final)


def count_params(cfg: ModelConfig) -> int:
    """Total parameters of `build_model(cfg)` (pos_embed included)."""
    return param_breakdown(cfg).total


def experts_per_token(cfg: ModelConfig, capacity: float | None = None) -> float:
    """Routed experts that process an average token: top_k, or the capacity for expert choice."""
    if cfg.moe is None:
        return 0.0
    if cfg.moe.router == "token_choice":
        return float(cfg.moe.top_k)
    return float(cfg.moe.capacity if capacity is None else capacity)


def activated_params(cfg: ModelConfig, capacity: float | None = None) -> float:
    """Parameters used per token: all but the routed experts, plus `experts_per_token` experts."""
    b = param_breakdown(cfg)
    if cfg.moe is None:
        return float(b.total)
    per_expert = b.routed_experts / cfg.moe.num_experts
    return b.total - b.routed_experts + experts_per_token(cfg, capacity) * per_expert


def forward_macs(cfg: ModelConfig, convention: str = "dit", capacity: float | None = None) -> float:
    """Multiply-adds of one forward pass per image."""
    if convention not in CONVENTIONS:
        raise ValueError(f"FLOP convention {convention!r}: must be one of {', '.join(CONVENTIONS)}")
    D, p, T, C = cfg.hidden_size, cfg.patch_size, cfg.num_tokens, cfg.in_channels
    macs = T * D * C * p * p  # patch embedding
    macs += TIMESTEP_FREQUENCY_SIZE * D + D * D  # timestep MLP (per image)
    attention_matmuls = 2 * T * T * D if convention == "dit" else 0  # QK^T and AV
    per_block = 6 * D * D + 4 * T * D * D + attention_matmuls  # adaLN, qkv + proj, scores
    if cfg.is_text:
        L = cfg.text_len
        macs += L * (cfg.text_dim * D + D * D) + (2 * D * D if cfg.text_pooled else 0)  # caption MLP, pooled MLP
        cross_matmuls = 2 * T * L * D if convention == "dit" else 0  # QK^T and AV against L caption tokens
        per_block += 2 * T * D * D + 2 * L * D * D + cross_matmuls  # q + proj, kv of the caption
    macs += cfg.depth * per_block
    n_moe = len(cfg.moe_blocks())
    macs += (cfg.depth - n_moe) * T * _ffn_macs(cfg.ffn_type, D, cfg.ffn_hidden)
    if cfg.moe is not None:
        E = cfg.moe.num_experts
        per_token = E * D  # gate
        if cfg.moe.router == "diffmoe":
            per_token += D * D + D * E  # capacity predictor
        per_token += experts_per_token(cfg, capacity) * _ffn_macs(cfg.ffn_type, D, cfg.expert_hidden)
        if cfg.shared_hidden:
            per_token += _ffn_macs(cfg.ffn_type, D, cfg.shared_hidden)
        macs += n_moe * T * per_token
    macs += 2 * D * D + T * D * p * p * cfg.out_channels  # final adaLN and linear
    return float(macs)


def forward_gflops(cfg: ModelConfig, convention: str = "dit", capacity: float | None = None) -> float:
    """Forward GFLOPs per image (multiply-adds, in the `dit` or `ditmoe` convention)."""
    return forward_macs(cfg, convention, capacity) / 1e9


def train_gflops(cfg: ModelConfig, convention: str = "dit") -> float:
    """Training GFLOPs per image: forward + backward = 3x forward."""
    return 3 * forward_gflops(cfg, convention)


def model_info(cfg: ModelConfig) -> dict:
    """The summary `moedit models` prints and `moedit train` writes to model_info.json."""
    moe = cfg.moe
    return {
        "flavor": cfg.name,
        "depth": cfg.depth,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "input_size": cfg.input_size,
        "condition": cfg.condition,
        "text_len": cfg.text_len if cfg.is_text else 0,
        "text_dim": cfg.text_dim if cfg.is_text else 0,
        "router": moe.router if moe else None,
        "num_experts": moe.num_experts if moe else 0,
        "activated_experts": experts_per_token(cfg) if moe else 0,
        "moe_blocks": cfg.moe_blocks(),
        "total_params": count_params(cfg),
        "activated_params": activated_params(cfg),
        "fwd_gflops_dit": forward_gflops(cfg, "dit"),
        "fwd_gflops_ditmoe": forward_gflops(cfg, "ditmoe"),
        "train_gflops_dit": train_gflops(cfg, "dit"),
        "train_gflops_ditmoe": train_gflops(cfg, "ditmoe"),
    }
