"""Megatron's bf16 recipe for the DiT: bf16 parameters, fp32 master weights in the distributed optimizer.

    module = to_bf16_module(model, config)                # parameters bf16, floating buffers untouched
    ddp = DistributedDataParallel(config, ddp_config(distributed=True), module)
    optimizer = distributed_optimizer(ddp, lr=..., ..., bf16=True)

Used by the Megatron engine when `parallel.megatron_optimizer = distributed`.
Megatron's optimizers allocate on CUDA unconditionally: these helpers are GPU-only.
"""

from __future__ import annotations

import torch


def to_bf16_module(model: torch.nn.Module, config) -> torch.nn.Module:
    """`Float16Module(config, model)`: parameters cast to bf16 in place, outputs of the last stage
    returned in fp32. Float16Module casts every floating buffer too; moedit's buffers (routing
    statistics, DiffMoE thresholds, noise-bin edges) hold counts and running averages that bf16
    cannot represent, so the very tensors they held before come back (same values, same dtype).

    Call the result with t and y by keyword: Float16Module casts positional floating inputs to bf16."""
    from megatron.core.transformer.module import Float16Module

    before = {name: buf for name, buf in model.named_buffers() if buf.is_floating_point()}
    module = Float16Module(config, model)
    for name, buf in before.items():
        owner, _, leaf = name.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[leaf] = buf
    return module


def ddp_config(distributed: bool):
    """Megatron DDP: gradients accumulated and reduced in fp32; reduce-scatter under the
    distributed optimizer (all-reduce otherwise)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)


def distributed_optimizer(ddp, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                          clip_grad: float, bf16: bool):
    """Megatron's distributed AdamW over `ddp` (one model chunk): fp32 master weights and Adam
    states sharded over the data-parallel ranks, expert parameters in a second optimizer over the
    expert-data-parallel ranks (a ChainedOptimizer). Its `step()` returns (success, grad_norm,
    num_zeros): the norm is taken over every parameter's main replica across all ranks, and
    gradients are clipped to `clip_grad` (0 = no clipping).

    Weight decay applies to every parameter, as `torch.optim.AdamW(model.parameters())` does in
    the other engines (Megatron's default override would exempt biases and 1-D parameters)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                             adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad, bf16=bf16,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, [ddp], config_overrides={})
    set_fused_adam(optimizer)
    return optimizer


def set_fused_adam(optimizer) -> None:
    """Switch the torch AdamW instances inside a Megatron optimizer to torch's fused kernel (Megatron
    uses torch's AdamW, with its foreach kernel, when neither Transformer Engine nor Apex is
    installed); a group with a parameter off CUDA keeps its kernel."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            for group in torch_opt.param_groups:
                if all(p.is_cuda and p.is_floating_point() for p in group["params"]):
                    group["fused"], group["foreach"] = True, False


def allocate_optimizer_states(optimizer) -> None:
    """Give a fresh Megatron distributed optimizer its Adam states before a checkpoint loads into
    it: `sharded_state_dict(is_loading=True)` needs them (with torch's AdamW underneath, Megatron
    reads the step count from them). A zero-gradient step on the master weights only; the load
    overwrites master weights, moments and step, and the model's parameters are not touched."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is not None and len(torch_opt.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)` for a `fully_reshardable` sharded state (as loaded by
    dist_checkpointing), working around Megatron-Core 0.16.1 with torch's AdamW underneath: its
    parameter-state loader copies every entry of the torch state into place, `step` included,
    but the checkpoint holds `step` in the param groups only (KeyError: 'step'). So: param groups
    and step first, then the per-parameter tensors with `step` set aside."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(chained) == 1 else [state[k] for k in sorted(state)]
    for opt, part in zip(chained, parts):
        part = dict(part)
        param_state = part.pop("param_state")
        sharding = part.pop("param_state_sharding_type")
        if sharding != "fully_reshardable":
            raise ValueError(f"optimizer state in the {sharding!r} format; expected 'fully_reshardable'")
        opt.load_state_dict(part)  # param groups, step (into every parameter's torch state)
        inner = opt.optimizer.state
        steps = {p: s.pop("step") for p, s in inner.items() if "step" in s}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                inner[p]["step"] = step
    if hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


__all__ = ["allocate_optimizer_states", "ddp_config", "distributed_optimizer", "load_optimizer_state",
           "set_fused_adam", "to_bf16_module"]
