"""`parallel.engine = megatron`: the trainer's loop on Megatron-Core.

GPU only: Megatron-Core hard-codes CUDA in a few places. moedit's CPU tests run it on gloo with
those places stubbed (tests/megatron/cpu_stubs.py) and MOEDIT_MEGATRON_CPU=1; nothing else should.

What differs from the default engine hooks (moedit/engines/base.py), and why:
- `plan` resolves the layout and builds Megatron's model-parallel grid; the data-parallel
  collectives run over Megatron's data-parallel group, so routing statistics are summed over
  replicas that saw different tokens and never over tensor-parallel copies (which route
  identically) or pipeline stages (which hold different layers);
- `build` makes `MegatronDiT` (this rank's shard) from the single-device model's initialisation
  (built once on the CPU from `train.seed`, then sliced), so a run starts from the same weights
  whatever the layout;
- `forward_backward` is `get_forward_backward_func()` over the micro-batches (1F1B when
  pipeline > 1), then Megatron's `finalize_model_grads` (data-parallel reduction, sequence-parallel
  and pipeline-shared parameters). The objective's terms exist on the last stage, the auxiliary
  terms on the stages that hold MoE layers and REPA's on the stage that holds block repa_depth
  (their gradient enters through MoEAuxLossAutoScaler);
- the optimizer (`parallel.megatron_optimizer`): by default torch AdamW on each rank's fp32
  shards with the norm over owned shards computed here; opt-in (GPU only) Megatron's distributed
  optimizer over bf16 parameters (`Float16Module`; fp32 master weights and Adam states sharded over
  the data-parallel ranks), which also clips and measures the gradient norm;
- the EMA is kept per shard in fp32; the canonical weights of checkpoints and samples are gathered
  on the main rank (moedit/engines/megatron/checkpoint.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from moedit.engines.base import DistEnv, _found_inf, adamw
from moedit.engines.ddp import DDPEngine
from moedit.engines.megatron.checkpoint import MegatronCheckpointing
from moedit.errors import MoeditError


class MegatronEngine(MegatronCheckpointing, DDPEngine):
    name = "megatron"

    def __init__(self, env: DistEnv, device: torch.device, backend: str, parallel_cfg=None):
        if device.type != "cuda" and os.environ.get("MOEDIT_MEGATRON_CPU") != "1":
            raise MoeditError("parallel.engine = megatron needs CUDA GPUs: Megatron-Core hard-codes CUDA (RNG "
                              "tracker, streams, pipeline buffers); train on CPU with parallel.engine=local or ddp")
        super().__init__(env, device, backend)
        self.parallel_cfg = parallel_cfg
        self.layout = None
        self._owned = None

    @property
    def graph_capturable(self) -> bool:
        """train.cuda_graph: one process (no pipeline schedule across ranks, no data-parallel
        reduction) with the torch AdamW, whose step the graph can mask."""
        return self.world_size == 1 and self.optimizer_kind == "torch"

    # --- layout and groups ------------------------------------------------------------------
    def plan(self, model_cfg, global_batch, micro_batch, seed):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from moedit.engines.megatron.layout import resolve_layout

        layout = resolve_layout(self.parallel_cfg, model_cfg, self.world_size, global_batch)
        if layout.virtual_pipeline:  # Megatron asks for one model chunk per virtual stage; moedit builds one
            raise MoeditError(f"parallel.virtual_pipeline = {layout.virtual_pipeline}: the megatron engine builds one "
                              "model chunk per pipeline stage, so the interleaved schedule is not supported; set "
                              "parallel.virtual_pipeline=null (the plain 1F1B schedule)")
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
                virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
                expert_model_parallel_size=layout.expert, expert_tensor_parallel_size=layout.expert_tensor)
        model_parallel_cuda_manual_seed(seed)
        self.layout = layout
        return layout.micro_batch, layout.num_microbatches

    @property
    def data_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def data_world(self) -> int:
        return self.layout.data

    @property
    def data_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def loss_copies(self) -> int:
        return self.layout.tensor  # every TP rank of the last stage computes the loss on the full output

    def describe(self):
        keys = ("tensor", "pipeline", "expert", "data", "sequence_parallel", "micro_batch", "num_microbatches")
        return {"layout": {k: getattr(self.layout, k) for k in keys}}

    # --- building -----------------------------------------------------------------------------
    def build(self, build_model, model_cfg, optim_cfg, *, micro_batch_size, accum_steps, autocast_bf16,
              precision="auto", compile=False):
        from megatron.core.distributed import DistributedDataParallel

        from moedit.engines.megatron.convert import load_canonical
        from moedit.engines.megatron.model import build_megatron_model, transformer_config
        from moedit.engines.megatron.precision import ddp_config, to_bf16_module

        if compile:
            raise MoeditError("train.compile = true with parallel.engine = megatron: not supported; set train.compile=false")
        layout, self.model_cfg, self.optim_cfg = self.layout, model_cfg, optim_cfg
        self.micro_batch, self.optimizer_kind = micro_batch_size, self._resolve_optimizer_kind()
        distributed = self.optimizer_kind == "distributed"
        self.params_bf16 = distributed and precision != "fp32"
        self.forward_autocast = not self.params_bf16  # bf16 parameters compute in bf16 (Megatron's recipe)
        canonical = build_model()  # the single-device initialisation, sliced into shards below
        config = transformer_config(model_cfg, tensor=layout.tensor, pipeline=layout.pipeline, expert=layout.expert,
                                    sequence_parallel=layout.sequence_parallel,
                                    virtual_pipeline=layout.virtual_pipeline,
                                    dtype=torch.bfloat16 if self.params_bf16 else torch.float32,
                                    use_cpu_initialization=self.device.type == "cpu")
        model = build_megatron_model(model_cfg, config).to(self.device)
        module = to_bf16_module(model, config) if self.params_bf16 else model
        load_canonical(model, canonical.state_dict(), model_cfg)  # before the optimizer copies master weights
        model.set_time_convention(canonical.time_convention, canonical.num_timesteps)
        self._canonical_template = canonical  # CPU; its buffers fill what the gather does not cover
        self.model = model
        self._mark_pipeline_copies()
        self.wrapped = DistributedDataParallel(config, ddp_config(distributed), module)
        self.optimizer = self._build_optimizer()
        # fp32 EMA of every parameter shard and floating state buffer (DiffMoE thresholds; not the
        # routing statistics), as on the other engines. Under the distributed optimizer it follows
        # the bf16 parameters (cast to fp32), not the fp32 master weights: each rank holds the masters
        # of only a 1/DP slice of its shard, so following them would need an all-gather every step.
        self._ema_pairs = [(t.detach().clone().float(), t) for t in ema_tracked(model)]
        if self.params_bf16:
            self._load_canonical_ema(canonical.state_dict())  # the fp32 initialisation, not its bf16 rounding
        self._optimizer_stepped = False

    def _resolve_optimizer_kind(self) -> str:
        """'distributed' or 'torch' from parallel.megatron_optimizer (see ParallelConfig)."""
        choice = self.parallel_cfg.megatron_optimizer
        if choice == "distributed" and self.device.type != "cuda":
            raise MoeditError(f"parallel.megatron_optimizer = distributed on {self.device.type}: Megatron's "
                              "distributed optimizer allocates on CUDA; use parallel.megatron_optimizer=torch "
                              "(or auto) without GPUs")
        return "torch" if choice == "auto" else choice  # auto: until a distributed resume is shown exact

    def _build_optimizer(self):
        if self.optimizer_kind == "torch":
            return adamw([p for p in self.model.parameters() if p.requires_grad], self.optim_cfg,
                         fused=self.device.type in ("cuda", "cpu"))
        from moedit.engines.megatron.foreach import install_foreach_kernels
        from moedit.engines.megatron.precision import distributed_optimizer

        install_foreach_kernels()  # Megatron's grad-norm fallback without Apex/TE syncs once per tensor
        o = self.optim_cfg  # lr is set every step by the trainer (warm-up and schedule)
        return distributed_optimizer(self.wrapped, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                     clip_grad=o.grad_clip, bf16=self.params_bf16)

    def _mark_pipeline_copies(self) -> None:
        """Megatron's norm skips parameters marked `shared`: the timestep/label/caption embedders live on
        every pipeline stage with gradients summed over stages, so only the first stage's copy counts."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_rank() == 0:
            return
        for module in self.model.conditioning_embedders():
            for p in module.parameters():
                p.shared = True

    def instantiated_params(self) -> int:
        return sum(p.numel() for p in self._canonical_template.parameters())  # the whole model, not a shard

    # --- one step -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.wrapped.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, micro_batches, forward, objective):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}

        def add(terms: dict[str, torch.Tensor]) -> None:
            for k, v in terms.items():
                sums[k] = sums[k] + v.detach().float() / n if k in sums else v.detach().float() / n

        def forward_step(data_iterator, module):
            batch = next(data_iterator)
            output = forward(module, batch)
            add(self.model.aux_losses())  # this stage's MoE layers

            def loss_func(out):  # the last stage only
                terms = objective(out, batch)
                add(terms)
                return sum(terms.values()), {}

            return output, loss_func

        # The weight of the terms added through MoEAuxLossAutoScaler (MoE layers, REPA): 1 / n, as the
        # schedule's objective. The schedule sets it only for MoE models; a dense REPA model needs it too.
        MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 1.0 / n, device=self.device))
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.wrapped],
            num_microbatches=n, seq_length=self.model_cfg.num_tokens, micro_batch_size=self.micro_batch,
            forward_only=False)
        finalize_model_grads([self.wrapped])
        return sums

    def optimizer_step(self, grad_clip, found_inf=None):
        self._optimizer_stepped = True
        if self.optimizer_kind == "distributed":
            # Megatron's step: main grads from the reduce-scattered buffer, the global norm, clipping,
            # AdamW on this rank's fp32 master slices, bf16 parameters updated and all-gathered.
            ok, grad_norm, _ = self.optimizer.step()
            assert ok, "bf16 and fp32 steps have no loss scaler that could reject a step"
            if not grad_norm:  # Megatron measures the norm only when it clips (optim.grad_clip > 0)
                grad_norm = self.optimizer.get_grad_norm()  # the main grads are kept until the next step
            return torch.tensor(float(grad_norm), device=self.device)
        params = self._trainable(self.model)
        for p in params:
            p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
        if self._owned is None:
            self._owned = owned_params(self.model)
        grad_norm = global_grad_norm([p.grad for p in self._owned], self.device)
        if grad_clip > 0:
            coef = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0).to(torch.float32)
            torch._foreach_mul_([p.grad for p in params], coef)
        with _found_inf(self.optimizer, found_inf):
            self.optimizer.step()
        return grad_norm.float()

    def prepare_capture(self, stream) -> None:
        """Megatron DDP keeps every parameter's gradient accumulator, with its hook, alive from its
        construction, and autograd runs an accumulator on the stream it was made on: made on the
        default stream, a captured backward would wait on a stream CUDA cannot capture. So they are
        made again on `stream` (the old ones, and their hooks, are dropped first)."""
        ddp = self.wrapped
        ddp.grad_accs.clear()
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for param in ddp.module.parameters():
                if param.requires_grad:
                    accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
                    accumulator.register_hook(ddp._make_backward_post_hook(param))
                    ddp.grad_accs.append(accumulator)

    def discard_step(self) -> None:
        self.wrapped.zero_grad_buffer()
        super().discard_step()

    @contextmanager
    def _parameters_as_ema(self):
        """The model's parameter (and tracked buffer) slots temporarily hold the fp32 EMA tensors (not
        copies rounded to the parameter dtype): gathers and loads through the model's sharded state
        dict then read or fill the EMA. The slots are swapped, not `p.data`: setting a bf16 parameter's
        data to an fp32 tensor resets its gradient accumulator, and with it the hook through which
        Megatron DDP collects the gradient (every later gradient would be lost)."""
        ema_of = {id(p): e for e, p in self._ema_pairs}
        slots = [(table, name, p) for module in self.model.modules() for table in (module._parameters, module._buffers)
                 for name, p in table.items() if p is not None and id(p) in ema_of]
        for table, name, p in slots:
            table[name] = ema_of[id(p)]
        try:
            yield
        finally:
            for table, name, p in slots:
                table[name] = p

    # --- collectives and logging --------------------------------------------------------------
    def routing_stats(self):
        """Every stage's layers, summed over its replicas, assembled on every rank."""
        from megatron.core import parallel_state

        local = super().routing_stats()
        first_copy = parallel_state.get_tensor_model_parallel_rank() == 0 and self.data_rank == 0
        gathered = self.all_gather_object(local["layers"] if first_copy else [])
        layers = sorted((layer for part in gathered for layer in part), key=lambda layer: layer["block"])
        return {"noise_bin_edges": local["noise_bin_edges"], "layers": layers}

    def shutdown(self):
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        finally:
            super().shutdown()


