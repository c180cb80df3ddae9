"""The engine interface: how the trainer talks to one process or many.

An engine owns the process group, the device, and the wrapping of the single-device model
(DDP, DeepSpeed; Megatron-Core later). The trainer never touches torch.distributed
directly: every collective it needs is a method here.

One optimizer step goes through the engine like this (the defaults below are what `local` and
`ddp` do; DeepSpeed overrides them because it owns backward, clipping, accumulation and step):

    wrapped, optimizer = engine.prepare(model, optimizer, micro_batch_size=..., accum_steps=A, grad_clip=c)
    for a in range(A):
        with engine.accumulation_context(wrapped, last=a == A - 1):
            loss = ...forward through wrapped...
            engine.backward(loss, wrapped, A)
    grad_norm = engine.step(wrapped, optimizer, model, c)    # or engine.discard_gradients(...)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class DistEnv:
    """Where this process sits, read from torchrun or SLURM variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # none | torchrun | slurm


class Engine:
    name = "base"

    def __init__(self, env: DistEnv, device: torch.device):
        self.env = env
        self.device = device

    # --- topology -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def data_parallel_group(self):
        """The process group over which data-parallel replicas average (None = default / none)."""
        return None

    # --- model ----------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Return the module the trainer calls forward on (may be a wrapper of `model`)."""
        return model

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def no_sync(self, wrapped: nn.Module):
        """Context for micro-batches that accumulate gradients without communicating."""
        return contextlib.nullcontext()

    # --- the optimizer step (the trainer's forward/backward/step go through these) ----------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch_size: int,
                accum_steps: int, grad_clip: float, autocast_bf16: bool = False
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(module to call forward on, optimizer to set the learning rate on) for `model`.

        `autocast_bf16`: the trainer runs forwards under bf16 autocast (engines that reset
        autocast inside their wrapper must keep it on)."""
        return self.wrap(model), optimizer

    def accumulation_context(self, wrapped: nn.Module, last: bool):
        """Context around one micro-batch's forward and backward; `last` ends the step's accumulation."""
        return contextlib.nullcontext() if last else self.no_sync(wrapped)

    def backward(self, loss: torch.Tensor, wrapped: nn.Module, accum_steps: int) -> None:
        """Backward of one micro-batch's mean loss, as its 1/accum_steps share of the step's loss."""
        (loss / accum_steps).backward()

    def step(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, model: nn.Module,
             grad_clip: float) -> torch.Tensor:
        """Clip (grad_clip > 0) and apply the accumulated gradients; returns the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        optimizer.step()
        return grad_norm

    def discard_gradients(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop the accumulated gradients without stepping (a skipped non-finite step)."""
        optimizer.zero_grad(set_to_none=True)

    def gathered_parameters(self, model: nn.Module):
        """Context in which every rank sees `model`'s full parameters (sharded ones are gathered)."""
        return contextlib.nullcontext()

    @property
    def weights_bf16(self) -> bool:
        """True when the engine keeps the live weights in bf16 (the trainer then autocasts to bf16)."""
        return False

    # --- checkpoint state beyond the weights ------------------------------------------------
    def save_training_state(self, directory: Path, wrapped: nn.Module,
                            optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[str]]:
        """Called on every rank inside the checkpoint being written. Returns (entries for state.pt, names
        of the files or directories this wrote into `directory`, which a complete checkpoint must hold)."""
        return {"optimizer": optimizer.state_dict()}, []

    def load_training_state(self, ckpt: Path, blob: dict[str, Any], model: nn.Module, wrapped: nn.Module,
                            optimizer: torch.optim.Optimizer) -> None:
        """Restore the weights and the optimizer from a checkpoint (`blob` = `load_checkpoint`'s result)."""
        from moedit.errors import MoeditError

        if "optimizer" not in blob["state"]:
            engine = blob["meta"].get("engine", "another")
            raise MoeditError(
                f"{ckpt}: written by the {engine} engine, whose optimizer state {self.name} cannot read; "
                f"resume with parallel.engine={engine} (or train.resume=never to start fresh)"
            )
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["state"]["optimizer"])

    # --- collectives (no-ops on one process) ----------------------------------------------
    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over all ranks, in place."""

    def all_reduce_max_(self, tensors: list[torch.Tensor]) -> None:
        """Element-wise max over all ranks, in place."""

    def average_data_parallel_(self, tensors: list[torch.Tensor]) -> None:
        """Average each tensor over the data-parallel replicas, in place (DiffMoE thresholds)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        return obj

    def shutdown(self) -> None:
        """Tear down the process group."""
