"""torch DistributedDataParallel over gloo (CPU) or NCCL (GPU)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moedit.engines.base import DistEnv, Engine


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, env: DistEnv, device: torch.device, backend: str, find_unused_parameters: bool = False):
        super().__init__(env, device)
        self.find_unused_parameters = find_unused_parameters
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(minutes=30),
            )
        self.backend = backend

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers=False: buffers are either constant (pos_embed), reduced explicitly
        # (routing statistics) or averaged explicitly after each step (DiffMoE thresholds).
        return DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=self.find_unused_parameters
        )

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped

    def no_sync(self, wrapped: nn.Module):
        return wrapped.no_sync()

    def _flat_reduce(self, tensors: list[torch.Tensor], op, group=None) -> None:
        # One collective for many small tensors (routing statistics are dozens of them).
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n

    # Data-parallel collectives run over `data_parallel_group` (None: the world; Megatron: its
    # data-parallel group), the others over the world.
    def all_reduce_sum_(self, tensors):
        self._flat_reduce(tensors, dist.ReduceOp.SUM, self.data_parallel_group)

    def all_reduce_sum_world_(self, tensors):
        self._flat_reduce(tensors, dist.ReduceOp.SUM)

    def all_reduce_max_(self, tensors):
        self._flat_reduce(tensors, dist.ReduceOp.MAX)

    def all_reduce_max_replicas_(self, tensors):
        self._flat_reduce(tensors, dist.ReduceOp.MAX, self.data_parallel_group)

    def average_data_parallel_(self, tensors):
        group = self.data_parallel_group
        self._flat_reduce(tensors, dist.ReduceOp.SUM, group)
        for t in tensors:
            t.div_(dist.get_world_size(group))

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self):
        if dist.is_initialized():
            dist.destroy_process_group()