def ema_tracked(model) -> list[torch.Tensor]:
    """What the EMA follows: every parameter and every floating buffer of the state dict except the
    routing statistics (so the DiffMoE thresholds, as `moedit.engines.base.ema_tensor_pairs`)."""
    from moedit.models.stats import routing_stat_tensors

    stats = {id(t) for t in routing_stat_tensors(model)}
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    return list(model.parameters()) + [b for b in model.buffers()
                                       if b.is_floating_point() and id(b) not in stats and id(b) in persistent]


def owned_params(model) -> list[torch.nn.Parameter]:
    """The parameters whose shard is the main replica (replica id all zeros): summed over all
    ranks, their squared gradients count each global gradient element once."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    by_ptr = {p.data_ptr(): p for p in model.parameters() if p.requires_grad}
    owned = []
    for sh in model.sharded_state_dict().values():
        replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        if isinstance(sh, ShardedTensor) and not any(replica) and sh.data.data_ptr() in by_ptr:
            owned.append(by_ptr[sh.data.data_ptr()])
    return owned


def global_grad_norm(owned_grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm (float64) of the global gradient from every rank's `owned_params` gradients; collective."""
    norms = torch._foreach_norm(owned_grads) if owned_grads else [torch.zeros((), device=device)]
    sq = torch.stack(norms).double().pow(2).sum()
    if dist.get_world_size() > 1:  # one process: nothing to sum (and no collective in a captured step)
        dist.all_reduce(sq)
    return sq.sqrt()


__all__ = ["MegatronEngine", "ema_tracked", "global_grad_norm", "owned_params"]
