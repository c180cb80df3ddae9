"""Model configuration: one dataclass for the DiT backbone, one for its MoE layers.

A flavor in the registry (`moedit.models.flavors`) is just a `ModelConfig`; every field can be
overridden (`dataclasses.replace`, YAML sections, or dotted CLI overrides through `override`).
Validation happens in `__post_init__` and raises `ValueError("model.<field> = <value>: ...")`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

ROUTERS = ("diffmoe", "token_choice", "expert_choice")
CONDITIONS = ("class", "text")
INFERENCE_MODES = ("dynamic", "static", "global_threshold")


def _fail(section: str, name: str, value: Any, what: str) -> None:
    raise ValueError(f"{section}.{name} = {value!r}: {what}")


@dataclass
class MoEConfig:
    """Which FFNs are routed, and how. Absent (`ModelConfig.moe = None`) means a dense model."""

    router: Literal["diffmoe", "token_choice", "expert_choice"] = "diffmoe"
    """`diffmoe`: expert choice over the micro-batch token pool with a capacity predictor;
    `token_choice`: top-k experts per token; `expert_choice`: top-K tokens per expert within each sample."""
    num_experts: int = 16
    """E, routed experts per MoE layer."""
    every: int = 2
    """Every `every`-th block has an MoE FFN (DiffMoE: 2, DiT-MoE: 1)."""
    first: int = 1
    """Index of the first MoE block (DiffMoE: blocks 1, 3, 5, ...; DiT-MoE: 0)."""
    granularity: int = 1
    """Fine-grained experts: expert hidden = dense FFN hidden / granularity."""
    num_shared_experts: int = 0
    """Always-active experts added to the routed output (fused into one FFN)."""
    shared_expert_ratio: float = 1.0
    """Hidden size of each shared expert relative to a routed expert (DiT-MoE: 0.5)."""
    capacity: float = 1.0
    """Training capacity C of expert-choice routers: K = int(S / E * C) tokens per expert."""
    top_k: int = 2
    """Experts per token for `token_choice`."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """How router logits become scores (token choice; expert-choice routers always use softmax)."""
    renormalize: bool = False
    """Token choice: divide the top-k scores by their sum before combining."""
    capacity_factor: float | None = None
    """Token choice: if set, each expert takes at most ceil(S * k / E * factor) tokens (first come,
    in token order); the rest are dropped (counted) and pass through the residual only."""
    balance_coef: float = 0.0
    """Weight of the Switch balance loss E * sum_i f_i P_i (DiT-MoE: 0.01)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    aux_free_bias: bool = False
    """Token choice: per-expert selection bias nudged toward uniform load (no gradient)."""
    aux_free_rate: float = 1e-3
    """Step u of the aux-loss-free bias update b_i += u * sign(mean_load - load_i)."""
    predictor_coef: float = 1.0
    """Weight of the DiffMoE capacity-predictor BCE loss."""
    threshold_decay: float = 0.95
    """EMA decay of the DiffMoE per-expert thresholds, updated every training forward."""
    inference_mode: Literal["dynamic", "static", "global_threshold"] = "dynamic"
    """DiffMoE in eval mode: per-expert EMA thresholds, a fixed capacity, or one threshold."""
    inference_capacity: float = 1.0
    """Capacity used by the `static` inference mode."""
    global_threshold: float = 0.5
    """Threshold gamma of the `global_threshold` inference mode, in [0, 1]."""
    gate_init_std: float | None = 0.006
    """Router gate init N(0, std^2) (DiffMoE: 0.006); None keeps nn.Linear's default init."""
    stats_noise_bin_edges: list[float] | None = None
    """Edges of the noise-level bins for routing statistics (None: 10 equal bins on [0, 1])."""
    stats_by_class: bool = True
    """Also count tokens per expert per class label (num_classes + 1 rows, the last is null)."""

    def __post_init__(self) -> None:
        s = "moe"
        if self.router not in ROUTERS:
            _fail(s, "router", self.router, f"must be one of {', '.join(ROUTERS)}")
        if int(self.num_experts) != self.num_experts or self.num_experts < 1:
            _fail(s, "num_experts", self.num_experts, "must be an integer >= 1")
        if self.every < 1:
            _fail(s, "every", self.every, "must be >= 1")
        if self.first < 0:
            _fail(s, "first", self.first, "must be >= 0")
        if self.granularity < 1:
            _fail(s, "granularity", self.granularity, "must be an integer >= 1")
        if self.num_shared_experts < 0:
            _fail(s, "num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.shared_expert_ratio <= 0:
            _fail(s, "shared_expert_ratio", self.shared_expert_ratio, "must be > 0")
        if not 0 < self.capacity <= self.num_experts:
            _fail(s, "capacity", self.capacity, f"must be in (0, num_experts={self.num_experts}]")
        if not 1 <= self.top_k <= self.num_experts:
            _fail(s, "top_k", self.top_k, f"must be in [1, num_experts={self.num_experts}]")
        if self.score_func not in ("softmax", "sigmoid"):
            _fail(s, "score_func", self.score_func, "must be 'softmax' or 'sigmoid'")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            _fail(s, "capacity_factor", self.capacity_factor, "must be > 0, or null for no token dropping")
        for name in ("balance_coef", "z_loss_coef", "predictor_coef", "aux_free_rate"):
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be >= 0")
        if not 0 <= self.threshold_decay < 1:
            _fail(s, "threshold_decay", self.threshold_decay, "must be in [0, 1)")
        if self.inference_mode not in INFERENCE_MODES:
            _fail(s, "inference_mode", self.inference_mode, f"must be one of {', '.join(INFERENCE_MODES)}")
        if not 0 < self.inference_capacity <= self.num_experts:
            _fail(s, "inference_capacity", self.inference_capacity, f"must be in (0, num_experts={self.num_experts}]")
        if not 0 <= self.global_threshold <= 1:
            _fail(s, "global_threshold", self.global_threshold, "must be in [0, 1]")
        if self.gate_init_std is not None and self.gate_init_std <= 0:
            _fail(s, "gate_init_std", self.gate_init_std, "must be > 0, or null for the default init")
        edges = self.stats_noise_bin_edges
        if edges is not None:
            if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
                _fail(s, "stats_noise_bin_edges", edges, "must be at least 2 strictly increasing numbers")
            self.stats_noise_bin_edges = [float(e) for e in edges]

    def noise_bin_edges(self) -> list[float]:
        """The noise-level bin edges used for routing statistics."""
        if self.stats_noise_bin_edges is not None:
            return list(self.stats_noise_bin_edges)
        return [i / 10 for i in range(11)]


@dataclass
class ModelConfig:
    """A DiT backbone (Peebles & Xie 2023) whose FFNs may be MoE layers."""

    name: str = "custom"
    """Flavor name (informational; `get_flavor` sets it)."""
    input_size: int = 32
    """Latent height = width."""
    in_channels: int = 4
    """Latent channels C."""
    patch_size: int = 2
    """Patch size p (1, 2, 4 or 8); must divide input_size. Tokens T = (input_size / p)^2."""
    hidden_size: int = 1152
    """Model width D."""
    depth: int = 28
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads; must divide hidden_size."""
    mlp_ratio: float = 4.0
    """Dense FFN hidden = mlp_ratio * D (also the base width of routed experts)."""
    ffn_type: Literal["gelu", "swiglu"] = "gelu"
    """FFN (and expert) type: GELU-tanh MLP with biases (DiT) or bias-free SwiGLU (DiT-MoE)."""
    num_classes: int = 1000
    """Class labels; the label table has num_classes + 1 rows (the last is the CFG null class).
    0 means unconditional (y is ignored)."""
    class_dropout_prob: float = 0.1
    """Training label dropout to the null class (for classifier-free guidance)."""
    learn_sigma: bool = True
    """Output 2C channels (DDPM learned variance); otherwise C."""
    qk_norm: bool = False
    """LayerNorm on queries and keys per head."""
    moe: MoEConfig | None = None
    """MoE layers (None: dense model)."""
    condition: Literal["class", "text"] = "class"
    """What the model is conditioned on besides t: `class` labels through adaLN (DiT), or `text`:
    text-encoder token features through a cross-attention sublayer in every block (no label
    embedder; num_classes and class_dropout_prob are unused)."""
    text_dim: int = 0
    """Text: width of the encoder's token features (T5-XXL 4096, CLIP-L 768); 0 for class models."""
    text_len: int = 0
    """Text: caption tokens L the model sees (padded or cut at preparation; PixArt-alpha: 120)."""
    text_pooled: bool = False
    """Text: also add a pooled caption vector (masked mean of the projected tokens through a small
    MLP) to the timestep embedding, so adaLN sees the caption too."""
    caption_dropout: float = 0.1
    """Text: training probability of replacing a caption by the learned null caption (for CFG)."""
    repa_depth: int = 0
    """REPA: the block (1 = the first) whose output the training-only projector aligns with encoder
    features; 0 = no projector. Filled by the trainer from `train.repa` (docs/training.md, REPA)."""
    repa_dim: int = 0
    """REPA: width C of the encoder features (read from the data by the trainer); 0 = no projector."""
    repa_hidden: int = 0
    """REPA: hidden width of the projector MLP (train.repa.projector_hidden)."""
    repa_coef: float = 0.0
    """REPA: weight lambda of the `repa` term (train.repa.coef); 0 trains exactly as without REPA."""

    def __post_init__(self) -> None:
        s = "model"
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.patch_size not in (1, 2, 4, 8):
            _fail(s, "patch_size", self.patch_size, "must be one of 1, 2, 4, 8")
        if self.input_size < 1 or self.input_size % self.patch_size:
            _fail(s, "input_size", self.input_size,
                  f"must be a positive multiple of patch_size={self.patch_size}")
        for name in ("in_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                _fail(s, name, getattr(self, name), "must be >= 1")
        if self.hidden_size % self.num_heads:
            _fail(s, "num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            _fail(s, "hidden_size", self.hidden_size, "must be a multiple of 4 (2-D sin-cos position embedding)")
        if self.mlp_ratio <= 0:
            _fail(s, "mlp_ratio", self.mlp_ratio, "must be > 0")
        if self.ffn_type not in ("gelu", "swiglu"):
            _fail(s, "ffn_type", self.ffn_type, "must be 'gelu' or 'swiglu'")
        if self.num_classes < 0:
            _fail(s, "num_classes", self.num_classes, "must be >= 0 (0: unconditional)")
        if not 0 <= self.class_dropout_prob < 1:
            _fail(s, "class_dropout_prob", self.class_dropout_prob, "must be in [0, 1)")
        self._check_condition()
        self._check_repa()
        if self.moe is not None:
            if self.moe.first >= self.depth:
                _fail("moe", "first", self.moe.first, f"must be in [0, depth={self.depth})")
            if self.ffn_hidden % self.moe.granularity:
                _fail("moe", "granularity", self.moe.granularity,
                      f"must divide the dense FFN hidden size {self.ffn_hidden}")

    def _check_condition(self) -> None:
        s = "model"
        if self.condition not in CONDITIONS:
            _fail(s, "condition", self.condition, f"must be one of {', '.join(CONDITIONS)}")
        if self.condition == "class":
            if self.text_pooled:
                _fail(s, "text_pooled", self.text_pooled, "needs model.condition = text (a class model has no caption)")
            return
        if self.text_dim < 1:
            _fail(s, "text_dim", self.text_dim,
                  "a text model needs the encoder's feature width (>= 1; T5-XXL: 4096, CLIP-L: 768)")
        if self.text_len < 1:
            _fail(s, "text_len", self.text_len, "a text model needs the caption length in tokens (>= 1, e.g. 120)")
        if not 0 <= self.caption_dropout < 1:
            _fail(s, "caption_dropout", self.caption_dropout, "must be in [0, 1)")

    def _check_repa(self) -> None:
        s = "model"
        if not 0 <= self.repa_depth <= self.depth:
            _fail(s, "repa_depth", self.repa_depth, f"must be in [1, depth={self.depth}] (0: no REPA projector)")
        for name in ("repa_dim", "repa_hidden", "repa_coef"):
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be >= 0")
        if self.repa_depth and (self.repa_dim < 1 or self.repa_hidden < 1):
            _fail(s, "repa_depth", self.repa_depth, "a REPA projector needs repa_dim and repa_hidden >= 1 (the "
                  "trainer sets all four from train.repa and the data; set repa_depth=0 for none)")

    @property
    def has_repa(self) -> bool:
        """Whether the model holds the training-only REPA projector."""
        return self.repa_depth > 0

    @property
    def is_text(self) -> bool:
        """Conditioned on captions through cross-attention."""
        return self.condition == "text"

    @property
    def num_tokens(self) -> int:
        """T, tokens per image."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def ffn_hidden(self) -> int:
        """Hidden size of the dense FFN."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def expert_hidden(self) -> int:
        """F, hidden size of one routed expert."""
        return self.ffn_hidden // (self.moe.granularity if self.moe else 1)

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the fused shared experts (0 if none)."""
        if self.moe is None or self.moe.num_shared_experts == 0:
            return 0
        return self.moe.num_shared_experts * int(round(self.expert_hidden * self.moe.shared_expert_ratio))

    def is_moe_block(self, index: int) -> bool:
        """Whether block `index` (from 0) has an MoE FFN."""
        m = self.moe
        return m is not None and index >= m.first and (index - m.first) % m.every == 0

    def moe_blocks(self) -> list[int]:
        return [i for i in range(self.depth) if self.is_moe_block(i)]


def override(cfg: ModelConfig, overrides: dict[str, Any] | list[str]) -> ModelConfig:
    """A copy of `cfg` with dotted overrides applied: {"input_size": 64, "moe.num_experts": 8}
    or ["input_size=64", "moe.router=token_choice"]. Strings are read by the training configs'
    override parser and every value is checked against the field's type by the same code
    (`moedit.configtools`), so `moedit models` and `moedit train` accept the same spellings."""
    import typing

    from moedit.configtools import ConfigError, _closest, coerce, parse_override

    if isinstance(overrides, list):
        overrides = {".".join(path): value for path, value in map(parse_override, overrides)}
    top: dict[str, Any] = {}
    moe: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "moe"):
            raise ValueError(f"override {key!r}: unknown section {section!r} (use 'moe.<field>' or '<field>')")
        target_cls, target = (MoEConfig, moe) if section == "moe" else (ModelConfig, top)
        names = [f.name for f in dataclasses.fields(target_cls) if f.name != "moe"]
        if name not in names:
            raise ValueError(f"override {key!r}: unknown field{_closest(name, names)}")
        try:
            target[name] = coerce(value, typing.get_type_hints(target_cls)[name], key)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    moe_cfg = cfg.moe
    if moe:
        moe_cfg = dataclasses.replace(moe_cfg, **moe) if moe_cfg is not None else MoEConfig(**moe)
    return dataclasses.replace(cfg, moe=moe_cfg, **top)


__all__ = ["ModelConfig", "MoEConfig", "ROUTERS", "CONDITIONS", "INFERENCE_MODES", "override"]
