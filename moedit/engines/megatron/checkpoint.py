"""Checkpoints of the Megatron engine (a mixin of `MegatronEngine`).

A checkpoint holds, as from every engine, the canonical `model.safetensors` / `ema.safetensors`
(gathered on the main rank, float32, so `moedit sample` and the analysis tools read them), plus
a `megatron/` distributed checkpoint (dist_checkpointing, torch_dist) of this layout's weights and,
for the distributed optimizer, its state in model space, which any layout can read; torch AdamW
writes `optim_XXXXX.pt` per rank (same layout only). Each rank file records the rank's data-parallel
rank and its fp32 EMA shards. Resume at another layout reshards the weights (and the distributed
optimizer's state where it can) and restarts the optimizer otherwise, saying so.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from moedit.engines.base import portable_optimizer_state
from moedit.errors import MoeditError
from moedit.fileio import safe_torch_load

# Model-space optimizer state: at save the data-parallel ranks all-gather their slices into
# parameter-shaped tensors keyed like the parameters (saved once, by the main replica); at load
# each rank reads its parameters' tensors and keeps its slice, so any layout can read it. (0.16.1's
# fully_sharded_model_space needs flattened ShardedTensors, which its dist_checkpointing refuses.)
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
_LAYOUT_KEYS = ("tensor", "pipeline", "expert", "expert_tensor", "data", "virtual_pipeline", "sequence_parallel")


class _StateDict:
    """Duck-typed module for the checkpoint writer: `state_dict()` of already gathered tensors."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class MegatronCheckpointing:
    # --- canonical weights --------------------------------------------------------------------
    @torch.no_grad()
    def canonical_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The single-device state dict of the live (or EMA) weights on the main rank ({} elsewhere);
        entries the gather does not cover come from the single-device template. Collective."""
        from moedit.engines.megatron.convert import gather_global, global_to_canonical

        # float32 either way: gather_global casts bf16 parameters (exactly) to float32
        with self._parameters_as_ema() if ema else nullcontext():
            gathered = global_to_canonical(gather_global(self.model, dst=0), self.model_cfg)
        if not self.is_main:
            return {}
        state = {k: v.clone() for k, v in self._canonical_template.state_dict().items()}
        state.update(gathered)
        return state

    @contextmanager
    def canonical_modules(self):
        yield _StateDict(self.canonical_state(ema=False)), _StateDict(self.canonical_state(ema=True))

    @contextmanager
    def sampling_model(self):
        state = self.canonical_state(ema=True)  # collective: the main rank assembles
        if not self.is_main:
            yield None
            return
        from moedit.models import build_model

        model = build_model(self.model_cfg)
        model.load_state_dict(state)
        model.set_time_convention(self.model.time_convention, self.model.num_timesteps)
        yield model.to(self.device).eval()

    def _load_canonical_ema(self, state: dict[str, torch.Tensor]) -> None:
        from moedit.engines.megatron.convert import load_canonical

        with self._parameters_as_ema():
            load_canonical(self.model, state, self.model_cfg)

    # --- save -----------------------------------------------------------------------------------
    def rank_state(self):
        return {"data_rank": self.data_rank, "ema": [e.cpu() for e, _ in self._ema_pairs]}

    def save_training_state(self, directory: Path):
        from megatron.core import dist_checkpointing

        distributed = self.optimizer_kind == "distributed"
        with_optimizer = not distributed or self._optimizer_stepped  # Megatron's state_dict needs a first step
        (directory / "megatron").mkdir(exist_ok=True)
        self.barrier()
        state = self.model.sharded_state_dict()
        files = ["megatron"]
        if distributed and with_optimizer:  # model space (_OPTIMIZER_FORMAT): another layout can reshard it
            state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIMIZER_FORMAT)
        dist_checkpointing.save(state, str(directory / "megatron"))
        if not distributed:
            torch.save(portable_optimizer_state(self.optimizer), directory / f"optim_{self.rank:05d}.pt")
            files += [f"optim_{r:05d}.pt" for r in range(self.world_size)]
        entries = {"layout": self._layout_dict(), "megatron_optimizer": self.optimizer_kind,
                   "optimizer_state": with_optimizer, "param_dtype": self._param_dtype_name()}
        return entries, files

    def _layout_dict(self) -> dict:
        return {k: getattr(self.layout, k) for k in _LAYOUT_KEYS}

    def _param_dtype_name(self) -> str:
        return "bfloat16" if self.params_bf16 else "float32"

    # --- resume -------------------------------------------------------------------------------
    def load_training_state(self, ckpt: Path, blob):
        from megatron.core import dist_checkpointing

        from moedit.engines.megatron.convert import load_canonical

        meta, state = blob["meta"], blob["state"]
        megatron = not meta.get("imported") and meta.get("engine") == "megatron"
        saved_dtype = state.get("param_dtype", "float32")  # checkpoints before bf16 parameters: float32
        if not megatron or saved_dtype != self._param_dtype_name():
            # weights from another engine, an import or another parameter dtype: the canonical
            # (float32) files; fresh optimizer
            load_canonical(self.model, blob["model"], self.model_cfg)
            self._load_canonical_ema(blob["ema"])
            self._refresh_master_weights()
            if self.is_main:
                source = f"engine {meta.get('engine', 'import')}" if not megatron else f"{saved_dtype} parameters"
                print(f"initialised from the canonical weights of {ckpt} ({source}); optimizer state starts fresh",
                      flush=True)
            return
        same_layout = state.get("layout") == self._layout_dict() and meta["world_size"] == self.world_size
        loaded = dist_checkpointing.load(self.model.sharded_state_dict(), str(ckpt / "megatron"))
        self.model.load_state_dict({k: v for k, v in loaded.items()
                                    if k != "optimizer" and not k.endswith("_extra_state")}, strict=False)
        optimizer = self._load_optimizer(ckpt, state, same_layout)
        if same_layout:
            for (e, _), saved in zip(self._ema_pairs, blob["rank"]["ema"]):
                e.copy_(saved)
        else:
            self._load_canonical_ema(blob["ema"])  # resharded through the canonical file
        if self.is_main and (not same_layout or optimizer != "restored"):
            print(f"{ckpt}: saved at layout {state.get('layout')} with the {state.get('megatron_optimizer', 'torch')}"
                  f" optimizer, resumed at {self._layout_dict()} with the {self.optimizer_kind} optimizer: "
                  f"weights {'loaded' if same_layout else 'resharded'}, optimizer state {optimizer}", flush=True)

    def data_state(self, ckpt: Path, blob):
        """The loader state of this data-parallel rank (its global rank may differ after a relayout);
        None where the number of replicas changed (the data order restarts)."""
        saved = blob["state"].get("layout", {}).get("data", blob["meta"]["world_size"])
        if saved != self.data_world:
            if self.is_main:
                print(f"{ckpt}: saved with {saved} data-parallel replicas, resumed with {self.data_world}: the data "
                      "stream restarts its order (exact data resume needs the same number)", flush=True)
            return None
        mine = blob["rank"]
        if mine is not None and mine.get("data_rank", self.rank) == self.data_rank:  # other engines: rank = data rank
            return mine["data"]
        for path in sorted(ckpt.glob("rank_*.pt")):
            other = safe_torch_load(path, "cpu")
            if other.get("data_rank") == self.data_rank:
                return other["data"]
        raise MoeditError(f"{ckpt}: no loader state for data-parallel rank {self.data_rank}")

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
            self.optimizer.load_state_dict(safe_torch_load(ckpt / f"optim_{self.rank:05d}.pt", self.device))
            self._optimizer_stepped = True
            return "restored"
        failure = self._load_distributed_optimizer(ckpt, reraise=same_layout)
        if failure is not None:
            if self.is_main:
                print(f"{ckpt}: the distributed optimizer state did not reshard to this layout ({failure})",
                      flush=True)
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if getattr(opt, "optimizer", None) is not None:
                    opt.optimizer.state.clear()
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
        errors = self.all_gather_object(error)
        return next((e for e in errors if e is not None), None)

    def _refresh_master_weights(self) -> None:
        """After the parameters changed outside the optimizer: the distributed optimizer's fp32 master
        weights start again from them (bf16 parameters: their exact fp32 values)."""
        if self.optimizer_kind == "distributed":
            self.optimizer.reload_model_params()
