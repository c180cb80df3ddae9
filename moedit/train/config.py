"""The training config: one dataclass per section, strict YAML loading, dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["optim.lr=2e-4", "model.flavor=DiffMoE-S-E16"])

Sections: model (a registry flavor plus field overrides), moe (overrides of the flavor's MoE
fields), diffusion, data, optim, train, parallel, deepspeed, logging, checkpoint. Overrides apply last;
`dump_config` writes the fully resolved config, which `load_config` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moedit.configtools import ConfigError, apply_overrides, coerce, dump_yaml, from_dict, load_yaml, to_dict, _closest
from moedit.data.config import DataConfig
from moedit.diffusion.config import DiffusionConfig
from moedit.engines.config import DeepSpeedConfig, ParallelConfig
from moedit.models import MoEConfig, ModelConfig, get_flavor


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW (DiT and DiffMoE: 1e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (DiT: 0)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate shape after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine schedule floor as a fraction of `lr`."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr = {self.lr}: must be > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas = {self.betas}: each must be in [0, 1)")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay, optim.warmup_steps and optim.grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio = {self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class RepaConfig:
    """REPA (Yu et al., ICLR 2025): align the hidden tokens after block `depth` with a frozen encoder's
    patch features of the clean image, stored in the shards (docs/training.md, REPA)."""

    enabled: bool = False
    """Train with the REPA term (`loss/repa`); false: no projector, no feature field read."""
    depth: int | None = None
    """The block (1 = the first) whose output is aligned, in 1..model.depth. null: round(model.depth *
    8 / 28), at least 1 (the paper's 8 for 28-block XL models; 2 for 6 blocks, 3 for 12, 7 for 24)."""
    coef: float = 0.5
    """lambda, the weight of the `repa` term in the loss (the paper: 0.5). 0 logs the term but trains
    bitwise as without REPA."""
    projector_hidden: int = 2048
    """Hidden width of the 3-layer SiLU MLP projector (the paper: 2048)."""
    field: str = "repa"
    """The shards' per-sample field holding the encoder features, float16 (T, C) in the model's token
    order; the trainer adds it to data.fields and sizes the projector's output by C."""
    encoder: str | None = None
    """null: features come from the shards (`field`). A local DINOv2 directory or `random:WIDTH`:
    the trainer computes them from each batch's clean images instead (pixel-space data only, e.g.
    the built-in digits), with the frozen encoder loaded at setup; `image_size` is its input size."""
    image_size: int = 224
    """With `encoder`: the DINOv2 input size the images are resized to (a multiple of its patch)."""

    def __post_init__(self):
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"train.repa.depth = {self.depth}: must be >= 1 (a block, counted from 1), or null "
                             "for the default")
        if self.coef < 0:
            raise ValueError(f"train.repa.coef = {self.coef}: must be >= 0")
        if self.projector_hidden < 1:
            raise ValueError(f"train.repa.projector_hidden = {self.projector_hidden}: must be >= 1")
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"train.repa.field = {self.field!r}: name the shards' feature field (e.g. repa)")


