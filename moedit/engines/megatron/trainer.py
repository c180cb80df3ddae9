"""The trainer on Megatron-Core: the same loop, config, data, logs and checkpoint directory as
`moedit.train.trainer.Trainer`, with one step run by Megatron's pipeline schedule.

What differs from the other engines, and why:
- the model is `MegatronDiT` (this rank's shard); it starts from the single-device model's
  initialisation (built once on the CPU from `train.seed`, then sliced), so a run starts from the
  same weights whatever the layout;
- a step is `get_forward_backward_func()` over `num_microbatches` micro-batches (1F1B when
  pipeline > 1), then Megatron's `finalize_model_grads` (data-parallel reduction, sequence-parallel
  and pipeline-shared parameters), then the optimizer on local shards;
- noise, t and label dropout are drawn from (seed, step, micro-batch, data-parallel rank): every
  tensor-parallel and pipeline peer of a replica draws the same numbers, as it must;
- the optimizer (`parallel.megatron_optimizer`): by default torch AdamW on each rank's fp32
  shards with the norm over owned shards computed here; opt-in (GPU only) Megatron's distributed
  optimizer over bf16 parameters (`Float16Module`; fp32 master weights and Adam states sharded over
  the data-parallel ranks, gradients reduce-scattered, parameters all-gathered), which also clips
  and measures the gradient norm (its resume is not yet shown exact: docs/megatron.md);
- the EMA is kept per shard in fp32; checkpoints hold the canonical `model.safetensors` /
  `ema.safetensors` (gathered, float32, so `moedit sample` and the analysis tools read them as from
  any engine) and a `megatron/` distributed checkpoint (torch_dist) of the weights, plus the
  distributed optimizer's state in model space, that resumes at any layout.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from moedit.errors import MoeditError
from moedit.train.checkpoint import load_checkpoint, resolve_resume
from moedit.train.trainer import Trainer, _mix


class _Captured(Exception):
    pass


class _StateDict:
    """Duck-typed module for CheckpointWriter: `state_dict()` of already gathered tensors."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class MegatronTrainer(Trainer):
    # --- setup ----------------------------------------------------------------------------
    def setup(self) -> "MegatronTrainer":
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel

        from moedit.engines.megatron.convert import load_canonical
        from moedit.engines.megatron.layout import resolve_layout
        from moedit.engines.megatron.model import build_megatron_model, transformer_config
        from moedit.engines.megatron.precision import ddp_config, to_bf16_module

        cfg = self.cfg
        self._check_run_dir()
        layout = resolve_layout(cfg.parallel, cfg.model, self.engine.world_size, cfg.train.global_batch_size)
        self.layout = layout
        self.engine.init_model_parallel(layout, cfg.train.seed)
        self.world = layout.data  # data-parallel replicas: what the loader and the loss means count
        self.micro_batch, self.accum_steps = layout.micro_batch, layout.num_microbatches
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.optimizer_kind = self._resolve_optimizer_kind()
        distributed = self.optimizer_kind == "distributed"
        self.params_bf16 = distributed and cfg.train.precision != "fp32"

        torch.manual_seed(cfg.train.seed)  # the single-device initialisation, sliced into shards
        canonical = super().build_model()
        config = transformer_config(cfg.model, tensor=layout.tensor, pipeline=layout.pipeline, expert=layout.expert,
                                    sequence_parallel=layout.sequence_parallel,
                                    virtual_pipeline=layout.virtual_pipeline,
                                    dtype=torch.bfloat16 if self.params_bf16 else torch.float32,
                                    use_cpu_initialization=self.device.type == "cpu")
        self.mcore_config = config
        model = build_megatron_model(cfg.model, config).to(self.device)
        module = to_bf16_module(model, config) if self.params_bf16 else model
        load_canonical(model, canonical.state_dict(), cfg.model)  # before the optimizer copies master weights
        model.set_time_convention(cfg.diffusion.objective, cfg.diffusion.num_timesteps)
        self._canonical_template = canonical  # CPU; reused to build EMA models for samples
        self.model = model
        self._mark_pipeline_copies()
        self.wrapped = DistributedDataParallel(config, ddp_config(distributed), module)
        self.optimizer = self.build_optimizer()
        # fp32 EMA of every parameter shard. Under the distributed optimizer it follows the bf16
        # parameters (cast to fp32), not the fp32 master weights: each rank holds the masters of only
        # a 1/DP slice of its shard, so following them would need an all-gather every step.
        self._ema_pairs = [(p.detach().clone().float(), p) for p in model.parameters()]
        if self.params_bf16:
            self._load_canonical_ema(canonical.state_dict())  # the fp32 initialisation, not its bf16 rounding
        self.diffusion = self.build_diffusion()
        self.data = self.build_data()
        self._term_names = self._objective_term_names()
        return self._finish_setup()

    def _resolve_optimizer_kind(self) -> str:
        """'distributed' or 'torch' from parallel.megatron_optimizer (see ParallelConfig)."""
        choice = self.cfg.parallel.megatron_optimizer
        if choice == "distributed" and self.device.type != "cuda":
            raise MoeditError(f"parallel.megatron_optimizer = distributed on {self.device.type}: Megatron's "
                              "distributed optimizer allocates on CUDA; use parallel.megatron_optimizer=torch "
                              "(or auto) without GPUs")
        if choice == "auto":  # torch until a distributed-optimizer resume is shown exact (docs/megatron.md)
            return "torch"
        return choice

    def build_optimizer(self):
        if self.optimizer_kind == "torch":
            return super().build_optimizer()
        from moedit.engines.megatron.foreach import install_foreach_kernels
        from moedit.engines.megatron.precision import distributed_optimizer

        install_foreach_kernels()  # Megatron's grad-norm fallback without Apex/TE syncs once per tensor
        o = self.cfg.optim  # lr is set every step by _set_lr (warm-up and schedule)
        return distributed_optimizer(self.wrapped, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                     clip_grad=o.grad_clip, bf16=self.params_bf16)

    def _mark_pipeline_copies(self) -> None:
        """Megatron's norm skips parameters marked `shared`: the timestep/label embedders live on every
        pipeline stage with gradients summed over stages, so only the first stage's copy counts."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_rank() == 0:
            return
        for name in ("t_embedder", "y_embedder"):
            module = getattr(self.model, name, None)
            for p in module.parameters() if module is not None else []:
                p.shared = True

    def build_data(self):
        from moedit.data import build_loader

        return build_loader(self.cfg.data, batch_size=self.micro_batch * self.accum_steps,
                            rank=self.engine.data_rank, world_size=self.world, seed=self.cfg.train.seed)

    def _objective_term_names(self) -> list[str]:
        m = self.cfg.model
        x = torch.zeros(1, m.in_channels, m.input_size, m.input_size)
        y = torch.zeros(1, dtype=torch.long)
        terms = self.diffusion.loss_terms(lambda x_t, t, y: torch.zeros(1, m.out_channels, m.input_size, m.input_size),
                                          x, y, self.diffusion.draw_t(1, None, x), torch.zeros_like(x))
        return sorted(terms)

    # --- one step -------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict]:
        x_all, y_all = self._next_batch()
        out = []
        dropout = self.cfg.model.class_dropout_prob if self.cfg.model.num_classes else 0.0
        for a in range(self.accum_steps):
            x = x_all[a::self.accum_steps].to(self.device, non_blocking=True)
            y = y_all[a::self.accum_steps].to(self.device, non_blocking=True)
            seed = _mix(self.cfg.train.seed, self.step, a * self.world + self.engine.data_rank)
            gen = torch.Generator(device=self.device).manual_seed(seed ^ 0x5EED)
            t = self.diffusion.draw_t(x.shape[0], gen, x)
            noise = torch.randn(x.shape, generator=gen, device=self.device, dtype=x.dtype)
            if dropout > 0:  # label dropout here, not in the model: every stage must agree
                drop = torch.rand(y.shape[0], generator=gen, device=self.device) < dropout
                y = torch.where(drop, torch.full_like(y, self.cfg.model.num_classes), y)
            out.append({"x": x, "y": y, "t": t, "noise": noise})
        return out

    def train_step(self) -> bool:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._set_lr()
        self.wrapped.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._micro_batches()
        terms_sum = {k: torch.zeros((), device=self.device) for k in self._term_names}
        diffusion = self.diffusion

        def forward_step(data_iterator, module):
            b = next(data_iterator)
            captured = {}

            def capture(x_t, t, y):
                captured["args"] = (x_t, t, y)
                raise _Captured

            try:
                diffusion.loss_terms(capture, b["x"], b["y"], b["t"], b["noise"])
            except _Captured:
                pass
            x_t, t, y = captured["args"]
            # bf16 parameters compute in bf16 (Megatron's recipe); autocast is for fp32 parameters
            with nullcontext() if self.params_bf16 else self._autocast():
                output = module(x_t, t=t, y=y)  # t, y by keyword: Float16Module casts positional inputs

            def loss_func(out):
                terms = diffusion.loss_terms(lambda *args: out.float(), b["x"], b["y"], b["t"], b["noise"])
                terms = {k: v.mean() for k, v in terms.items()}
                for k, v in terms.items():
                    terms_sum[k] += v.detach().float() / self.accum_steps
                return sum(terms.values()), {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[self.wrapped],
            num_microbatches=self.accum_steps, seq_length=self.cfg.model.num_tokens,
            micro_batch_size=self.micro_batch, forward_only=False)
        finalize_model_grads([self.wrapped])
        terms_sum["loss"] = sum(terms_sum[k] for k in self._term_names)
        return self._finish_step(terms_sum)

    def _owned_params(self) -> list[torch.nn.Parameter]:
        """`owned_params(self.model)`, computed once."""
        if getattr(self, "_owned", None) is None:
            self._owned = owned_params(self.model)
        return self._owned

    def optimizer_step(self) -> torch.Tensor:
        if self.optimizer_kind == "distributed":
            return self._distributed_optimizer_step()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
        grad_norm = global_grad_norm([p.grad for p in self._owned_params()], self.device)
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = (clip / (grad_norm + 1e-6)).clamp(max=1.0).to(torch.float32)
            torch._foreach_mul_([p.grad for p in params], coef)
        self.optimizer.step()
        thresholds = self.model.threshold_buffers()
        if thresholds:
            self.engine.average_data_parallel_(thresholds)
        self.update_ema()
        return grad_norm.float()

    def _distributed_optimizer_step(self) -> torch.Tensor:
        """Megatron's step: main grads copied from the reduce-scattered buffer, the global norm over
        every parameter's main replica (all ranks), clipping to optim.grad_clip, AdamW on this rank's
        fp32 master slices, bf16 parameters updated and all-gathered."""
        ok, grad_norm, _ = self.optimizer.step()
        assert ok, "bf16 and fp32 steps have no loss scaler that could reject a step"
        if not grad_norm:  # Megatron measures the norm only when it clips (optim.grad_clip > 0)
            grad_norm = self.optimizer.get_grad_norm()  # the main grads are kept until the next step
        self._optimizer_stepped = True
        thresholds = self.model.threshold_buffers()
        if thresholds:
            self.engine.average_data_parallel_(thresholds)
        self.update_ema()
        return torch.tensor(float(grad_norm), device=self.device)

    @torch.no_grad()
    def update_ema(self) -> None:
        ema, live = zip(*self._ema_pairs)  # live: bf16 parameters under the distributed optimizer, cast here
        torch._foreach_lerp_(list(ema), [t.float() for t in live], 1.0 - self.cfg.train.ema_decay)

    @contextmanager
    def _parameters_as_ema(self):
        """The model's parameter slots temporarily hold the fp32 EMA tensors (not copies rounded to the
        parameter dtype): gathers and loads through the model's sharded state dict then read or fill
        the EMA. The slots are swapped, not `p.data`: setting a bf16 parameter's data to an fp32 tensor
        resets its gradient accumulator, and with it the hook through which Megatron DDP collects
        the gradient (every later gradient would be lost)."""
        ema_of = {id(p): e for e, p in self._ema_pairs}
        slots = [(module, name, p) for module in self.model.modules() for name, p in module._parameters.items()
                 if p is not None and id(p) in ema_of]
        for module, name, p in slots:
            module._parameters[name] = ema_of[id(p)]
        try:
            yield
        finally:
            for module, name, p in slots:
                module._parameters[name] = p

    def _load_canonical_ema(self, state: dict[str, torch.Tensor]) -> None:
        from moedit.engines.megatron.convert import load_canonical

        with self._parameters_as_ema():
            load_canonical(self.model, state, self.cfg.model)

    def _handle_nonfinite(self, bad_term: str | None) -> None:
        self.wrapped.zero_grad_buffer()
        super()._handle_nonfinite(bad_term)

    # --- logging --------------------------------------------------------------------------
    def log_interval(self) -> None:
        from moedit.engines import reduce_routing_stats
        from megatron.core import parallel_state

        from moedit.models.stats import snapshot_routing_stats

        steps = max(self._interval_steps, 1)
        names = sorted(self._interval)
        sums = torch.stack([self._interval[k] for k in names]).cpu() if names else torch.zeros(0)
        if not self.is_last_stage:
            sums = torch.zeros_like(sums)  # losses exist on the last stage only
        values = torch.cat([sums.double(), torch.tensor([self._data_wait], dtype=torch.float64)]).to(self.device)
        self.engine.all_reduce_sum_world_([values])
        values = values.cpu().tolist()
        copies = self.world * self.layout.tensor  # last-stage ranks holding each replica's loss
        means = {k: float(v) / (steps * copies) for k, v in zip(names, values)}
        means["grad_norm"] = means.get("grad_norm", 0.0)
        has_stats = bool(self.model.moe_layers())
        stats = None
        if has_stats:
            reduce_routing_stats(self.model, self.engine)
            local = snapshot_routing_stats(self.model, reset=True)
            first_copy = parallel_state.get_tensor_model_parallel_rank() == 0 and self.engine.data_rank == 0
            gathered = self.engine.all_gather_object(local["layers"] if first_copy else [])
            layers = sorted((layer for part in gathered for layer in part), key=lambda layer: layer["block"])
            stats = {"noise_bin_edges": local["noise_bin_edges"], "layers": layers}
        self._write_interval(means, float(values[-1]), self._threshold_spread(), stats)

    def _threshold_spread(self) -> float | None:
        thresholds = self.model.threshold_buffers()
        if self.world == 1:
            return None
        # over the world: every rank joins, a stage without MoE layers contributes a zero
        flat = torch.cat([t.detach().reshape(-1).double() for t in thresholds]) if thresholds else \
            torch.zeros(1, dtype=torch.float64, device=self.device)
        high, neg_low = flat.clone(), -flat
        self.engine.all_reduce_max_([high, neg_low])
        return float((high + neg_low).max())

    def _instantiated_params(self) -> int:
        return sum(p.numel() for p in self._canonical_template.parameters())  # the whole model, not a shard

    def _model_info(self) -> dict:
        info = super()._model_info()
        info["layout"] = {k: getattr(self.layout, k) for k in ("tensor", "pipeline", "expert", "data",
                                                               "sequence_parallel", "micro_batch", "num_microbatches")}
        return info

    # --- canonical weights, samples, checkpoints --------------------------------------------
    @torch.no_grad()
    def canonical_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The single-device state dict of the live (or EMA) weights on rank 0 ({} elsewhere); collective."""
        from moedit.engines.megatron.convert import gather_global, global_to_canonical

        # float32 either way: gather_global casts bf16 parameters (exactly) to float32
        with self._parameters_as_ema() if ema else nullcontext():
            return global_to_canonical(gather_global(self.model, dst=0), self.cfg.model)

    def _full_state(self, ema: bool) -> dict[str, torch.Tensor]:
        """Canonical state on rank 0 ({} elsewhere); entries the gather does not cover come from the
        single-device template. Collective."""
        gathered = self.canonical_state(ema)
        if not self.engine.is_main:
            return {}
        state = {k: v.clone() for k, v in self._canonical_template.state_dict().items()}
        state.update(gathered)
        return state

    def write_samples(self) -> None:
        if not self.cfg.train.num_sample_images:
            return
        state = self._full_state(ema=True)  # collective: rank 0 assembles
        if not self.engine.is_main:
            return
        from moedit.models import build_model

        model = build_model(self.cfg.model)
        model.load_state_dict(state)
        model.set_time_convention(self.cfg.diffusion.objective, self.cfg.diffusion.num_timesteps)
        self.ema = model.to(self.device).eval()
        try:
            super().write_samples()
        finally:
            self.ema = None

    def save_checkpoint(self, name: str | None = None) -> Path:
        import yaml
        from megatron.core import dist_checkpointing

        from moedit.train.config import config_to_dict

        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        live, ema = self._full_state(ema=False), self._full_state(ema=True)
        trainer_state = {"step": self.step, "skipped_steps": self.skipped_steps}
        rank_state = {"data": self.data.state_dict(), "data_rank": self.engine.data_rank,
                      "ema": [e.cpu() for e, _ in self._ema_pairs]}
        rank = self.engine.rank
        distributed = self.optimizer_kind == "distributed"
        with_optimizer = not distributed or self._optimizer_stepped  # Megatron's state_dict needs a first step

        def engine_state(directory: Path):
            (directory / "megatron").mkdir(exist_ok=True)
            self.engine.barrier()
            state = self.model.sharded_state_dict()
            files = ["megatron"]
            if distributed and with_optimizer:
                # model space (_OPTIMIZER_FORMAT): another layout can reshard it
                state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=False,
                                                                       metadata=_OPTIMIZER_FORMAT)
            dist_checkpointing.save(state, str(directory / "megatron"))
            if not distributed:
                torch.save(self.optimizer.state_dict(), directory / f"optim_{rank:05d}.pt")
                files += [f"optim_{r:05d}.pt" for r in range(self.engine.world_size)]
            entries = {"layout": _layout_dict(self.layout), "megatron_optimizer": self.optimizer_kind,
                       "optimizer_state": with_optimizer, "param_dtype": self._param_dtype_name()}
            return entries, files

        return self.writer.save(self.step, _StateDict(live), _StateDict(ema), trainer_state, rank_state, text,
                                name=name, engine_state=engine_state)

    def _param_dtype_name(self) -> str:
        return "bfloat16" if self.params_bf16 else "float32"

    def _data_state(self, ckpt: Path, mine: dict) -> dict:
        """The loader state of this data-parallel rank (its global rank may differ after a relayout)."""
        if mine is not None and mine.get("data_rank") == self.engine.data_rank:
            return mine["data"]
        for path in sorted(ckpt.glob("rank_*.pt")):
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("data_rank") == self.engine.data_rank:
                return blob["data"]
        raise MoeditError(f"{ckpt}: no loader state for data-parallel rank {self.engine.data_rank}")

    def resume(self) -> None:
        from megatron.core import dist_checkpointing

        from moedit.engines.megatron.convert import load_canonical

        self._optimizer_stepped = False
        ckpt = resolve_resume(self.cfg.train.resume, self.run_dir)
        self._data_iter = None
        if ckpt is None:
            return
        blob = load_checkpoint(ckpt, self.engine.rank)
        meta, state = blob["meta"], blob["state"]
        megatron = not meta.get("imported") and meta.get("engine") == "megatron"
        saved_dtype = state.get("param_dtype", "float32")  # checkpoints before bf16 parameters: float32
        if not megatron or saved_dtype != self._param_dtype_name():
            # weights from another engine, an import or another parameter dtype: the canonical
            # (float32) files; fresh optimizer
            load_canonical(self.model, blob["model"], self.cfg.model)
            self._load_canonical_ema(blob["ema"])
            self._refresh_master_weights()
            if self.engine.is_main:
                source = f"engine {meta.get('engine', 'import')}" if not megatron else f"{saved_dtype} parameters"
                print(f"initialised from the canonical weights of {ckpt} ({source}); optimizer state starts fresh",
                      flush=True)
            if meta.get("imported"):
                return
        else:
            same_layout = state.get("layout") == _layout_dict(self.layout) and meta["world_size"] == self.engine.world_size
            loaded = dist_checkpointing.load(self.model.sharded_state_dict(), str(ckpt / "megatron"))
            self.model.load_state_dict({k: v for k, v in loaded.items()
                                        if k != "optimizer" and not k.endswith("_extra_state")}, strict=False)
            optimizer = self._load_optimizer(ckpt, state, same_layout)
            if same_layout:
                for (e, _), saved in zip(self._ema_pairs, blob["rank"]["ema"]):
                    e.copy_(saved)
            else:
                self._load_canonical_ema(blob["ema"])  # resharded through the canonical file
            if self.engine.is_main and (not same_layout or optimizer != "restored"):
                print(f"{ckpt}: saved at layout {state.get('layout')} with the {state.get('megatron_optimizer', 'torch')}"
                      f" optimizer, resumed at {_layout_dict(self.layout)} with the {self.optimizer_kind} optimizer: "
                      f"weights {'loaded' if same_layout else 'resharded'}, optimizer state {optimizer}", flush=True)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        saved_world = state.get("layout", {}).get("data", meta["world_size"])
        if saved_world == self.world:
            self.data.load_state_dict(self._data_state(ckpt, blob["rank"]))
        elif self.engine.is_main:
            print(f"{ckpt}: saved with {saved_world} data-parallel replicas, resumed with {self.world}: the data "
                  "stream restarts its order (exact data resume needs the same number)", flush=True)
        if self.engine.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def _load_optimizer(self, ckpt: Path, state: dict, same_layout: bool) -> str:
        """Restore the optimizer from `ckpt` where its state fits; returns 'restored', 'resharded' or
        'starts fresh'. Collective (every rank returns the same)."""
        saved_kind = state.get("megatron_optimizer", "torch")
        if saved_kind != self.optimizer_kind or not state.get("optimizer_state", True):
            self._refresh_master_weights()
            return "starts fresh"
        if self.optimizer_kind == "torch":
            if not same_layout:  # per-rank state of the old shards
                return "starts fresh"
            self.optimizer.load_state_dict(torch.load(ckpt / f"optim_{self.engine.rank:05d}.pt",
                                                      map_location=self.device, weights_only=True))
            self._optimizer_stepped = True
            return "restored"
        failure = self._load_distributed_optimizer(ckpt, reraise=same_layout)
        if failure is not None:
            if self.engine.is_main:
                print(f"{ckpt}: the distributed optimizer state did not reshard to this layout ({failure})",
                      flush=True)
            self._reset_optimizer_states()
            self._refresh_master_weights()
            return "starts fresh"
        self._optimizer_stepped = True
        return "restored" if same_layout else "resharded"

    def _load_distributed_optimizer(self, ckpt: Path, reraise: bool) -> str | None:
        """Master weights, Adam moments and step from the `megatron/` checkpoint (model space, so any
        layout); None, or the first error of any rank when `reraise` is False. Collective."""
        from megatron.core import dist_checkpointing

        from moedit.engines.megatron.precision import allocate_optimizer_states, load_optimizer_state

        error = None
        try:
            allocate_optimizer_states(self.optimizer)
            request = {"optimizer": self.optimizer.sharded_state_dict(self.model.sharded_state_dict(), is_loading=True,
                                                                      metadata=_OPTIMIZER_FORMAT)}
            loaded = dist_checkpointing.load(request, str(ckpt / "megatron"))
            load_optimizer_state(self.optimizer, loaded["optimizer"])
        except Exception as exc:  # noqa: BLE001 - a relayout falls back to a fresh optimizer, agreed below
            if reraise:
                raise
            error = f"{type(exc).__name__}: {exc}"
        errors = self.engine.all_gather_object(error)
        return next((e for e in errors if e is not None), None)

    def _reset_optimizer_states(self) -> None:
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if getattr(opt, "optimizer", None) is not None:
                opt.optimizer.state.clear()

    def _refresh_master_weights(self) -> None:
        """After the parameters changed outside the optimizer: the distributed optimizer's fp32 master
        weights start again from them (bf16 parameters: their exact fp32 values)."""
        if self.optimizer_kind == "distributed":
            self.optimizer.reload_model_params()


# Model-space optimizer state: at save the data-parallel ranks all-gather their slices into
# parameter-shaped tensors keyed like the parameters (saved once, by the main replica); at load
# each rank reads its parameters' tensors and keeps its slice, so any layout can read it. (0.16.1's
# fully_sharded_model_space needs flattened ShardedTensors, which its dist_checkpointing refuses.)
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _layout_dict(layout) -> dict:
    return {k: getattr(layout, k) for k in ("tensor", "pipeline", "expert", "expert_tensor", "data",
                                             "virtual_pipeline", "sequence_parallel")}


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
    dist.all_reduce(sq)
    return sq.sqrt()


__all__ = ["MegatronTrainer"]
