"""Config sections the engines own: `parallel` (which engine, and Megatron-Core's layout) and
`deepspeed` (ZeRO). The training config (`Config` of the train package) holds one of each;
engines receive them as arguments and never import the train package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ParallelConfig:
    engine: Literal["auto", "local", "ddp", "deepspeed", "megatron"] = "auto"
    """auto = ddp when launched with several processes (torchrun or SLURM variables), else local;
    deepspeed = ZeRO data parallelism configured by the `deepspeed` section; megatron = Megatron-Core
    with the tensor/pipeline/expert degrees below (needs moedit[megatron])."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend for ddp, deepspeed and megatron: auto = nccl on CUDA, gloo on CPU."""
    find_unused_parameters: bool = False
    """Passed to DistributedDataParallel."""
    tensor: int = 1
    """Megatron: tensor-parallel degree TP. Attention heads and the dense FFN hidden are split over TP ranks;
    the model needs num_heads (and the dense FFN hidden) divisible by it."""
    pipeline: int = 1
    """Megatron: pipeline stages PP, run with the 1F1B schedule; each stage holds depth / PP blocks."""
    expert: int = 1
    """Megatron: expert-parallel degree EP; each rank holds num_experts / EP experts and tokens reach them by
    all-to-all. EP ranks are carved out of the data-parallel (x tensor-parallel) ranks."""
    expert_tensor: int = 1
    """Megatron: tensor-parallel degree inside the experts. Only 1 is supported: moedit's grouped experts keep
    each expert's weights whole."""
    sequence_parallel: bool = False
    """Megatron: split the tokens of the non-tensor-parallel regions (norms, residuals, MoE layers) over the TP
    ranks. Required with tensor > 1 and MoE layers; ignored when tensor = 1 (it would split nothing)."""
    virtual_pipeline: int | None = None
    """Megatron: model chunks per pipeline stage for the interleaved 1F1B schedule. Not supported by the engine
    yet (it builds one chunk per stage: a named error at start); null = the plain 1F1B schedule."""
    micro_batch: int | None = None
    """Megatron: images per forward on one data-parallel replica; null = train.global_batch_size / data degree /
    num_microbatches. (The other engines use train.micro_batch_size.)"""
    num_microbatches: int = 1
    """Megatron: micro-batches per optimizer step, run through the pipeline schedule (keep it >= pipeline to
    fill the pipeline). train.global_batch_size = data degree x micro_batch x num_microbatches."""
    megatron_optimizer: Literal["auto", "distributed", "torch"] = "auto"
    """Megatron: distributed = Megatron's distributed optimizer (AdamW with fp32 master weights and Adam
    states sharded over the data-parallel ranks; bf16 parameters unless train.precision = fp32), CUDA only;
    torch = torch AdamW on each rank's fp32 parameters (bf16 autocast per train.precision); auto = torch
    (resume with the distributed optimizer is not yet shown exact: docs/megatron.md)."""

    def __post_init__(self):
        for name in ("tensor", "pipeline", "expert", "expert_tensor", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} = {getattr(self, name)}: must be an integer >= 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"parallel.micro_batch = {self.micro_batch}: must be >= 1, or null to derive it from "
                             "train.global_batch_size")
        if self.virtual_pipeline is not None and self.virtual_pipeline < 2:
            raise ValueError(f"parallel.virtual_pipeline = {self.virtual_pipeline}: must be >= 2 model chunks per "
                             "stage, or null for the plain 1F1B schedule")
        if self.engine != "megatron":
            for name, default in MEGATRON_ONLY_DEFAULTS.items():
                value = getattr(self, name)
                if value != default:
                    other = {"micro_batch": "train.micro_batch_size", "num_microbatches": "train.micro_batch_size"}
                    alternative = f" (engine {self.engine} uses {other[name]})" if name in other else ""
                    raise ValueError(
                        f"parallel.{name} = {_yaml(value)}: only parallel.engine = megatron uses it, the engine is "
                        f"'{self.engine}'; set parallel.engine=megatron, or parallel.{name}={_yaml(default)}{alternative}"
                    )


MEGATRON_ONLY_DEFAULTS = {
    "tensor": 1, "pipeline": 1, "expert": 1, "expert_tensor": 1, "sequence_parallel": False,
    "virtual_pipeline": None, "micro_batch": None, "num_microbatches": 1, "megatron_optimizer": "auto",
}


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage: 0 (plain data parallelism), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters;
    dense models only)."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU and step there (ZeRO-Offload; stages 1-3). The optimizer stays
    torch AdamW, so no DeepSpeed op has to be compiled."""
    bf16: bool = False
    """DeepSpeed bf16 mode: bf16 weights and gradients, fp32 master weights in the optimizer (less memory than
    autocast over fp32 weights). Needs train.precision = auto or bf16."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys merged last into the generated DeepSpeed config (nested mappings merge), e.g.
    {zero_optimization: {reduce_bucket_size: 50000000}}. Batch sizes, accumulation, clipping and the
    optimizer come from the other sections and cannot be overridden here."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage = {self.zero_stage}: must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer = true needs deepspeed.zero_stage >= 1")
        reserved = sorted(set(self.extra) & DEEPSPEED_RESERVED_KEYS)
        if reserved:
            raise ValueError(
                f"deepspeed.extra sets {', '.join(reserved)}: moedit derives these from train.global_batch_size, "
                "train.micro_batch_size, optim.* and deepspeed.bf16; set them there"
            )


DEEPSPEED_RESERVED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "bf16", "fp16",
}