def default_repa_depth(model_depth: int) -> int:
    """REPA's aligned block scaled from the paper's 8 of 28: round(depth * 8 / 28), at least 1."""
    return max(1, round(model_depth * 8 / 28))


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Where checkpoints, logs and samples go (created if missing)."""
    steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_size: int = 256
    """Images per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 0
    """Images per forward on one rank; 0 = global_batch_size / world size (no accumulation)."""
    seed: int = 0
    """Seeds weights, noise and data order. Noise is keyed by (seed, step, global micro-batch), so it does
    not depend on the number of ranks."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when available."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU."""
    ema_decay: float = 0.9999
    """EMA decay of weights and of state buffers (DiffMoE thresholds), applied every step."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run_dir, else start), never, or a checkpoint directory."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss: stop (after a debug checkpoint) or skip the step (counted)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip, stop once more steps than this were skipped."""
    sample_every: int = 0
    """Write a sample grid from the EMA model every this many steps (0 = only at the end)."""
    num_sample_images: int = 16
    """Images in each sample grid."""
    sample_steps: int = 0
    """Sampler steps for grids (0 = the diffusion section's default)."""
    compile: bool = False
    """torch.compile each block of the trained model in place (local, ddp; megatron refuses it); docs/training.md."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode with compile = true; reduce-overhead replays each compiled block's forward
    and backward as CUDA graphs (fewer host launches: for steps the host cannot keep up with)."""
    cuda_graph: bool | Literal["auto"] = False
    """Capture the whole step (forward, backward, fused AdamW, clip, EMA, the masked restore of deferred
    checks) as one CUDA graph after two eager steps and replay it every step: the host launches one
    graph instead of thousands of kernels. Needs one CUDA process (local engine, or megatron with its
    torch optimizer) and deferred_checks = true: true makes each a named error, auto uses the graph
    where they hold (model_info.json says whether it did) and falls back to eager steps, with a
    warning, if the capture fails."""
    deferred_checks: bool = True
    """Read the non-finite-loss flags (and, with several ranks, the stop flags) at log intervals and
    checkpoints instead of after every step, so the host never waits for the device. A non-finite
    step is still discarded before it touches the weights, the optimizer state, the EMA or the
    DiffMoE thresholds (on the device); it is reported, counted and acted on (on_nonfinite) when the
    flags are read. Needs an optimizer that can discard a step on the device (torch's fused AdamW:
    local, ddp and megatron with the torch optimizer); others check every step. false: every step."""
    repa: RepaConfig = field(default_factory=RepaConfig)
    """Representation alignment (REPA); see RepaConfig."""

    def __post_init__(self):
        if isinstance(self.repa, dict):
            self.repa = RepaConfig(**self.repa)
        if self.steps < 1:
            raise ValueError(f"train.steps = {self.steps}: must be >= 1")
        if self.global_batch_size < 1 or self.micro_batch_size < 0:
            raise ValueError("train.global_batch_size must be >= 1 and train.micro_batch_size >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay = {self.ema_decay}: must be in [0, 1)")
        if self.sample_every < 0 or self.num_sample_images < 0 or self.sample_steps < 0:
            raise ValueError("train.sample_every, num_sample_images and sample_steps must be >= 0")


@dataclass
class LoggingConfig:
    log_every: int = 50
    """Write metrics (JSONL, TensorBoard, terminal) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under RUN/tb."""
    heatmaps_every: int = 0
    """Expert-load heatmap images to TensorBoard every this many steps (0 = every 10th log interval)."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """auto = a progress bar on a terminal, plain log lines otherwise."""

    def __post_init__(self):
        if self.log_every < 1:
            raise ValueError(f"logging.log_every = {self.log_every}: must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save a checkpoint every this many steps (and at the end, see final)."""
    final: bool = True
    """Save a checkpoint when train.steps is reached. false: only every `every` steps and on a stop
    signal (throughput benchmarks, smoke runs: the end of such a run is not worth its disk)."""
    keep_last: int = 2
    """Keep this many newest checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0 = none)."""

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1 or self.keep_every < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1, keep_every >= 0")


@dataclass
class Config:
    model: ModelConfig
    flavor: str
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SECTIONS = {
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "deepspeed": DeepSpeedConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
}
MODEL_SECTIONS = ("model", "moe")


