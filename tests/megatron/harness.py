"""TEST-ONLY: run a function on N CPU processes with gloo and Megatron-Core's CUDA assumptions stubbed.

    def check(rank, world_size, hidden):
        init_model_parallel(tp=2)
        ...
        return {"out": out.detach()}          # picklable; CPU tensors are fine

    results = run_distributed(check, 2, 16)  # [rank 0's dict, rank 1's dict]

Each worker is a fresh spawned process: one torch thread, `install_cpu_stubs()`, a gloo process
group on a free local TCP port, then `fn(rank, world_size, *args)`. A failure on any rank raises
`DistributedTestError` in the caller with that rank's traceback; the other ranks (possibly blocked
in a collective) are terminated. Processes are always reaped. `fn` must be a module-level
function (spawn pickles it by name).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue as queue_module
import signal
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpu_stubs import install_cpu_stubs


class DistributedTestError(RuntimeError):
    """A rank of `run_distributed` raised, died or timed out."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _teardown() -> None:
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, timeout: float, fn: Callable, args: tuple, results) -> None:
    os.setsid()  # own process group: the parent can reap helpers this rank starts (see run_distributed)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        install_cpu_stubs()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        value = fn(rank, world_size, *args)
        # torch.save into bytes: plain pickling through the queue, no shared-memory handles that
        # would need this process alive while the parent reads them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` spawned CPU processes; their return values by rank."""
    if world_size < 1:
        raise ValueError(f"world_size = {world_size}: must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # Not daemonic: dist_checkpointing's torch_dist writer starts a multiprocessing Manager in each rank.
    # The finally block below reaps the workers instead.
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, timeout, fn, args, results))
             for rank in range(world_size)]
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.start()
        while len(values) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode is not None]
                if dead:
                    # A result may still be in flight from a rank that just exited cleanly.
                    time.sleep(0.5)
                    if results.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise DistributedTestError(f"rank(s) {dead} exited without a result (exit codes {codes})")
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in values]
                    raise DistributedTestError(f"timed out after {timeout:.0f} s waiting for rank(s) {missing}")
                continue
            if not ok:
                raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{payload}")
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10 if len(values) == world_size else 0.1)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            # Helpers a rank started (dist_checkpointing's Manager server, writer processes) outlive a
            # terminated rank; each rank leads its own process group, so end that group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        results.close()
    return [values[rank] for rank in range(world_size)]


def init_model_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1, vpp: int | None = None,
                        seed: int = 1234) -> None:
    """Megatron's process groups and RNG tracker, for use inside a `run_distributed` function.

    `model_parallel_cuda_manual_seed` runs as shipped: with the stubs its tracker forks the CPU
    generator (seed + 2718 + tp_rank for TP regions, seed + 1024 + 100 * ep_rank + etp_rank for
    experts)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(seed)
