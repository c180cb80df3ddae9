"""The trainer: a class of small methods around one `forward_backward_step`.

Determinism: every micro-batch seeds its own noise and label dropout from
(seed, step, global micro-batch index), where the global index of micro-batch `a` on rank `r`
is `a * world_size + r`. So a run resumed from a checkpoint, or a run on N ranks against one
rank accumulating N micro-batches, sees the same noise for the same samples.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path


import torch

from moedit.engines import build_engine, reduce_routing_stats
from moedit.errors import MoeditError
from moedit.train.checkpoint import CheckpointWriter, load_checkpoint, resolve_resume
from moedit.train.config import Config

PREEMPTED_EXIT_CODE = 143


class NonFiniteLoss(MoeditError):
    pass


class Trainer:
    def __init__(self, cfg: Config, engine=None):
        self.cfg = cfg
        self.engine = engine or build_engine(cfg.parallel, cfg.train.device, deepspeed_cfg=cfg.deepspeed)
        self.device = self.engine.device
        self.run_dir = Path(cfg.train.run_dir)
        self.step = 0
        self.skipped_steps = 0
        self._stop_signal: int | None = None
        self._interval: dict[str, torch.Tensor] = {}  # loss-term sums on the device: no sync per step
        self._interval_steps = 0
        self._data_wait = 0.0
        self._last_log_time = time.time()

    # --- setup ----------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self._check_run_dir()
        self.world = self.engine.world_size
        micro = cfg.train.micro_batch_size or cfg.train.global_batch_size // self.world
        if micro < 1 or cfg.train.global_batch_size % (micro * self.world):
            raise MoeditError(
                f"train.global_batch_size = {cfg.train.global_batch_size} is not a multiple of "
                f"micro_batch_size ({micro}) x world size ({self.world})"
            )
        self.micro_batch = micro
        self.accum_steps = cfg.train.global_batch_size // (micro * self.world)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.wrapped, self.optimizer = self.engine.prepare(
            self.model, self.build_optimizer(), micro_batch_size=micro, accum_steps=self.accum_steps,
            grad_clip=cfg.optim.grad_clip, autocast_bf16=self._uses_bf16_autocast(),
        )
        if cfg.train.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.diffusion = self.build_diffusion()
        self.data = self.build_data()
        self._ema_pairs = self._ema_tensor_pairs()
        return self._finish_setup()

    def _finish_setup(self) -> "Trainer":
        """The end of every engine's setup: checkpoint writer, resume, and on the main rank the
        resolved config, model info and the run logger."""
        cfg = self.cfg
        self.writer = CheckpointWriter(
            self.run_dir / "checkpoints", self.engine, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every
        )
        self.resume()
        self.logger = None
        if self.engine.is_main:
            from moedit.train.config import dump_config
            from moedit.train.logging import RunLogger

            dump_config(cfg, self.run_dir / "config.yaml")
            self._write_model_info()
            self.logger = RunLogger(
                self.run_dir, cfg.train.steps, self.step, cfg.logging.tensorboard, cfg.logging.progress
            )
        return self

    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write_test_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise MoeditError(f"train.run_dir = {self.run_dir}: not writable ({exc.strerror}); choose another directory")

    def build_model(self) -> torch.nn.Module:
        from moedit.models import build_model

        model = build_model(self.cfg.model)
        model.set_time_convention(self.cfg.diffusion.objective, self.cfg.diffusion.num_timesteps)
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=fused)

    def build_diffusion(self):
        from moedit.diffusion import build_diffusion

        return build_diffusion(self.cfg.diffusion)

    def build_data(self):
        """An object with __iter__ (one epoch of (x, y) batches), state_dict, load_state_dict, stats."""
        from moedit.data import build_loader

        return build_loader(
            self.cfg.data,
            batch_size=self.micro_batch * self.accum_steps,
            rank=self.engine.rank,
            world_size=self.world,
            seed=self.cfg.train.seed,
        )

    def _ema_tensor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ema, live) pairs: every parameter and every floating state buffer except statistics."""
        from moedit.models.stats import routing_stat_tensors

        stats = {id(t) for t in routing_stat_tensors(self.model)}
        pairs = list(zip(self.ema.parameters(), self.model.parameters()))
        for (name, eb), (_, mb) in zip(self.ema.named_buffers(), self.model.named_buffers()):
            if mb.is_floating_point() and id(mb) not in stats:
                pairs.append((eb, mb))
        return pairs

    # --- resume and checkpoints ---------------------------------------------------------------
    def resume(self) -> None:
        ckpt = resolve_resume(self.cfg.train.resume, self.run_dir)
        if ckpt is None:
            self._data_iter = None
            return
        blob = load_checkpoint(ckpt, self.engine.rank)
        if blob["meta"].get("imported"):
            # A converted or upcycled checkpoint (moedit convert / upcycle): weights only. Training
            # starts at step 0 with a fresh optimizer and data order.
            self.model.load_state_dict(blob["model"])
            self.ema.load_state_dict(blob["ema"])
            self._data_iter = None
            if self.engine.is_main:
                print(f"initialised from imported weights {ckpt}", flush=True)
            return
        if blob["meta"]["world_size"] != self.world:
            raise MoeditError(
                f"{ckpt}: saved with {blob['meta']['world_size']} data-parallel ranks, resumed with {self.world}; "
                "exact data resume needs the same world size"
            )
        self.engine.load_training_state(ckpt, blob, self.model, self.wrapped, self.optimizer)
        self.ema.load_state_dict(blob["ema"])
        state = blob["state"]
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if blob["rank"] is not None:
            self.data.load_state_dict(blob["rank"]["data"])
        self._data_iter = None
        if self.engine.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def save_checkpoint(self, name: str | None = None) -> Path:
        import yaml

        from moedit.train.config import config_to_dict

        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        trainer_state = {"step": self.step, "skipped_steps": self.skipped_steps}
        rank_state = {"data": self.data.state_dict()}

        def engine_state(directory: Path):
            return self.engine.save_training_state(directory, self.wrapped, self.optimizer)

        with self.engine.gathered_parameters(self.model):  # collective under ZeRO-3; a no-op otherwise
            return self.writer.save(self.step, self.model, self.ema, trainer_state, rank_state, text, name=name,
                                    engine_state=engine_state)

    # --- the loop -------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to cfg.train.steps. Returns 0, or PREEMPTED_EXIT_CODE after a signal."""
        self._install_signal_handlers()
        cfg = self.cfg
        try:
            while self.step < cfg.train.steps:
                stop = self.train_step()
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                    self.log_interval()
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    self.write_samples()
                if stop:
                    self.save_checkpoint()
                    if self.engine.is_main:
                        (self.run_dir / "PREEMPTED").write_text(f"signal {self._stop_signal} at step {self.step}\n")
                        self.logger.message(f"stopped by signal at step {self.step}; checkpoint saved")
                    return PREEMPTED_EXIT_CODE
                if self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                    self.save_checkpoint()
            self.save_checkpoint()
            if not cfg.train.sample_every or self.step % cfg.train.sample_every:
                self.write_samples()
            if self.engine.is_main:
                (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
                (self.run_dir / "DONE").write_text(f"step {self.step}\n")
                self.logger.message(f"done: {self.step} steps; run directory {self.run_dir}")
            return 0
        finally:
            if self.logger is not None:
                self.logger.close()

    def train_step(self) -> bool:
        """One optimizer step over `accum_steps` micro-batches. Returns True if a signal asks to stop."""
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        terms_sum: dict[str, torch.Tensor] = {}
        x_all, y_all = self._next_batch()  # this rank's share of the step: micro_batch x accum_steps
        for a in range(self.accum_steps):
            # Micro-batch a takes samples a::accum_steps, just as rank r of a data-parallel run with
            # data.split=sample takes r::world_size: one rank accumulating N micro-batches then sees
            # the same micro-batches (and, through global_micro, the same noise) as N ranks.
            x, y = x_all[a :: self.accum_steps], y_all[a :: self.accum_steps]
            last = a == self.accum_steps - 1
            with self.engine.accumulation_context(self.wrapped, last):
                terms = self.forward_backward_step(x, y, global_micro=a * self.world + self.engine.rank)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0) + v / self.accum_steps
        return self._finish_step(terms_sum)

    def _finish_step(self, terms_sum: dict[str, torch.Tensor]) -> bool:
        """After the step's backward (every engine): skip it on a non-finite loss term on any rank,
        else step the optimizer; count the step and add its terms to the log interval. Returns
        whether a stop signal arrived on any rank."""
        # Name a component term before the total, which is non-finite whenever one of them is.
        order = [k for k in terms_sum if k != "loss"] + ["loss"]
        bad_term = next((k for k in order if not torch.isfinite(terms_sum[k])), None)
        flags = torch.tensor([float(bad_term is not None), float(self._stop_signal is not None)], device=self.device)
        self.engine.all_reduce_max_([flags])  # one sync per step: every rank agrees to skip or stop
        nonfinite, stop = (bool(f) for f in flags.tolist())
        if nonfinite:
            self._handle_nonfinite(bad_term)
        else:
            terms_sum["grad_norm"] = self.optimizer_step()
        self.step += 1
        if not nonfinite:
            for k, v in terms_sum.items():
                self._interval[k] = self._interval.get(k, 0.0) + v.double()
            self._interval_steps += 1
        return stop

    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, global_micro: int) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch (detached), after backward of its share of the step's loss."""
        seed = _mix(self.cfg.train.seed, self.step, global_micro)
        torch.manual_seed(seed)  # label dropout inside the model
        gen = torch.Generator(device=self.device).manual_seed(seed ^ 0x5EED)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with self._autocast():
            terms = self.diffusion.training_losses(self.wrapped, x, y, generator=gen)
        self.engine.backward(terms["loss"], self.wrapped, self.accum_steps)
        return {k: v.detach().float() for k, v in terms.items()}

    def optimizer_step(self) -> torch.Tensor:
        grad_norm = self.engine.step(self.wrapped, self.optimizer, self.model, self.cfg.optim.grad_clip)
        thresholds = self.model.threshold_buffers()
        if thresholds:
            self.engine.average_data_parallel_(thresholds)
        self.update_ema()
        return grad_norm.detach().float()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = self.cfg.train.ema_decay
        ema, live = zip(*self._ema_pairs)
        # bf16 live weights (deepspeed.bf16) feed an fp32 EMA; ZeRO-3 shards are gathered first.
        with self.engine.gathered_parameters(self.model):
            live = [t if t.dtype == e.dtype else t.to(e.dtype) for e, t in zip(ema, live)]
            torch._foreach_lerp_(list(ema), live, 1.0 - decay)

    def _handle_nonfinite(self, bad_term: str | None) -> None:
        self.engine.discard_gradients(self.wrapped, self.optimizer)
        if self.cfg.train.on_nonfinite == "skip" and self.skipped_steps < self.cfg.train.max_skipped_steps:
            self.skipped_steps += 1
            if self.engine.is_main:
                print(f"step {self.step}: non-finite loss term '{bad_term}', step skipped ({self.skipped_steps})", flush=True)
            return
        path = self.save_checkpoint(name=f"debug_step_{self.step:07d}")
        raise NonFiniteLoss(
            f"non-finite loss at step {self.step} (first bad term: '{bad_term or 'on another rank'}'); "
            f"debug checkpoint at {path}"
        )

    def _set_lr(self) -> None:
        o = self.cfg.optim
        step = self.step
        if o.warmup_steps and step < o.warmup_steps:
            scale = (step + 1) / o.warmup_steps
        elif o.schedule == "cosine":
            span = max(self.cfg.train.steps - o.warmup_steps, 1)
            progress = min((step - o.warmup_steps) / span, 1.0)
            scale = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            scale = 1.0
        self.lr = o.lr * scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def _uses_bf16_autocast(self) -> bool:
        precision = self.cfg.train.precision
        return precision == "bf16" or (precision == "auto" and (self.device.type == "cuda" or self.engine.weights_bf16))

    def _autocast(self):
        if self._uses_bf16_autocast():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        try:
            batch = next(self._data_iter)
        except StopIteration:  # epoch boundary: the loader starts its next epoch
            self._data_iter = iter(self.data)
            batch = next(self._data_iter)
        self._data_wait += time.perf_counter() - t0
        return batch

    # --- logging and samples --------------------------------------------------------------
    def log_interval(self) -> None:
        steps = max(self._interval_steps, 1)
        names = sorted(self._interval)
        # One device-to-host copy per log interval for all loss terms.
        sums = torch.stack([self._interval[k] for k in names]).cpu().tolist() if names else []
        values = torch.tensor(sums + [self._data_wait], dtype=torch.float64)
        self.engine.all_reduce_sum_([values])
        means = {k: float(v) / (steps * self.world) for k, v in zip(names, values.tolist())}
        has_stats = bool(self.model.moe_layers()) if hasattr(self.model, "moe_layers") else False
        if has_stats:
            reduce_routing_stats(self.model, self.engine)
        from moedit.models.stats import snapshot_routing_stats

        spread = self._threshold_spread()

        stats = snapshot_routing_stats(self.model, reset=True) if has_stats else None
        self._write_interval(means, float(values[-1]), spread, stats)

    def _write_interval(self, means: dict[str, float], data_wait: float, spread: float | None,
                        stats: dict | None) -> None:
        """Log one interval (main rank) from the mean loss terms, the data wait summed over ranks,
        the threshold spread and the routing statistics; then start the next interval."""
        now = time.time()
        elapsed, self._last_log_time = now - self._last_log_time, now
        if self.engine.is_main:
            world = self.engine.world_size
            metrics = {k if k in ("loss", "grad_norm") else f"loss/{k}": v for k, v in means.items()}
            metrics.update(self._throughput(max(self._interval_steps, 1) * self.cfg.train.global_batch_size, elapsed))
            metrics["lr"] = self.lr
            metrics["data_wait_s"] = data_wait / world
            metrics["skipped_steps"] = self.skipped_steps
            metrics["world_size"] = world
            metrics["images_seen"] = self.step * self.cfg.train.global_batch_size
            if spread is not None:
                metrics["dp/threshold_max_diff"] = spread
            metrics.update({f"data/{k}": v for k, v in self.data.stats().items() if isinstance(v, (int, float))})
            self.logger.log_metrics(self.step, metrics)
            if stats is not None:
                self.logger.log_routing(self.step, stats)
                every = self.cfg.logging.heatmaps_every or 10 * self.cfg.logging.log_every
                if self.step % every == 0 or self.step == self.cfg.train.steps:
                    self.logger.log_heatmaps(self.step, stats)
        self._interval.clear()
        self._interval_steps = 0
        self._data_wait = 0.0

    def _threshold_spread(self) -> float | None:
        """Largest difference of a DiffMoE threshold between data-parallel ranks (0 when in sync)."""
        thresholds = self.model.threshold_buffers()
        if not thresholds or self.world == 1:
            return None
        flat = torch.cat([t.detach().reshape(-1).double() for t in thresholds])
        high, neg_low = flat.clone(), -flat
        self.engine.all_reduce_max_([high, neg_low])
        return float((high + neg_low).max())

    def _throughput(self, images: int, elapsed: float) -> dict[str, float]:
        out = {"images_per_s": images / max(elapsed, 1e-9)}
        out["tokens_per_s"] = out["images_per_s"] * self.model_info["tokens_per_image"]
        peak = _peak_flops(self.device)
        if peak:
            # model_info counts multiply-adds (DiT convention): 2 FLOPs each, 3x forward for training.
            flops = out["images_per_s"] * self.model_info["train_gflops_per_image"] * 1e9 * 2
            out["mfu"] = flops / (peak * self.engine.world_size)  # per GPU
        return out

    @torch.no_grad()
    def write_samples(self) -> None:
        if not self.engine.is_main or not self.cfg.train.num_sample_images:
            return
        from moedit.data import build_decoder, load_manifest
        from moedit.diffusion.grid import save_grid

        n = self.cfg.train.num_sample_images
        m = self.cfg.model
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 1)
        noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=gen, device=self.device)
        labels = torch.arange(n, device=self.device) % m.num_classes
        steps = self.cfg.train.sample_steps or None
        with self._autocast():
            latents = self.diffusion.sample(self.ema, noise, labels, steps=steps, generator=gen, null_label=m.num_classes)
        decoder = build_decoder(load_manifest(self.cfg.data.manifest or self.cfg.data.path))
        images = decoder(latents.float().cpu())
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Labels cycle through the classes, so with nrow = num_classes each column is one class.
        nrow = m.num_classes if 0 < m.num_classes <= 16 else int(math.ceil(math.sqrt(n)))
        grid = save_grid(images, path, nrow=nrow)
        if grid is not None:
            self.logger.log_image("samples", grid, self.step)

    def _write_model_info(self) -> None:
        self.model_info = info = self._model_info()
        (self.run_dir / "model_info.json").write_text(json.dumps(info, indent=2))

    def _model_info(self) -> dict:
        from moedit.models import flops

        m = self.cfg.model
        return {
            "flavor": self.cfg.flavor,
            "total_params": flops.count_params(m),
            "activated_params": flops.activated_params(m),
            "fwd_gflops_per_image": flops.forward_gflops(m, convention="dit"),
            "fwd_gflops_per_image_ditmoe": flops.forward_gflops(m, convention="ditmoe"),
            "train_gflops_per_image": 3 * flops.forward_gflops(m, convention="dit"),
            "tokens_per_image": (m.input_size // m.patch_size) ** 2,
            "num_experts": m.moe.num_experts if m.moe else 0,
            "instantiated_params": self._instantiated_params(),
        }

    def _instantiated_params(self) -> int:
        # Counted on the EMA copy, which no engine shards (ZeRO-3 empties the live parameters).
        return sum(p.numel() for p in self.ema.parameters())

    # --- signals --------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)):
        if key in name:
            return peak
    return None
