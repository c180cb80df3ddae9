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
- the EMA is kept per shard; checkpoints hold the canonical `model.safetensors` /
  `ema.safetensors` (gathered, so `moedit sample` and the analysis tools read them as from any
  engine) and a `megatron/` distributed checkpoint (torch_dist) that resumes at any layout.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from moedit.errors import MoeditError
from moedit.train.checkpoint import CheckpointWriter, load_checkpoint, resolve_resume
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
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from moedit.engines.megatron.convert import load_canonical
        from moedit.engines.megatron.layout import resolve_layout
        from moedit.engines.megatron.model import build_megatron_model, transformer_config

        cfg = self.cfg
        self._check_run_dir()
        layout = resolve_layout(cfg.parallel, cfg.model, self.engine.world_size, cfg.train.global_batch_size)
        self.layout = layout
        self.engine.init_model_parallel(layout, cfg.train.seed)
        self.world = layout.data  # data-parallel replicas: what the loader and the loss means count
        self.micro_batch, self.accum_steps = layout.micro_batch, layout.num_microbatches
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

        torch.manual_seed(cfg.train.seed)  # the single-device initialisation, sliced into shards
        canonical = super().build_model()
        config = transformer_config(cfg.model, tensor=layout.tensor, pipeline=layout.pipeline, expert=layout.expert,
                                    sequence_parallel=layout.sequence_parallel,
                                    virtual_pipeline=layout.virtual_pipeline,
                                    use_cpu_initialization=self.device.type == "cpu")
        self.mcore_config = config
        model = build_megatron_model(cfg.model, config).to(self.device)
        load_canonical(model, canonical.state_dict(), cfg.model)
        model.set_time_convention(cfg.diffusion.objective, cfg.diffusion.num_timesteps)
        self._canonical_template = canonical  # CPU; reused to build EMA models for samples
        self.model = model
        self.wrapped = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False), model)
        self.optimizer = self.build_optimizer()
        self._ema_pairs = [(p.detach().clone().float(), p) for p in model.parameters()]
        self.diffusion = self.build_diffusion()
        self.data = self.build_data()
        self.writer = CheckpointWriter(self.run_dir / "checkpoints", self.engine, cfg.checkpoint.keep_last,
                                       cfg.checkpoint.keep_every)
        self._term_names = self._objective_term_names()
        self.resume()
        self.logger = None
        if self.engine.is_main:
            from moedit.train.config import dump_config
            from moedit.train.logging import RunLogger

            dump_config(cfg, self.run_dir / "config.yaml")
            self._write_model_info()
            self.logger = RunLogger(self.run_dir, cfg.train.steps, self.step, cfg.logging.tensorboard,
                                    cfg.logging.progress)
        return self

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
            with self._autocast():
                output = module(*captured["args"])

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
        bad = [k for k in self._term_names + ["loss"] if not torch.isfinite(terms_sum[k])]
        flags = torch.tensor([float(bool(bad)), float(self._stop_signal is not None)], device=self.device)
        self.engine.all_reduce_max_([flags])
        nonfinite, stop = (bool(f) for f in flags.tolist())
        if nonfinite:
            self._handle_nonfinite(bad[0] if bad else None)
        else:
            terms_sum["grad_norm"] = self.optimizer_step()
        self.step += 1
        if not nonfinite:
            for k, v in terms_sum.items():
                self._interval[k] = self._interval.get(k, 0.0) + v.double()
            self._interval_steps += 1
        return stop

    def _owned_params(self) -> list[torch.nn.Parameter]:
        """The parameters whose shard is the main replica (replica id all zeros): summed over all
        ranks, their squared gradients count each global gradient element once. Computed once."""
        if getattr(self, "_owned", None) is None:
            from megatron.core.dist_checkpointing.mapping import ShardedTensor

            by_ptr = {p.data_ptr(): p for p in self.model.parameters() if p.requires_grad}
            self._owned = []
            for sh in self.model.sharded_state_dict().values():
                replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                if isinstance(sh, ShardedTensor) and not any(replica) and sh.data.data_ptr() in by_ptr:
                    self._owned.append(by_ptr[sh.data.data_ptr()])
        return self._owned

    def optimizer_step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
        owned = [p.grad for p in self._owned_params()]
        norms = torch._foreach_norm(owned) if owned else [torch.zeros((), device=self.device)]
        sq = torch.stack(norms).double().pow(2).sum()
        dist.all_reduce(sq)
        grad_norm = sq.sqrt()
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

    @torch.no_grad()
    def update_ema(self) -> None:
        ema, live = zip(*self._ema_pairs)
        torch._foreach_lerp_(list(ema), [t.float() for t in live], 1.0 - self.cfg.train.ema_decay)

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
        spread = self._threshold_spread()
        now = time.time()
        elapsed, self._last_log_time = now - self._last_log_time, now
        if self.engine.is_main:
            metrics = {k if k in ("loss", "grad_norm") else f"loss/{k}": v for k, v in means.items()}
            metrics.update(self._throughput(steps * self.cfg.train.global_batch_size, elapsed))
            if "mfu" in metrics:  # per GPU: the base divides by data-parallel replicas only
                metrics["mfu"] *= self.world / self.engine.world_size
            metrics["lr"] = self.lr
            metrics["data_wait_s"] = float(values[-1]) / self.engine.world_size
            metrics["skipped_steps"] = self.skipped_steps
            metrics["world_size"] = self.engine.world_size
            metrics["images_seen"] = self.step * self.cfg.train.global_batch_size
            if spread is not None:
                metrics["dp/threshold_max_diff"] = spread
            self.logger.log_metrics(self.step, metrics)
            if stats is not None:
                self.logger.log_routing(self.step, stats)
        self._interval.clear()
        self._interval_steps = 0
        self._data_wait = 0.0

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

        if not ema:
            return global_to_canonical(gather_global(self.model, dst=0), self.cfg.model)
        live = [p.detach().clone() for _, p in self._ema_pairs]
        for e, p in self._ema_pairs:
            p.copy_(e)
        try:
            return global_to_canonical(gather_global(self.model, dst=0), self.cfg.model)
        finally:
            for saved, (_, p) in zip(live, self._ema_pairs):
                p.copy_(saved)

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

        def engine_state(directory: Path):
            (directory / "megatron").mkdir(exist_ok=True)
            self.engine.barrier()
            dist_checkpointing.save(self.model.sharded_state_dict(), str(directory / "megatron"))
            torch.save(self.optimizer.state_dict(), directory / f"optim_{rank:05d}.pt")
            files = ["megatron"] + [f"optim_{r:05d}.pt" for r in range(self.engine.world_size)]
            return {"layout": _layout_dict(self.layout)}, files

        return self.writer.save(self.step, _StateDict(live), _StateDict(ema), trainer_state, rank_state, text,
                                name=name, engine_state=engine_state)

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

        ckpt = resolve_resume(self.cfg.train.resume, self.run_dir)
        self._data_iter = None
        if ckpt is None:
            return
        blob = load_checkpoint(ckpt, self.engine.rank)
        meta, state = blob["meta"], blob["state"]

        def load_ema_from_canonical():
            load_canonical(self.model, blob["ema"], self.cfg.model)
            for e, p in self._ema_pairs:
                e.copy_(p.float())
            load_canonical(self.model, blob["model"], self.cfg.model)

        if meta.get("imported") or meta.get("engine") != "megatron":
            # weights from another engine or an import: canonical files, fresh optimizer
            load_ema_from_canonical()
            if self.engine.is_main:
                print(f"initialised from the canonical weights of {ckpt} (engine {meta.get('engine', 'import')}); "
                      f"optimizer state starts fresh", flush=True)
            if meta.get("imported"):
                return
        else:
            same_layout = state.get("layout") == _layout_dict(self.layout) and meta["world_size"] == self.engine.world_size
            loaded = dist_checkpointing.load(self.model.sharded_state_dict(), str(ckpt / "megatron"))
            self.model.load_state_dict({k: v for k, v in loaded.items() if not k.endswith("_extra_state")},
                                       strict=False)
            if same_layout:
                self.optimizer.load_state_dict(torch.load(ckpt / f"optim_{self.engine.rank:05d}.pt",
                                                          map_location=self.device, weights_only=True))
                for (e, _), saved in zip(self._ema_pairs, blob["rank"]["ema"]):
                    e.copy_(saved)
            else:
                # resharded: weights through dist_checkpointing, EMA through the canonical file;
                # the per-rank optimizer state belongs to the old layout
                live = [p.detach().clone() for _, p in self._ema_pairs]
                load_ema_from_canonical()
                for saved, (_, p) in zip(live, self._ema_pairs):
                    p.data.copy_(saved)
                if self.engine.is_main:
                    print(f"{ckpt}: saved at layout {state.get('layout')}, resumed at {_layout_dict(self.layout)}: "
                          "weights resharded, optimizer state starts fresh", flush=True)
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


def _layout_dict(layout) -> dict:
    return {k: getattr(layout, k) for k in ("tensor", "pipeline", "expert", "expert_tensor", "data",
                                             "virtual_pipeline", "sequence_parallel")}


__all__ = ["MegatronTrainer"]