def _build_model_config(model: dict[str, Any], moe: dict[str, Any] | None) -> tuple[str, ModelConfig]:
    """A registry flavor with the `model` and `moe` sections' fields laid over it."""
    model = dict(model)
    flavor = model.pop("flavor", None)
    if not isinstance(flavor, str):
        raise ConfigError("model.flavor: name a registry flavor (see `moedit models`)")
    base = get_flavor(flavor)
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    hints = _hints(ModelConfig)
    changes = {}
    for key, value in model.items():
        if key == "moe" or key not in fields:
            raise ConfigError(f"unknown key 'model.{key}'{_closest(key, [k for k in fields if k != 'moe'] + ['flavor'])}")
        changes[key] = coerce(value, hints[key], f"model.{key}")
    moe_cfg = base.moe
    if moe is not None:
        if moe_cfg is None:
            moe_cfg = from_dict(MoEConfig, moe, "moe")
        else:
            moe_hints = _hints(MoEConfig)
            moe_fields = [f.name for f in dataclasses.fields(MoEConfig)]
            moe_changes = {}
            for key, value in moe.items():
                if key not in moe_fields:
                    raise ConfigError(f"unknown key 'moe.{key}'{_closest(key, moe_fields)}")
                moe_changes[key] = coerce(value, moe_hints[key], f"moe.{key}")
            try:
                moe_cfg = dataclasses.replace(moe_cfg, **moe_changes)
            except ValueError as exc:
                raise ConfigError(f"moe: {exc}") from None
    try:
        return flavor, dataclasses.replace(base, moe=moe_cfg, **changes)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_dict(data: dict[str, Any]) -> Config:
    valid = list(SECTIONS) + list(MODEL_SECTIONS)
    for key in data:
        if key not in valid:
            raise ConfigError(f"unknown section '{key}'{_closest(key, valid)}")
    if "model" not in data:
        raise ConfigError("the config needs a 'model' section with a 'flavor'")
    flavor, model = _build_model_config(data["model"] or {}, data.get("moe"))
    sections = {name: from_dict(cls, data.get(name) or {}, name) for name, cls in SECTIONS.items()}
    cfg = Config(model=model, flavor=flavor, **sections)
    if model.is_text and hasattr(cfg.data, "fields") and not cfg.data.fields:
        cfg.data.fields = ["text", "text_mask"]  # what a text model reads besides the latents
    validate(cfg)
    _resolve_repa(cfg)
    return cfg


def _resolve_repa(cfg: Config) -> None:
    """train.repa enabled: its default depth resolved, its feature field added to data.fields. The
    model's repa_* fields are the trainer's (it reads the feature width from the data)."""
    repa = cfg.train.repa
    if not repa.enabled:
        return
    depth = cfg.model.depth
    if repa.depth is None:
        repa.depth = default_repa_depth(depth)
    if repa.depth > depth:
        raise ConfigError(f"train.repa.depth = {repa.depth}: must be in 1..model.depth = {depth} (the block whose "
                          "output is aligned)")
    if repa.encoder is None and hasattr(cfg.data, "fields") and repa.field not in cfg.data.fields:
        cfg.data.fields = [*cfg.data.fields, repa.field]


def validate(cfg: Config) -> None:
    """Checks that span sections (each section validates its own fields)."""
    if cfg.model.learn_sigma and cfg.diffusion.objective == "flow":
        raise ConfigError("model.learn_sigma = true needs diffusion.objective = ddpm (flow predicts a velocity only)")
    if cfg.parallel.engine == "megatron" and cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size = {cfg.train.micro_batch_size} with parallel.engine = megatron: the megatron engine "
            "takes its micro-batch from parallel.micro_batch and parallel.num_microbatches; set "
            "train.micro_batch_size=0 and parallel.micro_batch instead"
        )
    if cfg.parallel.megatron_optimizer == "distributed" and cfg.train.device == "cpu":
        raise ConfigError(
            "parallel.megatron_optimizer = distributed with train.device = cpu: Megatron's distributed optimizer "
            "allocates on CUDA; use parallel.megatron_optimizer=torch (or auto) on the CPU, or train.device=cuda"
        )
    if cfg.parallel.engine == "deepspeed":
        if cfg.deepspeed.zero_stage == 3 and cfg.model.moe is not None:
            raise ConfigError(
                f"deepspeed.zero_stage = 3 with the MoE model '{cfg.flavor}': DeepSpeed does not support MoE layers "
                "under ZeRO-3; use deepspeed.zero_stage=2 (or a dense flavor)"
            )
        if cfg.deepspeed.bf16 and cfg.train.precision == "fp32":
            raise ConfigError("deepspeed.bf16 = true with train.precision = fp32: use train.precision=bf16 or auto")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path)
    apply_overrides(data, list(overrides or []))
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    model = to_dict(cfg.model)
    moe = model.pop("moe")
    out: dict[str, Any] = {"model": {"flavor": cfg.flavor, **model}}
    if moe is not None:
        out["moe"] = moe
    for name in SECTIONS:
        out[name] = to_dict(getattr(cfg, name))
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    dump_yaml(config_to_dict(cfg), path)
