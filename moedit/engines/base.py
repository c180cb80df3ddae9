"""The engine interface: how the one training loop (the train package's `Trainer`) runs on one
process or many.

An engine owns the process group, the device, the wrapping of the single-device model (DDP,
DeepSpeed) or its rebuilding (Megatron-Core), the optimizer and the EMA. The trainer never
touches torch.distributed or a wrapper directly; it calls, in this order:

    micro, accum = engine.plan(model_cfg, global_batch, micro_batch, seed)   # batch plan (and layout)
    engine.build(build_model, model_cfg, optim_cfg, micro_batch_size=micro, accum_steps=accum, ...)
    engine.load_training_state(ckpt, blob)                 # on resume: weights, EMA, optimizer
    # every step:
    engine.zero_grad()
    terms = engine.forward_backward(micro_batches, forward, objective)
    grad_norm = engine.optimizer_step(grad_clip)           # or engine.discard_gradients()
    engine.update_ema(decay)
    # checkpoints and samples:
    with engine.canonical_modules() as (live, ema): ...    # single-device state dicts (main rank)
    with engine.sampling_model() as ema_model: ...         # a single-device EMA model (main rank)
    entries, files = engine.save_training_state(directory)

The defaults below are what `local` and `ddp` do. DeepSpeed overrides the low-level hooks
(`prepare`, `accumulation_context`, `backward`, `step`) because it owns backward, clipping,
accumulation and the step; Megatron-Core overrides `plan`, `build`, `forward_backward` (its
pipeline schedule) and the state hooks (moedit/engines/megatron/engine.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moedit.errors import MoeditError


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
    forward_autocast = True
    """Whether the trainer's bf16 autocast applies around forwards (False where parameters are bf16)."""
    graph_capturable = False
    """Whether train.cuda_graph may capture the trainer's whole step (local; megatron in one process)."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env = env
        self.device = device
        self.model: nn.Module | None = None  # this rank's module: statistics, thresholds, aux terms
        self.wrapped: nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: nn.Module | None = None  # single-device EMA (None where the engine keeps shards)
        self._ema_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

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

    @property
    def data_world(self) -> int:
        """Data-parallel replicas: each reads its own share of the data."""
        return self.world_size

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def loss_copies(self) -> int:
        """Ranks of one replica whose loss terms are summed into the log (Megatron: the TP ranks of
        the last stage; stages without a term contribute zeros)."""
        return 1

    def describe(self) -> dict[str, Any]:
        """Engine-specific entries for model_info.json."""
        return {}

    # --- building the training state ---------------------------------------------------------
    def plan(self, model_cfg, global_batch: int, micro_batch: int | None, seed: int) -> tuple[int, int]:
        """(images per forward, micro-batches per step) on one data-parallel replica."""
        world = self.data_world
        micro = micro_batch or global_batch // world
        if micro < 1 or global_batch % (micro * world):
            raise MoeditError(f"train.global_batch_size = {global_batch} is not a multiple of micro_batch_size "
                              f"({micro}) x world size ({world})")
        return micro, global_batch // (micro * world)

    def build(self, build_model, model_cfg, optim_cfg, *, micro_batch_size: int, accum_steps: int,
              autocast_bf16: bool, precision: str = "auto", compile: bool | str = False) -> None:
        """Build this rank's model (from `build_model()`, the single-device model, called once with the
        global RNG seeded), its EMA, the wrapped module and the optimizer (AdamW per `optim_cfg`).
        `compile`: False, or torch.compile's mode for the model's blocks (True: "default"; see
        `DiT.compile_blocks`)."""
        model = build_model().to(self.device)
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = adamw([p for p in model.parameters() if p.requires_grad], optim_cfg,
                          fused=self.device.type in ("cuda", "cpu"))
        if compile:  # after the EMA copy, which stays eager (samples and checkpoints use it)
            model.compile_blocks(None if compile in (True, "default") else compile)
        self.wrapped, self.optimizer = self.prepare(model, optimizer, micro_batch_size=micro_batch_size,
                                                    accum_steps=accum_steps, grad_clip=optim_cfg.grad_clip,
                                                    autocast_bf16=autocast_bf16)
        self._ema_pairs = ema_tensor_pairs(self.ema, model)

    def instantiated_params(self) -> int:
        """Parameters of the whole single-device model (not of a shard)."""
        # Counted on the EMA copy, which no default engine shards (ZeRO-3 empties the live parameters).
        return sum(p.numel() for p in self.ema.parameters())

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
        params = [p for p in self._trainable(model) if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        optimizer.step()
        return grad_norm

    def _trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """`model`'s parameters that require grad, listed once: walking the module tree every step
        costs the host ~2 ms at DiffMoE-L (313 modules)."""
        cached = getattr(self, "_trainable_of", None)
        if cached is None or cached[0] is not model:
            self._trainable_of = cached = (model, [p for p in model.parameters() if p.requires_grad])
        return cached[1]

    def discard_gradients(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop the accumulated gradients without stepping (a skipped non-finite step)."""
        optimizer.zero_grad(set_to_none=True)

    # --- one step (what the trainer calls) -----------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, micro_batches: list[dict], forward: Callable, objective: Callable
                         ) -> dict[str, torch.Tensor]:
        """Forward and backward of one step's micro-batches on this rank.

        `forward(module, batch) -> output`; `objective(output, batch) -> {term: scalar}` (the
        objective's terms, weight 1). The backward is of (objective + the model's weighted auxiliary
        terms) / len(micro_batches). Returns every term, objective and auxiliary, unweighted, detached
        float32, averaged over the micro-batches (terms this rank does not compute are absent)."""
        from moedit.diffusion.losses import combine_losses

        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for a, batch in enumerate(micro_batches):
            with self.accumulation_context(self.wrapped, a == n - 1):
                terms = combine_losses(objective(forward(self.wrapped, batch), batch), self.model)
                self.backward(terms.pop("loss"), self.wrapped, n)
            for k, v in terms.items():
                sums[k] = sums[k] + v.detach().float() / n if k in sums else v.detach().float() / n
        return sums

    @property
    def can_mask_steps(self) -> bool:
        """Whether `optimizer_step(found_inf=flag)` discards an update on the device, without the host
        reading the flag (torch's fused AdamW honours `found_inf`, as it does for GradScaler)."""
        opt = self.optimizer
        return isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused"))

    def optimizer_step(self, grad_clip: float, found_inf: torch.Tensor | None = None) -> torch.Tensor:
        """Clip and apply the step's gradients; the norm before clipping (a device tensor).
        `found_inf` (0-dim float on the device, engines with `can_mask_steps`): 1 = leave the weights
        and the optimizer state as they are."""
        with _found_inf(self.optimizer, found_inf):
            return self.step(self.wrapped, self.optimizer, self.model, grad_clip).detach().float()

    def prepare_capture(self, stream) -> None:
        """train.cuda_graph, before the first step: make autograd state that outlives a step on `stream`,
        the stream the step is warmed up and captured on (None off CUDA). Nothing here."""

    def discard_step(self) -> None:
        """Drop the step's gradients without applying them (a skipped non-finite step)."""
        self.discard_gradients(self.wrapped, self.optimizer)

    @torch.no_grad()
    def update_ema(self, decay: float, skip: torch.Tensor | None = None) -> None:
        """ema += (1 - decay) (live - ema); with `skip` (a device flag, 1 = a discarded step) the weight
        is (1 - decay)(1 - skip), so a discarded step leaves the EMA as it was."""
        ema, live = zip(*self._ema_pairs)
        # bf16 live weights (deepspeed.bf16) feed an fp32 EMA; ZeRO-3 shards are gathered first.
        with self.gathered_parameters(self.model):
            live = [t if t.dtype == e.dtype else t.to(e.dtype) for e, t in zip(ema, live)]
            lerp_ema_(list(ema), live, decay, skip)

    # --- canonical weights for checkpoints and samples ------------------------------------------
    @contextlib.contextmanager
    def canonical_modules(self):
        """(live, ema): objects whose `state_dict()` is the single-device model's, valid inside the
        context on the main rank (other ranks may get empty ones). Collective."""
        with self.gathered_parameters(self.model):  # a collective under ZeRO-3; a no-op otherwise
            yield self.model, self.ema

    @contextlib.contextmanager
    def sampling_model(self):
        """The single-device EMA model on the main rank (None elsewhere). Collective."""
        yield self.ema if self.is_main else None

    def rank_state(self) -> dict[str, Any]:
        """Entries this rank adds to its rank_XXXXX.pt (beyond the loader state)."""
        return {}

    def routing_stats(self) -> dict:
        """The interval's routing statistics summed over the data-parallel replicas (reset after);
        the same on every rank that logs. Collective."""
        from moedit.models.stats import snapshot_routing_stats

        reduce_routing_stats(self.model, self)
        return snapshot_routing_stats(self.model, reset=True)

    def gathered_parameters(self, model: nn.Module):
        """Context in which every rank sees `model`'s full parameters (sharded ones are gathered)."""
        return contextlib.nullcontext()

    @property
    def weights_bf16(self) -> bool:
        """True when the engine keeps the live weights in bf16 (the trainer then autocasts to bf16)."""
        return False

    # --- checkpoint state beyond the weights ------------------------------------------------
    def save_training_state(self, directory: Path) -> tuple[dict[str, Any], list[str]]:
        """Called on every rank inside the checkpoint being written. Returns (entries for state.pt, names
        of the files or directories this wrote into `directory`, which a complete checkpoint must hold)."""
        return {"optimizer": portable_optimizer_state(self.optimizer)}, []

    def load_training_state(self, ckpt: Path, blob: dict[str, Any]) -> None:
        """Restore the weights, the EMA and (unless the checkpoint is an import: weights only) the
        optimizer from a checkpoint (`blob`: what the train package's `load_checkpoint` returned)."""
        if not blob["meta"].get("imported"):
            if "optimizer" not in blob["state"]:  # named before the world size: the likelier mistake
                engine = blob["meta"].get("engine", "another")
                raise MoeditError(
                    f"{ckpt}: written by the {engine} engine, whose optimizer state {self.name} cannot read; "
                    f"resume with parallel.engine={engine} (or train.resume=never to start fresh)"
                )
            self.check_world(ckpt, blob)
            self.optimizer.load_state_dict(blob["state"]["optimizer"])
        self.model.load_state_dict(blob["model"])
        self.ema.load_state_dict(blob["ema"])

    def check_world(self, ckpt: Path, blob: dict[str, Any]) -> None:
        saved = blob["meta"]["world_size"]
        if saved != self.world_size:
            raise MoeditError(
                f"{ckpt}: saved with {saved} data-parallel ranks, resumed with {self.world_size}; exact data "
                f"resume needs the same world size: launch {saved} processes, or start a new run directory "
                "(train.run_dir=...) or train.resume=never"
            )

    def data_state(self, ckpt: Path, blob: dict[str, Any]) -> dict | None:
        """This data-parallel rank's loader state in the checkpoint (None: the data order restarts)."""
        return blob["rank"]["data"] if blob["rank"] is not None else None

    # --- collectives (no-ops on one process) ----------------------------------------------
    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over all ranks, in place."""

    def all_reduce_sum_world_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over every rank of the world (log values), in place."""
        self.all_reduce_sum_(tensors)

    def all_reduce_max_(self, tensors: list[torch.Tensor]) -> None:
        """Element-wise max over all ranks, in place."""

    def all_reduce_max_replicas_(self, tensors: list[torch.Tensor]) -> None:
        """Element-wise max over the data-parallel replicas (ranks that hold the same tensors), in place."""
        self.all_reduce_max_(tensors)

    def average_data_parallel_(self, tensors: list[torch.Tensor]) -> None:
        """Average each tensor over the data-parallel replicas, in place (DiffMoE thresholds)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        return obj

    def shutdown(self) -> None:
        """Tear down the process group."""


@contextlib.contextmanager
def _found_inf(optimizer, flag: torch.Tensor | None):
    """`optimizer.found_inf = flag` for one step (what torch's fused optimizers read)."""
    if flag is None:
        yield
        return
    optimizer.found_inf = flag
    try:
        yield
    finally:
        del optimizer.found_inf


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with each group's learning rate as a float (train.cuda_graph keeps it
    in a device tensor): a checkpoint resumes the same way with or without the graph, on any device."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def lerp_ema_(ema: list[torch.Tensor], live: list[torch.Tensor], decay: float, skip: torch.Tensor | None) -> None:
    """ema += (1 - decay)(live - ema) in place, in one foreach call. With `skip` (a 0-dim device flag,
    1 = a discarded step) the weight is (1 - decay)(1 - skip), a device tensor: the foreach lerp's
    scalar weight would be read on the host (a sync every step), so each tensor takes the weight as
    an expanded view instead (torch's per-tensor lerp, the same arithmetic: the weight is the float
    the scalar gives, formed in float32 from the exact 0 or 1)."""
    if skip is None:
        torch._foreach_lerp_(ema, live, 1.0 - decay)
        return
    weight = (1.0 - skip.float()) * (1.0 - decay)
    torch._foreach_lerp_(ema, live, [weight.expand_as(e) for e in ema])


