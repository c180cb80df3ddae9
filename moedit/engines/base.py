"""The engine interface: how the trainer talks to one process or many.

An engine owns the process group, the device, and the wrapping of the single-device model
(DDP today; Megatron-Core and DeepSpeed later). The trainer never touches torch.distributed
directly: every collective it needs is a method here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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
