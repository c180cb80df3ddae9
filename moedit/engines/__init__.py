"""Engines: how a single-device model runs on one process or many.

`build_engine(parallel_cfg, device_pref)` reads the launcher's environment (torchrun or SLURM)
and returns the engine; `reduce_routing_stats` is the one place routing statistics are reduced.
"""

from __future__ import annotations

import os

import torch

from moedit.engines.base import DistEnv, Engine, reduce_routing_stats
from moedit.errors import MoeditError


def read_dist_env(environ=None) -> DistEnv:
    """Rank and world size from torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/SLURM_NTASKS)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in env:
            raise MoeditError(
                "SLURM task without MASTER_ADDR: launch with `moedit launch slurm` (or export MASTER_ADDR/MASTER_PORT)"
            )
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="slurm",
        )
    return DistEnv()


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise MoeditError("train.device = cuda but no CUDA device is visible; use train.device=cpu or auto")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def build_engine(parallel_cfg, device_preference: str = "auto", environ=None, deepspeed_cfg=None) -> Engine:
    """The engine `parallel_cfg.engine` names; `deepspeed_cfg` (the config's `deepspeed` section) for deepspeed."""
    env = read_dist_env(environ)
    device = pick_device(device_preference, env.local_rank)
    name = parallel_cfg.engine
    if name == "auto":
        name = "ddp" if env.world_size > 1 else "local"
    if name == "local":
        if env.world_size > 1:
            raise MoeditError(
                f"parallel.engine = local but {env.world_size} processes were launched; use parallel.engine=ddp or auto"
            )
        from moedit.engines.local import LocalEngine

        return LocalEngine(env, device)
    if name == "ddp":
        from moedit.engines.ddp import DDPEngine

        return DDPEngine(env, device, _backend(parallel_cfg.backend, device), parallel_cfg.find_unused_parameters)
    if name == "deepspeed":
        from moedit.engines.deepspeed import DeepSpeedEngine

        if deepspeed_cfg is None:
            from moedit.engines.config import DeepSpeedConfig

            deepspeed_cfg = DeepSpeedConfig()
        return DeepSpeedEngine(env, device, _backend(parallel_cfg.backend, device), deepspeed_cfg)
    if name == "megatron":
        try:
            from moedit.engines.megatron.engine import MegatronEngine
        except ImportError as exc:
            raise MoeditError(f"parallel.engine = megatron needs megatron-core ({exc}); install moedit[megatron]")
        return MegatronEngine(env, device, _backend(parallel_cfg.backend, device), parallel_cfg)
    raise MoeditError(f"parallel.engine = {name}: not available (choose auto, local, ddp, deepspeed or megatron)")


def _backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise MoeditError("parallel.backend = nccl needs CUDA; use gloo on CPU")
    return backend


__all__ = ["DistEnv", "Engine", "build_engine", "read_dist_env", "reduce_routing_stats"]
