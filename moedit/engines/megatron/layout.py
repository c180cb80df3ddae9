"""The parallel layout of a Megatron run, checked against the model and the world size before anything
is allocated.

    layout = resolve_layout(cfg.parallel, cfg.model, world_size, cfg.train.global_batch_size)

Megatron-Core's grid (parallel_state, order tp-cp-ep-dp-pp): world = TP x PP x data, and the experts
use a second grid over the same ranks, world = EP x ETP x PP x expert-data, so EP x ETP x PP must
divide the world too. A bad layout raises ValueError naming the config key, the numbers and what
would fit. This module imports no Megatron code.

Rules, and why:
- TP splits attention heads (the fused qkv and output projections, per head) and the dense FFN
  hidden: num_heads and ffn_hidden must divide by TP. hidden_size itself needs nothing more
  (it is heads x head dim); experts are not tensor-split (expert_tensor = 1), so the expert hidden
  needs nothing either.
- Sequence parallel splits each sample's T tokens over the TP ranks: T must divide by TP. Megatron's
  MoELayer refuses to train with TP > 1 without it, so MoE models with tensor > 1 need
  sequence_parallel = true. With tensor = 1 it would split nothing (and Megatron rejects it): the
  layout ignores it, so one config runs at any TP.
- PP (x VPP chunks) splits the depth into equal stages; the interleaved schedule runs micro-batches
  in groups of PP, so num_microbatches must be a multiple of PP there.
- One optimizer step is one pass of the pipeline schedule: global batch = data x micro_batch x
  num_microbatches exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Degrees of a Megatron run; `data` is derived: world_size / (tensor x pipeline)."""

    tensor: int
    pipeline: int
    expert: int
    expert_tensor: int
    data: int
    sequence_parallel: bool
    virtual_pipeline: int | None
    micro_batch: int
    """Images per forward on one data-parallel replica."""
    num_microbatches: int
    world_size: int

    @property
    def expert_data(self) -> int:
        """Replicas of each expert: world / (expert x expert_tensor x pipeline)."""
        return self.world_size // (self.expert * self.expert_tensor * self.pipeline)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all replicas."""
        return self.data * self.micro_batch * self.num_microbatches


def _divisors(*numbers: int) -> str:
    """The common divisors of `numbers`, as "{1, 2, ...}"."""
    return "{" + ", ".join(str(d) for d in range(1, min(numbers) + 1) if all(n % d == 0 for n in numbers)) + "}"


def _tensor_options(model_cfg, sequence_parallel: bool) -> str:
    """TP degrees the model allows: dividing the heads, the dense FFN hidden and (sequence parallel) the tokens."""
    numbers = [model_cfg.num_heads]
    if len(model_cfg.moe_blocks()) < model_cfg.depth:
        numbers.append(model_cfg.ffn_hidden)
    if sequence_parallel:
        numbers.append(model_cfg.num_tokens)
    return _divisors(*numbers)


def resolve_layout(parallel_cfg, model_cfg, world_size: int, global_batch: int) -> Layout:
    """The layout `parallel_cfg` (a ParallelConfig) describes for `model_cfg` on `world_size` ranks with
    `global_batch` images per optimizer step; ValueError naming the numbers if it cannot run."""
    tp, pp, ep, etp = parallel_cfg.tensor, parallel_cfg.pipeline, parallel_cfg.expert, parallel_cfg.expert_tensor
    vpp = parallel_cfg.virtual_pipeline
    moe = model_cfg.moe
    if etp != 1:
        raise ValueError(f"parallel.expert_tensor = {etp}: only 1 is supported (moedit's grouped experts keep each "
                         "expert's weights whole); use parallel.tensor for the dense parts and parallel.expert for experts")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = {tp} x {pp} = {tp * pp}: "
            f"launch a multiple of {tp * pp} processes, or change the degrees"
        )
    data = world_size // (tp * pp)
    if ep > 1 and moe is None:
        raise ValueError(f"parallel.expert = {ep} with the dense model '{model_cfg.name}' (no MoE layers): "
                         "set parallel.expert=1")
    if world_size % (ep * etp * pp):
        raise ValueError(
            f"parallel.expert = {ep}: Megatron's expert grid needs expert x expert_tensor x pipeline = {ep} x {etp} x {pp} "
            f"= {ep * etp * pp} to divide the world size {world_size}; use parallel.expert in "
            f"{_divisors(world_size // pp, moe.num_experts)} (dividing world / pipeline = {world_size // pp} and "
            f"moe.num_experts = {moe.num_experts})"
        )
    if moe is not None and moe.num_experts % ep:
        raise ValueError(f"parallel.expert = {ep}: moe.num_experts = {moe.num_experts} is not divisible by it (each "
                         f"expert-parallel rank holds num_experts / expert experts); use parallel.expert in "
                         f"{_divisors(moe.num_experts, world_size // pp)} (dividing it and world / pipeline = "
                         f"{world_size // pp})")
    sequence_parallel = bool(parallel_cfg.sequence_parallel) and tp > 1
    _check_tensor(tp, model_cfg, sequence_parallel)
    if tp > 1:
        if moe is not None and not sequence_parallel:
            raise ValueError(
                f"parallel.sequence_parallel = false with parallel.tensor = {tp} and MoE layers: Megatron's MoE layer "
                "trains with tensor parallelism only under sequence parallelism; set parallel.sequence_parallel=true"
            )
        if sequence_parallel and model_cfg.num_tokens % tp:
            raise ValueError(
                f"parallel.tensor = {tp} with sequence_parallel: the {model_cfg.num_tokens} tokens per image "
                f"((input_size / patch_size)^2) are not divisible by it; use parallel.tensor in "
                f"{_tensor_options(model_cfg, True)}"
            )
    _check_pipeline(pp, vpp, parallel_cfg.num_microbatches, model_cfg.depth)
    micro_batch = _micro_batch(parallel_cfg.micro_batch, parallel_cfg.num_microbatches, data, global_batch)
    return Layout(tensor=tp, pipeline=pp, expert=ep, expert_tensor=etp, data=data,
                  sequence_parallel=sequence_parallel, virtual_pipeline=vpp, micro_batch=micro_batch,
                  num_microbatches=parallel_cfg.num_microbatches, world_size=world_size)


