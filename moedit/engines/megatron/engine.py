"""`parallel.engine = megatron`: process groups from Megatron-Core's parallel_state.

GPU only: Megatron-Core hard-codes CUDA in a few places. moedit's CPU tests run it on gloo with
those places stubbed (tests/megatron/cpu_stubs.py) and MOEDIT_MEGATRON_CPU=1; nothing else should.

The engine owns the process group (as the ddp engine does) and Megatron's model-parallel grid;
its data-parallel collectives run over Megatron's data-parallel group, so routing statistics are
summed over replicas that saw different tokens and never over tensor-parallel copies (which
route identically) or pipeline stages (which hold different layers).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moedit.engines.base import DistEnv
from moedit.errors import MoeditError
from moedit.engines.ddp import DDPEngine


class MegatronEngine(DDPEngine):
    name = "megatron"

    def __init__(self, env: DistEnv, device: torch.device, backend: str):
        if device.type != "cuda" and os.environ.get("MOEDIT_MEGATRON_CPU") != "1":
            raise MoeditError("parallel.engine = megatron needs CUDA GPUs: Megatron-Core hard-codes CUDA (RNG "
                              "tracker, streams, pipeline buffers); train on CPU with parallel.engine=local or ddp")
        super().__init__(env, device, backend)
        self.layout = None

    def init_model_parallel(self, layout, seed: int) -> None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
                virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
                expert_model_parallel_size=layout.expert, expert_tensor_parallel_size=layout.expert_tensor)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        self.layout = layout

    # --- groups ---------------------------------------------------------------------------
    @property
    def data_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def data_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    def all_reduce_sum_(self, tensors):
        """Sum over the data-parallel replicas (routing statistics; see the module docstring)."""
        self._flat_reduce(tensors, dist.ReduceOp.SUM, self.data_parallel_group)

    def all_reduce_sum_world_(self, tensors):
        self._flat_reduce(tensors, dist.ReduceOp.SUM)

    def average_data_parallel_(self, tensors):
        group = self.data_parallel_group
        self._flat_reduce(tensors, dist.ReduceOp.SUM, group)
        for t in tensors:
            t.div_(dist.get_world_size(group))

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shutdown(self):
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        finally:
            super().shutdown()