def adamw(params, optim_cfg, fused: bool = False) -> torch.optim.AdamW:
    """torch AdamW with the `optim` section's hyper-parameters (the trainer sets lr every step).
    fused: one kernel for all parameters (CUDA and CPU), which also honours `found_inf`."""
    o = optim_cfg
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=fused)


def ema_tensor_pairs(ema: nn.Module, live: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ema, live) pairs: every parameter and every floating state buffer except routing statistics."""
    from moedit.models.stats import routing_stat_tensors

    stats = {id(t) for t in routing_stat_tensors(live)}
    pairs = list(zip(ema.parameters(), live.parameters()))
    for (_, eb), (_, mb) in zip(ema.named_buffers(), live.named_buffers()):
        if mb.is_floating_point() and id(mb) not in stats:
            pairs.append((eb, mb))
    return pairs


def reduce_routing_stats(model: nn.Module, engine: Engine) -> None:
    """Sum every routing-statistics buffer over the data-parallel replicas, in place: the one
    reduction point (`Engine.routing_stats` calls it).

    Call it on every rank at the same step. Afterwards each rank holds the global sums and
    `moedit.models.stats.snapshot_routing_stats` reports them.
    """
    from moedit.models.stats import routing_stat_tensors

    engine.all_reduce_sum_(list(routing_stat_tensors(model)))