def _check_tensor(tp: int, model_cfg, sequence_parallel: bool) -> None:
    if model_cfg.num_heads % tp:
        raise ValueError(f"parallel.tensor = {tp}: model.num_heads = {model_cfg.num_heads} is not divisible by it "
                         f"(heads are split over tensor-parallel ranks); use parallel.tensor in "
                         f"{_tensor_options(model_cfg, sequence_parallel)}")
    has_dense_ffn = len(model_cfg.moe_blocks()) < model_cfg.depth
    if has_dense_ffn and model_cfg.ffn_hidden % tp:
        raise ValueError(f"parallel.tensor = {tp}: the dense FFN hidden size {model_cfg.ffn_hidden} (hidden_size x "
                         f"mlp_ratio) is not divisible by it; use parallel.tensor in "
                         f"{_tensor_options(model_cfg, sequence_parallel)} or change model.mlp_ratio")


def _check_pipeline(pp: int, vpp: int | None, num_microbatches: int, depth: int) -> None:
    if vpp is not None and pp == 1:
        raise ValueError(f"parallel.virtual_pipeline = {vpp} needs parallel.pipeline > 1 (it interleaves model "
                         "chunks across pipeline stages); set parallel.pipeline or parallel.virtual_pipeline=null")
    chunks = pp * (vpp or 1)
    if depth % chunks:
        what = f"parallel.pipeline x virtual_pipeline = {pp} x {vpp} = {chunks}" if vpp else f"parallel.pipeline = {pp}"
        raise ValueError(f"{what}: model.depth = {depth} blocks do not split into {chunks} equal stage chunks; "
                         f"use a number of chunks in {_divisors(depth)}")
    if vpp is not None and num_microbatches % pp:
        raise ValueError(f"parallel.num_microbatches = {num_microbatches}: the interleaved schedule "
                         f"(virtual_pipeline = {vpp}) runs micro-batches in groups of parallel.pipeline = {pp}; use a "
                         f"multiple of {pp}")


def _micro_batch(micro_batch: int | None, num_microbatches: int, data: int, global_batch: int) -> int:
    if micro_batch is None:
        if global_batch % (data * num_microbatches):
            raise ValueError(
                f"train.global_batch_size = {global_batch} is not divisible by data x parallel.num_microbatches = "
                f"{data} x {num_microbatches} = {data * num_microbatches} (data = world / (tensor x pipeline)); "
                f"use a multiple of {data * num_microbatches}, or change parallel.num_microbatches"
            )
        return global_batch // (data * num_microbatches)
    step = data * micro_batch * num_microbatches
    if step != global_batch:
        hint = (f"set parallel.num_microbatches={global_batch // (data * micro_batch)}"
                if global_batch % (data * micro_batch) == 0 else
                f"use a train.global_batch_size divisible by data x micro_batch = {data * micro_batch}")
        raise ValueError(
            f"train.global_batch_size = {global_batch} != data x parallel.micro_batch x parallel.num_microbatches = "
            f"{data} x {micro_batch} x {num_microbatches} = {step} (one optimizer step is one pass of the pipeline "
            f"schedule); {hint}, or leave parallel.micro_batch=null to derive it"
        )
    return micro_batch
