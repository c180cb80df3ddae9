"""DeepSpeed ZeRO data parallelism around the unchanged single-device model.

The DeepSpeed config is generated from moedit's (users never write its JSON): batch sizes and
accumulation from the train section, clipping from optim.grad_clip, ZeRO stage, optimizer
offload and bf16 from the `deepspeed` section, then `deepspeed.extra` merged on top. The
optimizer is moedit's own torch AdamW handed to DeepSpeed, so the learning-rate schedule (the
trainer sets `param_groups[i]["lr"]` every step) and the update rule are the other engines'.

DeepSpeed owns backward (its loss scaling by the accumulation steps), gradient reduction,
clipping and the step; the trainer reaches them through the Engine hooks. Collectives for
statistics and flags are DDPEngine's, over the process group DeepSpeed initialised.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moedit.engines.base import DistEnv
from moedit.engines.ddp import DDPEngine
from moedit.errors import MoeditError

CHECKPOINT_DIR = "deepspeed"
"""Where DeepSpeed's own checkpoint lives inside a moedit checkpoint directory."""
CHECKPOINT_TAG = "state"


def build_deepspeed_config(ds_cfg, *, micro_batch_size: int, accum_steps: int, world_size: int,
                           grad_clip: float, autocast_bf16: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for moedit's `deepspeed` section and batch plan."""
    zero: dict[str, Any] = {"stage": ds_cfg.zero_stage}
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(ds_cfg.bf16)},
        # moedit's torch AdamW, not a DeepSpeed-built optimizer: same update rule as the other engines,
        # and no compiled op (DeepSpeedCPUAdam) needed for offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # moedit logs; DeepSpeed's own progress lines would duplicate them
        "wall_clock_breakdown": False,
    }
    if autocast_bf16:
        # DeepSpeed switches an outer torch.autocast off inside its engine unless told to keep it:
        # without this a "bf16" run computes in fp32 (and bf16 weights meet fp32 activations).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return _merge(config, copy.deepcopy(ds_cfg.extra))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` laid over `base`; nested mappings merge key by key."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


class DeepSpeedEngine(DDPEngine):
    name = "deepspeed"

    def __init__(self, env: DistEnv, device: torch.device, backend: str, ds_cfg):
        try:
            import deepspeed
        except ImportError:
            raise MoeditError(
                "parallel.engine = deepspeed but DeepSpeed is not installed; install it with "
                "`DS_BUILD_OPS=0 pip install deepspeed` (moedit needs none of its compiled ops)"
            ) from None
        # DeepSpeed calls torch.distributed collectives that torch marks deprecated, once per step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.ds_cfg = ds_cfg
        self.ds_engine = None
        # DeepSpeed reads the torchrun variables itself (LOCAL_RANK picks the device); under SLURM or a
        # single process they are absent, so publish what moedit resolved.
        for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                           ("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port)):
            os.environ.setdefault(key, str(value))
        if device.type == "cpu":
            # On CPU DeepSpeed would JIT-compile a shared-memory all-reduce (C++, ~30 s, needs a compiler)
            # that only its inference path uses; training over gloo does not need it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            # One process is a process group of one: DeepSpeed needs torch.distributed either way.
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(minutes=30),
                verbose=False,
            )
        super().__init__(env, device, backend)

    @property
    def weights_bf16(self) -> bool:
        return bool(self.ds_cfg.bf16)

    # --- model ------------------------------------------------------------------------------
    def prepare(self, model, optimizer, *, micro_batch_size, accum_steps, grad_clip, autocast_bf16=False):
        import deepspeed

        config = build_deepspeed_config(self.ds_cfg, micro_batch_size=micro_batch_size, accum_steps=accum_steps,
                                        world_size=self.world_size, grad_clip=grad_clip,
                                        autocast_bf16=autocast_bf16)
        buffer_dtypes = {name: b.dtype for name, b in model.named_buffers()}
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        _restore_buffer_dtypes(model, buffer_dtypes)
        self.ds_engine = engine
        self.config = config
        return engine, ds_optimizer

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return getattr(wrapped, "module", wrapped)

    def no_sync(self, wrapped):
        return contextlib.nullcontext()  # accumulation is DeepSpeed's: see accumulation_context

    def accumulation_context(self, wrapped, last: bool):
        # The trainer decides where a step ends (it skips non-finite steps), so it tells DeepSpeed
        # instead of letting DeepSpeed count micro-batches: gradients are reduced when `last` is True.
        wrapped.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss, wrapped, accum_steps):
        # DeepSpeed divides by its gradient_accumulation_steps (= accum_steps): the same loss / A.
        assert wrapped.gradient_accumulation_steps() == accum_steps
        wrapped.backward(loss)

    def step(self, wrapped, optimizer, model, grad_clip):
        if self.ds_cfg.zero_stage == 0 and not self.ds_cfg.bf16:
            # ZeRO-0 steps the plain optimizer and keeps no norm; gradients are already averaged.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            wrapped.step()
            return norm.detach().float()
        wrapped.step()
        norm = wrapped.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def discard_gradients(self, wrapped, optimizer):
        # What DeepSpeed's ZeRO-1/2 optimizer does itself when it skips an overflowing step.
        optimizer.zero_grad(set_to_none=True)
        averaged = getattr(optimizer, "averaged_gradients", None)
        if isinstance(averaged, dict):
            for key in list(averaged):
                averaged[key] = None
        wrapped.zero_grad()

    def gathered_parameters(self, model):
        if self.ds_cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)

    # --- checkpoints --------------------------------------------------------------------------
    def save_training_state(self, directory: Path):
        # Collective: rank 0 writes the module states, every rank its optimizer shard.
        self.wrapped.save_checkpoint(str(directory / CHECKPOINT_DIR), tag=CHECKPOINT_TAG, save_latest=False)
        return {}, [CHECKPOINT_DIR]

    def load_training_state(self, ckpt: Path, blob):
        if blob["meta"].get("imported"):
            return super().load_training_state(ckpt, blob)  # weights only
        self.check_world(ckpt, blob)
        if not (ckpt / CHECKPOINT_DIR / CHECKPOINT_TAG).is_dir():
            engine = blob["meta"].get("engine", "another")
            raise MoeditError(
                f"{ckpt}: written by the {engine} engine, without DeepSpeed's sharded optimizer state; resume it "
                f"with parallel.engine={engine} (or train.resume=never to start fresh)"
            )
        path, _ = self.wrapped.load_checkpoint(
            str(ckpt / CHECKPOINT_DIR), tag=CHECKPOINT_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise MoeditError(f"{ckpt}: DeepSpeed could not load its checkpoint under {CHECKPOINT_DIR}/")
        self.ema.load_state_dict(blob["ema"])

    def shutdown(self):
        self.ds_engine = None
        super().shutdown()


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Undo DeepSpeed's bf16 cast of buffers: routing statistics are sums and must stay fp32."""
    for name, buffer in list(model.named_buffers()):
        if buffer is not None and buffer.dtype != dtypes[name]:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[leaf] = buffer.to(dtypes[name])
