"""The training loop, the one every engine runs (local, ddp, deepspeed, megatron).

A step: the micro-batches with their noise, t and label dropout; `engine.forward_backward` over
them with the objective split in two (`diffusion.model_inputs` before the model,
`diffusion.loss_from_output` after it, so a pipeline schedule can run the model itself);
`engine.optimizer_step`, the DiffMoE thresholds averaged over replicas, `engine.update_ema`.
The engine interface is moedit/engines/base.py.

Logged loss terms mean the same on every engine: `loss/<term>` is each objective and auxiliary
term unweighted, `loss` their weighted sum (objective terms weight 1, auxiliary terms their
`moe.*_coef`), both averaged over the interval's accepted steps and the data-parallel replicas.

Text models (`model.condition: text`) take the loader's fields text and text_mask; caption
dropout (`model.caption_dropout`, the null caption) is drawn where label dropout is.

REPA (`train.repa`): the trainer sets the model's repa_* fields from that section and the width of
the shards' feature field, and hands each micro-batch's features to the model as `repa_target`;
the model records the `repa` term among its auxiliary terms (weight `train.repa.coef`).

Determinism: every micro-batch seeds its noise, t and label (or caption) dropout from (seed, step, global
micro-batch index), where the global index of micro-batch `a` on data-parallel rank `r` is
`a * replicas + r`. So a run resumed from a checkpoint, a run on N ranks, one rank accumulating N
micro-batches, and every tensor-parallel or pipeline peer of a replica draw the same numbers for
the same samples.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path


import torch

from moedit.engines import build_engine
from moedit.errors import MoeditError
from moedit.train.checkpoint import CheckpointWriter, load_checkpoint, resolve_resume
from moedit.fileio import write_text
from moedit.train.config import Config

PREEMPTED_EXIT_CODE = 143
INTERRUPTED_EXIT_CODE = 130  # the shell's code for Ctrl-C
SPIKE_FACTOR = 100.0  # a logged loss this many times the lowest so far is reported as a spike


class NonFiniteLoss(MoeditError):
    pass


class Trainer:
    """The training loop of every engine: the engine builds and steps the model, the trainer owns
    the data, the objective, the schedule, logging, samples, checkpoints and signals."""

    def __init__(self, cfg: Config, engine=None):
        self.cfg = cfg
        self.engine = engine or build_engine(cfg.parallel, cfg.train.device, deepspeed_cfg=cfg.deepspeed)
        self.device = self.engine.device
        self.run_dir = Path(cfg.train.run_dir)
        self.step = 0
        self.skipped_steps = 0
        self.logger = None
        self._lock = None  # the run directory's lock (main rank): one training job per directory
        self._stop_signal: int | None = None
        self._interval_sum: torch.Tensor | None = None  # loss terms, loss, grad norm: summed on the device
        self._interval_ok: torch.Tensor | None = None  # accepted steps of the interval, on the device
        self._interval_steps = 0  # all steps of the interval (skipped ones took time too)
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # deferred non-finite flags
        self._stop_prev: torch.Tensor | None = None
        self._data_wait = 0.0
        self._last_log_time = time.time()
        self._sample_captions: tuple[torch.Tensor, torch.Tensor] | None = None  # text models' sample captions
        self._repa_encoder = None  # train.repa.encoder: computes REPA targets from the clean pixels
        self._step_graph = None  # train.cuda_graph: a StepGraph over _device_step

    # --- setup ----------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg, engine = self.cfg, self.engine
        self._check_run_dir()
        if engine.is_main:  # before anything is written; a second job here is a named error
            from moedit.train.rundir import RunDirLock

            self._lock = RunDirLock.acquire(self.run_dir)
        from moedit.train.repa import configure_repa

        configure_repa(cfg)  # the model's REPA fields (before anything builds the model)
        self.micro_batch, self.accum_steps = engine.plan(cfg.model, cfg.train.global_batch_size,
                                                         cfg.train.micro_batch_size, cfg.train.seed)
        self.world = engine.data_world  # data-parallel replicas: what the loader and the loss means count
        self.diffusion = self.build_diffusion()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and in every layout
        engine.build(self.build_model, cfg.model, cfg.optim, micro_batch_size=self.micro_batch,
                     accum_steps=self.accum_steps, autocast_bf16=self._uses_bf16_autocast(),
                     precision=cfg.train.precision,
                     compile=cfg.train.compile_mode if cfg.train.compile else False)
        self.model = engine.model
        self.data = self.build_data()
        from moedit.train.repa import pixel_encoder

        with torch.random.fork_rng(devices=[]):  # loading an encoder may draw; the run's stream must not move
            self._repa_encoder = pixel_encoder(cfg, self.device)  # train.repa.encoder (None: shard features)
        self._init_terms()
        self._generator = torch.Generator(device=self.device)
        from moedit.models.stats import mutable_buffers

        self._mutable = mutable_buffers(self.model)
        self._before = [b.clone() for b in self._mutable]  # their values before the step in flight
        # Sync-free steps: a non-finite step is discarded on the device (fused AdamW's found_inf, a
        # masked EMA, buffers restored by torch.where) and the host reads the flags at log intervals.
        self._deferred = cfg.train.deferred_checks and engine.can_mask_steps
        self.writer = CheckpointWriter(
            self.run_dir / "checkpoints", engine, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every
        )
        self.resume()
        if cfg.train.cuda_graph:
            self._step_graph = self._build_step_graph(required=cfg.train.cuda_graph is True)
        if engine.is_main:
            from moedit.train.config import dump_config
            from moedit.train.logging import RunLogger

            dump_config(cfg, self.run_dir / "config.yaml")
            self._write_model_info()
            self.logger = RunLogger(
                self.run_dir, cfg.train.steps, self.step, cfg.logging.tensorboard, cfg.logging.progress
            )
        return self

    def _build_step_graph(self, required: bool):
        """train.cuda_graph: the checks, then the StepGraph (`_new_step_graph`). A check that fails is a
        named error if `required` (true), else no graph (auto)."""
        cfg, engine = self.cfg, self.engine
        why = None
        if self.device.type != "cuda":
            why = f"needs a CUDA device (this run trains on {self.device.type}); set train.cuda_graph=false"
        elif not engine.graph_capturable:
            why = (f"captures one process's step on the local engine, or megatron with its torch optimizer (this "
                   f"run: parallel.engine={engine.name}, {engine.world_size} processes); set train.cuda_graph=false")
        elif not self._deferred:
            why = "needs the sync-free step of train.deferred_checks=true; set it, or train.cuda_graph=false"
        elif cfg.train.compile and cfg.train.compile_mode == "reduce-overhead":
            why = ("and train.compile_mode=reduce-overhead both record CUDA graphs; use "
                   "train.compile_mode=default with train.cuda_graph=true")
        if why and required:
            raise MoeditError(f"train.cuda_graph = true {why}")
        if why:
            return None
        return self._new_step_graph(capture=True, fallback=not required)

    def _new_step_graph(self, capture: bool, fallback: bool = False):
        """A StepGraph over `_device_step` (capture=False: the CPU tests' emulation), with the learning
        rate in a device tensor (`_set_lr` fills it; a graph would keep a float as it was at capture),
        the optimizer marked capturable (fused AdamW computes the same either way; checkpoints store
        the rate as a float) and the engine's lasting autograd state made on the graph's stream."""
        from moedit.train.step_graph import StepGraph

        self._rate_in_tensor()
        graph = StepGraph(self._device_step, warmup=2, capture=capture, fallback=fallback)
        self.engine.prepare_capture(graph.stream)
        return graph

    def _rate_in_tensor(self) -> None:
        """The learning rate as a device tensor and the optimizer marked capturable. (An eager test
        baseline does the same: torch's CPU fused AdamW rounds a float rate and a tensor one differently
        in some parameters' last bits, 4e-9 in the capacity predictor's.)"""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
            group["capturable"] = True

    def _init_terms(self) -> None:
        """The loss terms every rank logs, in a fixed order, and their weights in `loss`: the
        objective's (weight 1) then the MoE layers' auxiliary terms (their coefficients)."""
        from moedit.models.routers import AUX_COEF_FIELDS, aux_terms

        from moedit.models.repa import REPA_TERM

        m = self.cfg.model
        self.term_coefs = {name: 1.0 for name in self.diffusion.term_names(m.learn_sigma)}
        for name in aux_terms(m.moe) if m.moe is not None else ():
            self.term_coefs[name] = float(getattr(m.moe, AUX_COEF_FIELDS[name]))
        if m.has_repa:
            self.term_coefs[REPA_TERM] = float(m.repa_coef)
        self.term_names = list(self.term_coefs)

    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write_test_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise MoeditError(f"train.run_dir = {self.run_dir}: not writable ({exc.strerror}); choose another directory")

    def build_model(self) -> torch.nn.Module:
        """The single-device model (engines shard or wrap it)."""
        from moedit.models import build_model

        model = build_model(self.cfg.model)
        model.set_time_convention(self.cfg.diffusion.objective, self.cfg.diffusion.num_timesteps)
        return model

    def build_diffusion(self):
        from moedit.diffusion import build_diffusion

        return build_diffusion(self.cfg.diffusion)

    def build_data(self):
        """An object with __iter__ (one epoch of (x, y) batches), state_dict, load_state_dict, stats."""
        from moedit.data import build_loader

        return build_loader(
            self.cfg.data,
            batch_size=self.micro_batch * self.accum_steps,
            rank=self.engine.data_rank,
            world_size=self.world,
            seed=self.cfg.train.seed,
        )

    # --- resume and checkpoints ---------------------------------------------------------------
    def resume(self) -> None:
        self._data_iter = None
        ckpt = resolve_resume(self.cfg.train.resume, self.run_dir, engine=self.engine)  # rank 0 verifies
        if ckpt is None:
            return
        blob = load_checkpoint(ckpt, self.engine.rank)
        try:
            self.engine.load_training_state(ckpt, blob)
        except (RuntimeError, ValueError, KeyError) as exc:  # torch's size / key / group mismatches
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            first = next((line for line in lines if not line.endswith(":")), lines[0])[:200].rstrip(".")
            raise MoeditError(
                f"{ckpt}: does not fit the model this config builds ({self.cfg.model.name}): {first}. The run "
                f"directory holds a run of another model or optimizer setup; use a new train.run_dir, or "
                f"train.resume=never to start over here") from exc
        if blob["meta"].get("imported"):
            # A converted or upcycled checkpoint (moedit convert / upcycle): weights only. Training
            # starts at step 0 with a fresh optimizer and data order.
            if self.engine.is_main:
                print(f"initialised from imported weights {ckpt}", flush=True)
            return
        state = blob["state"]
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        data_state = self.engine.data_state(ckpt, blob)
        if data_state is not None:
            self.data.load_state_dict(data_state)
        if self.engine.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def save_checkpoint(self, name: str | None = None) -> Path:
        import yaml

        from moedit.train.config import config_to_dict

        self._read_flags()  # skipped_steps up to date (a stop policy raises here, before any save)
        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        trainer_state = {"step": self.step, "skipped_steps": self.skipped_steps}
        rank_state = {"data": self.data.state_dict(), **self.engine.rank_state()}
        with self.engine.canonical_modules() as (live, ema):  # collective (ZeRO-3, Megatron gathers)
            return self.writer.save(self.step, live, ema, trainer_state, rank_state, text, name=name,
                                    engine_state=self.engine.save_training_state)

    # --- the loop -------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to cfg.train.steps. Returns 0; after SIGTERM or SIGUSR1 (a scheduler's preemption
        notice) PREEMPTED_EXIT_CODE, after a first Ctrl-C INTERRUPTED_EXIT_CODE, both once the step
        in flight is finished and checkpointed."""
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
                    return self._stop()
                if self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                    self.save_checkpoint()
            if cfg.checkpoint.final or self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
            else:
                self._read_flags()  # a deferred non-finite step is still reported (or stops the run)
            if not cfg.train.sample_every or self.step % cfg.train.sample_every:
                self.write_samples()
            if self.engine.is_main:
                (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
                write_text(self.run_dir / "DONE", f"step {self.step}\n", what="the DONE marker")
                self.logger.message(f"done: {self.step} steps; run directory {self.run_dir}")
            return 0
        finally:
            self.close()

    def close(self) -> None:
        """Close the logs and release the run directory (also after a failed setup)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _stop(self) -> int:
        """A stop signal arrived (on some rank): checkpoint the finished step and leave."""
        path = self.save_checkpoint()
        interrupted = self._stop_signal == signal.SIGINT  # another rank may have had the signal: None here
        if self.engine.is_main:
            if not interrupted:  # a scheduler's notice: the job requeues itself (launch/render.py)
                write_text(self.run_dir / "PREEMPTED", f"signal {self._stop_signal} at step {self.step}\n",
                           what="the PREEMPTED marker")
            why = "interrupted (Ctrl-C)" if interrupted else f"stopped by signal {self._stop_signal}"
            self.logger.message(f"{why} at step {self.step}; checkpoint {path}; rerun the same command to resume")
        return INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE

    def train_step(self) -> bool:
        """One optimizer step over `accum_steps` micro-batches. Returns True if a signal asks to stop."""
        self._set_lr()
        batches = self._micro_batches()
        if self._step_graph is not None:  # train.cuda_graph: the device step is one graph replay
            return self._graph_step(batches)
        return self._finish_step(self._forward_backward(batches))

    def _graph_step(self, batches: list[dict[str, torch.Tensor]]) -> bool:
        """train_step through the StepGraph (eager warm-up, capture, replays): its outputs are static
        tensors, read or cloned here before the next replay overwrites them."""
        graph = self._step_graph
        before = (graph.capture_s, graph.failed)
        terms, bad, skip, grad_norm = graph(batches)
        if (graph.capture_s, graph.failed) != before and self.logger is not None:  # once: captured, or failed
            self.logger.message(
                f"step {self.step + 1}: the step is a CUDA graph from here on (captured in {graph.capture_s:.1f} s; "
                "train.cuda_graph)" if graph.failed is None else
                f"step {self.step + 1}: warning: capturing the step as a CUDA graph failed ({graph.failed}); "
                "training on with eager steps (train.cuda_graph = auto)")
        self.step += 1
        self._interval_steps += 1
        self._accumulate(terms, grad_norm, skip)
        self._pending.append((self.step, bad.clone(), skip.clone()))
        return self._stop_signal is not None

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Zero the gradients, keep the buffers a forward updates in place (DiffMoE thresholds,
        aux-free biases, routing statistics: restored if the step turns out non-finite, so a skipped
        step leaves no trace), forward and backward; the step's terms and their weighted `loss`."""
        self.engine.zero_grad()
        if self._mutable:
            torch._foreach_copy_(self._before, self._mutable)
        sums = self.engine.forward_backward(batches, self._forward, self._objective)
        zero = torch.zeros((), device=self.device)
        terms = {k: sums.get(k, zero) for k in self.term_names}  # absent: computed on another stage
        terms["loss"] = sum(c * terms[k] for k, c in self.term_coefs.items() if c != 0.0)
        return terms

    def _device_step(self, batches: list[dict[str, torch.Tensor]]) -> tuple:
        """The part of a deferred one-replica step that runs on the device, with no host sync and no
        change to the trainer's Python state (what train.cuda_graph captures): zero the gradients,
        forward and backward, then the update masked by the non-finite flag. Returns (terms, bad,
        skip, grad norm), device tensors."""
        terms = self._forward_backward(batches)
        bad = self._nonfinite_flags(terms)
        skip = bad.max()
        return terms, bad, skip, self._masked_update(skip)

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step, each with its noise, t and label dropout drawn from
        (seed, step, global micro-batch index), the same numbers on every engine and layout."""
        cfg = self.cfg
        text = cfg.model.is_text
        x_all, y_all, fields = self._split_batch(self._next_batch())  # this rank's share: micro_batch x accum_steps
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous; from pageable memory CUDA first waits for
            # the stream to drain (a host sync every step).
            x_all = x_all.pin_memory().to(self.device, non_blocking=True)
            y_all = y_all.pin_memory().to(self.device, non_blocking=True)
            fields = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in fields.items()}
        if text:
            self._sample_captions = (fields["text"], fields["text_mask"])  # the grid's captions (main rank)
            drop = cfg.model.caption_dropout
        else:
            drop = cfg.model.class_dropout_prob if cfg.model.num_classes else 0.0
        gen, out = self._generator, []
        for a in range(self.accum_steps):
            # Micro-batch a takes samples a::accum_steps, just as rank r of a data-parallel run with
            # data.split=sample takes r::world_size: one rank accumulating N micro-batches then sees
            # the same micro-batches (and, through the index, the same noise) as N ranks.
            x = x_all[a :: self.accum_steps].to(self.device, non_blocking=True)
            y = y_all[a :: self.accum_steps].to(self.device, non_blocking=True)
            gen.manual_seed(_mix(cfg.train.seed, self.step, a * self.world + self.engine.data_rank) ^ 0x5EED)
            t = self.diffusion.draw_t(x.shape[0], gen, x)
            noise = torch.randn(x.shape, generator=gen, device=self.device, dtype=x.dtype)
            # Classifier-free guidance's dropout, drawn at the same place in the stream for both
            # conditions: labels become the null class num_classes, captions the null caption.
            dropped = torch.rand(y.shape[0], generator=gen, device=self.device) < drop if drop > 0 else None
            batch = {"x": x, "y": y, "t": t, "noise": noise}
            if text:
                batch["text"] = fields["text"][a :: self.accum_steps].to(self.device, torch.float32, non_blocking=True)
                batch["text_mask"] = fields["text_mask"][a :: self.accum_steps].to(self.device, non_blocking=True)
                batch["drop_text"] = (dropped if dropped is not None
                                      else torch.zeros(x.shape[0], dtype=torch.bool, device=self.device))
            elif dropped is not None:
                batch["y"] = torch.where(dropped, torch.full_like(y, cfg.model.num_classes), y)
            if "repa" in fields:  # the clean images' encoder features: data, drawn from no generator
                batch["repa"] = fields["repa"][a :: self.accum_steps].to(self.device, torch.float32, non_blocking=True)
            out.append(batch)
        return out

    def _split_batch(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x, y, named fields) from the loader's (x, y) or (x, y, fields); a text model needs the
        fields text (B, L, text_dim) and text_mask (B, L) (data.fields), a REPA model its feature
        field (B, T, repa_dim), returned as "repa"."""
        x, y, fields = (*batch, {}) if len(batch) == 2 else batch
        out = self._repa_field(fields, x) if self.cfg.model.has_repa else {}
        if self.cfg.model.is_text:
            m = self.cfg.model
            missing = [k for k in ("text", "text_mask") if k not in fields]
            if missing:
                raise MoeditError(f"model.condition = text: the data loader gave no {' and '.join(missing)} "
                                  "(set data.fields to include text and text_mask, on shards prepared with a text encoder)")
            text, mask = fields["text"], fields["text_mask"]
            if text.shape[1:] != (m.text_len, m.text_dim) or mask.shape != text.shape[:2]:
                raise MoeditError(f"the data's text features have shape {tuple(text.shape[1:])} per sample (mask "
                                  f"{tuple(mask.shape[1:])}): the model expects ({m.text_len}, {m.text_dim}); set "
                                  f"model.text_len={text.shape[1]} and model.text_dim={text.shape[-1]} to match the shards")
            return x, y, {"text": text, "text_mask": mask.bool(), **out}
        return x, y, out  # other fields (caption strings, ...) do not reach the model

    def _repa_field(self, fields: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m, name = self.cfg.model, self.cfg.train.repa.field
        if self._repa_encoder is not None:  # train.repa.encoder: from the clean pixels, no gradient
            with torch.no_grad():
                return {"repa": self._repa_encoder.encode(list(x.float().cpu().numpy()))}
        if name not in fields:
            raise MoeditError(f"train.repa.enabled = true: the data loader gave no {name!r} field (data.fields must "
                              f"include it, on shards prepared with encoder features)")
        features = fields[name]
        if features.shape[1:] != (m.num_tokens, m.repa_dim):
            raise MoeditError(f"the data's {name!r} features have shape {tuple(features.shape[1:])} per sample: the "
                              f"model expects ({m.num_tokens}, {m.repa_dim}) (T tokens, model.repa_dim)")
        return {"repa": features}

    def _forward(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x_t, t_model = self.diffusion.model_inputs(batch["x"], batch["noise"], batch["t"])
        batch["x_t"] = x_t
        extra = {"repa_target": batch["repa"]} if "repa" in batch else {}
        with self._autocast(self.engine.forward_autocast):
            if "text" in batch:
                return module(x_t, t=t_model, text=batch["text"], text_mask=batch["text_mask"],
                              drop_text=batch["drop_text"], **extra)
            return module(x_t, t=t_model, y=batch["y"], **extra)  # t, y by keyword: Megatron's bf16 wrapper casts positionals

    def _objective(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = self.diffusion.loss_from_output(out.float(), batch["x"], batch["noise"], batch["t"], batch["x_t"])
        return {k: v.mean() for k, v in terms.items()}

    def _finish_step(self, terms: dict[str, torch.Tensor]) -> bool:
        """After the step's backward: discard it on a non-finite loss term on any rank, else step the
        optimizer; add its terms to the log interval. Returns whether a stop signal arrived on any
        rank (with deferred checks on several ranks: one step later)."""
        bad = self._nonfinite_flags(terms)
        self.step += 1
        self._interval_steps += 1
        if self._deferred:
            return self._finish_step_on_device(terms, bad)
        flags = torch.stack([bad.max(), self._stop_flag()])
        self.engine.all_reduce_max_([flags])  # every rank agrees to skip or stop
        *local, skip, stop = torch.cat([bad, flags]).tolist()  # the one host sync of the step
        if skip:
            torch._foreach_copy_(self._mutable, self._before)
            self.engine.discard_step()
            self._nonfinite(self.step, self._first_bad(local))
        else:
            self._accumulate(terms, self.optimizer_step(), None)
        return bool(stop)

    def _finish_step_on_device(self, terms: dict[str, torch.Tensor], bad: torch.Tensor) -> bool:
        """The step without a host sync: every update is masked by the agreed skip flag on the device
        (a discarded step changes no weight, moment, EMA or buffer); `_read_flags` reports it later."""
        skip, stop = bad.max(), None
        if self.engine.world_size > 1:
            agreed = torch.stack([skip, self._stop_flag()])
            self.engine.all_reduce_max_([agreed])
            skip, stop = agreed[0], agreed[1]
        self._accumulate(terms, self._masked_update(skip), skip)
        self._pending.append((self.step, bad, skip))
        if stop is None:
            return self._stop_signal is not None
        # The ranks' stop flags are read one step late, once this step's work is queued, so the host
        # never waits for the device to drain; a signal still stops within one step.
        previous, self._stop_prev = self._stop_prev, stop
        return previous is not None and bool(previous)

    def _nonfinite_flags(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        # per term, this rank; a component term is named before the total, non-finite with any of them
        return torch.stack([~torch.isfinite(terms[k]) for k in [*self.term_names, "loss"]]).float()

    def _masked_update(self, skip: torch.Tensor) -> torch.Tensor:
        """Restore the forward's buffers if `skip` (a device flag), then the optimizer step it masks;
        returns the gradient norm."""
        keep_old = skip > 0
        for buffer, old in zip(self._mutable, self._before):  # one kernel each, in place
            torch.where(keep_old, old, buffer, out=buffer)
        return self.optimizer_step(skip)

    def _stop_flag(self) -> torch.Tensor:
        # torch.full is a fill kernel; torch.tensor(v, device=...) would copy from pageable memory,
        # which makes CUDA wait for the stream
        return torch.full((), float(self._stop_signal is not None), device=self.device)

    def _accumulate(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, skip: torch.Tensor | None) -> None:
        values = torch.stack([terms[k] for k in [*self.term_names, "loss"]] + [grad_norm.reshape(())]).double()
        ok = torch.ones((), dtype=torch.float64, device=self.device)
        if skip is not None:  # a discarded step adds nothing (where, not a product: NaN * 0 is NaN)
            values = torch.where(skip > 0, torch.zeros_like(values), values)
            ok = 1.0 - skip.double()
        self._interval_sum = values if self._interval_sum is None else self._interval_sum + values
        self._interval_ok = ok if self._interval_ok is None else self._interval_ok + ok

    def _read_flags(self) -> None:
        """Report the deferred non-finite steps (log intervals, checkpoints): one device-to-host copy."""
        if not self._pending:
            return
        steps = [step for step, _, _ in self._pending]
        table = torch.stack([torch.cat([bad, skip.reshape(1)]) for _, bad, skip in self._pending]).tolist()
        self._pending = []
        for step, (*local, skip) in zip(steps, table):
            if skip:
                self._nonfinite(step, self._first_bad(local))

    def _first_bad(self, local: list[float]) -> str | None:
        return next((k for k, b in zip([*self.term_names, "loss"], local) if b), None)

    def optimizer_step(self, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The optimizer, the replicas' thresholds and the EMA; `skip` (a device flag): discard the
        update on the device instead."""
        grad_norm = self.engine.optimizer_step(self.cfg.optim.grad_clip, found_inf=skip)
        thresholds = self.model.threshold_buffers()
        if thresholds:
            self.engine.average_data_parallel_(thresholds)
        self.engine.update_ema(self.cfg.train.ema_decay, skip=skip)
        return grad_norm.to(self.device)

    def _nonfinite(self, step: int, bad_term: str | None) -> None:
        """Step `step` (counted from 1, as in the progress log) was non-finite on some rank and was
        discarded: it counts as a step (its batch is consumed) but changed nothing. Count it, or stop."""
        where = bad_term or "on another rank"
        if self.cfg.train.on_nonfinite == "skip" and self.skipped_steps < self.cfg.train.max_skipped_steps:
            self.skipped_steps += 1
            if self.engine.is_main:
                print(f"step {step}: non-finite loss term '{where}', step skipped "
                      f"({self.skipped_steps} of at most {self.cfg.train.max_skipped_steps})", flush=True)
            return
        path = self.save_checkpoint(name=f"debug_step_{step:07d}")
        state = "the weights before that step" if step == self.step else \
            f"the weights after step {self.step}; step {step} changed nothing"
        raise NonFiniteLoss(f"non-finite loss at step {step} (first bad term: '{where}'); debug checkpoint "
                            f"({state}) at {path}")

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
        for group in self.engine.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # train.cuda_graph: the graph reads it on the device
                group["lr"].fill_(self.lr)
            else:
                group["lr"] = self.lr

    def _uses_bf16_autocast(self) -> bool:
        precision = self.cfg.train.precision
        return precision == "bf16" or (precision == "auto" and (self.device.type == "cuda" or self.engine.weights_bf16))

    def _autocast(self, enabled: bool = True):
        if enabled and self._uses_bf16_autocast():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _next_batch(self) -> tuple:
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
        """Reduce the interval's loss terms, data wait, threshold spread and routing statistics over
        the ranks (collective) and log them on the main rank."""
        self._read_flags()
        names = [*self.term_names, "loss"]
        zeros = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        sums = self._interval_sum if self._interval_sum is not None else zeros
        ok = self._interval_ok if self._interval_ok is not None else zeros[0]
        # One collective and one device-to-host copy per log interval for every loss term. Each term
        # is held by `loss_copies` ranks of each replica (zeros elsewhere); the grad norm is global.
        values = torch.cat([sums[:-1], torch.tensor([self._data_wait], dtype=torch.float64, device=self.device)])
        self.engine.all_reduce_sum_world_([values])
        values = values.tolist()
        grad_norm, steps = torch.stack([sums[-1], ok]).tolist()
        means = {}
        if steps:  # an interval of skipped steps only has no loss to report
            copies = steps * self.world * self.engine.loss_copies
            means = {k: v / copies for k, v in zip(names, values)}
            means["grad_norm"] = grad_norm / steps
        spread = self._threshold_spread()
        stats = self.engine.routing_stats() if self.cfg.model.moe is not None else None
        self._write_interval(means, values[-1], spread, stats)

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
            if "loss" in means:
                self._check_spike(means["loss"])
            if stats is not None:
                self.logger.log_routing(self.step, stats)
                every = self.cfg.logging.heatmaps_every or 10 * self.cfg.logging.log_every
                if self.step % every == 0 or self.step == self.cfg.train.steps:
                    self.logger.log_heatmaps(self.step, stats)
        self._interval_sum = self._interval_ok = None
        self._interval_steps = 0
        self._data_wait = 0.0

    def _check_spike(self, loss: float) -> None:
        """Warn (main rank) when the logged loss is SPIKE_FACTOR times the lowest logged so far: a
        diverging run stays finite for a long time (lr 1e9 took a quickstart loss from 5.6 to 2.7e22)
        and would otherwise end with DONE and no word. Again only after another factor of 10."""
        floor = getattr(self, "_loss_floor", None)
        if floor is None or loss < floor[0]:
            self._loss_floor = (loss, self.step)
            return
        if floor[0] > 0 and loss > SPIKE_FACTOR * floor[0] and loss > getattr(self, "_spike_warned", 0.0) * 10:
            self._spike_warned = loss
            self.logger.message(
                f"warning: loss {loss:.4g} at step {self.step} is {loss / floor[0]:.3g}x the lowest logged "
                f"({floor[0]:.4g} at step {floor[1]}): training may be diverging; check optim.lr "
                f"(now {self.lr:.3g}), optim.warmup_steps and optim.grad_clip")

    def _threshold_spread(self) -> float | None:
        """Largest difference of a DiffMoE threshold between data-parallel replicas (0 when in sync)."""
        m = self.cfg.model
        if self.world == 1 or m.moe is None or m.moe.router != "diffmoe":
            return None
        spread = torch.zeros(1, dtype=torch.float64, device=self.device)
        thresholds = self.model.threshold_buffers()  # none on a pipeline stage without MoE layers
        if thresholds:
            flat = torch.cat([t.detach().reshape(-1).double() for t in thresholds])
            high, neg_low = flat.clone(), -flat
            self.engine.all_reduce_max_replicas_([high, neg_low])
            spread = (high + neg_low).max().reshape(1)
        self.engine.all_reduce_max_([spread])  # over stages
        return float(spread)

    def _throughput(self, images: int, elapsed: float) -> dict[str, float]:
        out = {"images_per_s": images / max(elapsed, 1e-9)}
        out["tokens_per_s"] = out["images_per_s"] * self.model_info["tokens_per_image"]
        peak = _peak_flops(self.device)
        if peak:
            # model_info counts multiply-adds (DiT convention): 2 FLOPs each, 3x forward for training.
            flops = out["images_per_s"] * self.model_info["train_gflops_per_image"] * 1e9 * 2
            out["mfu"] = flops / (peak * self.engine.world_size)  # per GPU
        if self.device.type == "cuda":  # the allocator's own counter: no device sync
            out["mem/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    @torch.no_grad()
    def write_samples(self) -> None:
        if not self.cfg.train.num_sample_images:
            return
        with self.engine.sampling_model() as ema:  # collective: Megatron assembles it on the main rank
            if ema is not None:
                self._sample_grid(ema)

    def _sample_grid(self, ema: torch.nn.Module) -> None:
        from moedit.data import build_decoder, load_manifest
        from moedit.data.manifest import manifest_path
        from moedit.diffusion.grid import save_grid

        n = self.cfg.train.num_sample_images
        m = self.cfg.model
        if m.is_text and self._sample_captions is None:
            self.logger.message("no samples: a text model samples with the captions of its latest step, and no "
                                "step ran in this process")
            return
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 1)
        noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=gen, device=self.device)
        if m.is_text:
            # No text encoder here: the captions of the latest step's first samples (this rank's).
            text, mask = self._sample_captions
            rows = torch.arange(n, device=text.device) % text.shape[0]
            labels = {"text": text[rows].to(self.device, torch.float32), "text_mask": mask[rows].to(self.device)}
        else:
            labels = torch.arange(n, device=self.device) % m.num_classes
        steps = self.cfg.train.sample_steps or None
        shown = steps or self.cfg.diffusion.sample_steps
        self.logger.message(f"sampling {n} images ({shown} {self.cfg.diffusion.default_sampler} steps, "
                            f"EMA weights) for {self.run_dir / 'samples'} ...")
        t0 = time.time()
        with self._autocast():
            latents = self.diffusion.sample(ema, noise, labels, steps=steps, generator=gen, null_label=m.num_classes,
                                            progress=self.logger.bar is not None)
        decoder = build_decoder(load_manifest(manifest_path(self.cfg.data)))
        images = decoder(latents.float().cpu())
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Labels cycle through the classes, so with nrow = num_classes each column is one class.
        nrow = m.num_classes if 0 < m.num_classes <= 16 and not m.is_text else int(math.ceil(math.sqrt(n)))
        grid = save_grid(images, path, nrow=nrow)
        self.logger.message(f"samples written to {path} ({time.time() - t0:.0f} s)")
        if grid is not None:
            self.logger.log_image("samples", grid, self.step)

    def _write_model_info(self) -> None:
        self.model_info = info = self._model_info()
        write_text(self.run_dir / "model_info.json", json.dumps(info, indent=2), what="model_info.json")

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
            "instantiated_params": self.engine.instantiated_params(),
            "cuda_graph": self._step_graph is not None,  # train.cuda_graph (auto decides per run)
            **self.engine.describe(),
        }

    # --- signals --------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (preemption notices) and a first Ctrl-C finish the step in flight and
        checkpoint it (`fit` then returns); a second Ctrl-C aborts at once, saving nothing more."""
        def handler(signum, frame):
            self._stop_signal = signum

        def interrupt(signum, frame):
            if self._stop_signal == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            self._stop_signal = signum
            if self.engine.is_main:
                print(f"Ctrl-C: finishing step {self.step + 1} and saving a checkpoint (Ctrl-C again to abort "
                      "at once)", file=sys.stderr, flush=True)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, interrupt)


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
