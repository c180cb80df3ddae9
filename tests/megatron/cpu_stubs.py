"""TEST-ONLY: let Megatron-Core 0.16.1 run on CPU processes over gloo.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the math
(device placement of scratch buffers, side streams for overlap, the CUDA RNG tracker). The
tests replace exactly those places so that TP, EP, PP and dist_checkpointing run with 2-4
CPU processes. Production code never imports this module: it changes torch.cuda for the
whole process, which is only acceptable inside a spawned test worker.

What `install_cpu_stubs()` patches, and why:

torch.cuda (process-wide; CUDA is absent on these machines, so nothing real is shadowed)
  current_device()          -> torch.device("cpu"). Megatron allocates collective outputs,
                               global buffers, p2p shape tensors and router/expert scratch with
                               device=torch.cuda.current_device() (tensor_parallel/mappings.py,
                               layers.py, utils.py GlobalMemoryBuffer, p2p_communication.py,
                               moe/experts.py, moe/router.py, dist_checkpointing savers).
  Stream, Event, stream(),  -> inert stand-ins. The alltoall dispatcher makes a class-level
  current_stream(),            D2H side stream at construction (moe/token_dispatcher.py) and
  default_stream(),            syncs on its event; Megatron DDP makes a communication stream
  synchronize()                (distributed/distributed_data_parallel.py, param_and_grad_buffer.py);
                               p2p_communication.py calls synchronize() after batched p2p.
                               On CPU every op is already synchronous, so waiting is a no-op.
  get_rng_state(),          -> the CPU generator's. Megatron's RNG tracker
  set_rng_state(),             (tensor_parallel/random.py CudaRNGStatesTracker, used by
  manual_seed()                model_parallel_cuda_manual_seed and by layer init without
                               use_cpu_initialization) forks "the CUDA generator"; on CPU the
                               CPU generator plays that role, so forked streams stay real
                               (different per TP rank, restored on exit).

megatron.core.tensor_parallel.random
  _get_cuda_rng_state, _set_cuda_rng_state
                            -> CPU generator state. They index torch.cuda.default_generators,
                               which is empty without CUDA.
  logger level ERROR        -> fork() warns "CPU RNG state changed within GPU RNG context"
                               every time; with the CPU generator standing in, that is expected.

megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu
                            -> also converts CPU tensors to numpy when as_numpy=True. The
                               original only converts CUDA tensors, so on CPU the alltoall
                               split sizes stay tensors, which all_to_all_single rejects.

megatron.core.pipeline_parallel.schedules.torch
                            -> a view of torch whose zeros/empty/tensor map device="cuda" to
                               the CPU. The schedules allocate their token counter with a
                               literal device="cuda" (forward_backward_no_pipelining and both
                               pipelined schedules).

Nothing else is changed: parallel_state, the collectives, the layers' math, the dispatchers'
permutations and dist_checkpointing run as shipped.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

_INSTALLED = False
CPU = torch.device("cpu")


class _Event:
    """Inert torch.cuda.Event: on CPU every op has completed when it returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    """Inert torch.cuda.Stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _Stream)

    def __hash__(self):
        return 0


_DEFAULT_STREAM = _Stream()


def _device_kwarg_to_cpu(fn):
    def wrapped(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = CPU
        return fn(*args, **kwargs)

    return wrapped


class _TorchCpuView(types.ModuleType):
    """Forwards every attribute to torch; the allocators set on the instance put device="cuda"
    on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_torch_view() -> types.ModuleType:
    view = _TorchCpuView("torch_cpu_view")
    for name in ("zeros", "ones", "empty", "full", "tensor"):
        setattr(view, name, _device_kwarg_to_cpu(getattr(torch, name)))
    return view


def _move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


def install_cpu_stubs() -> None:
    """Patch the CUDA assumptions listed in the module docstring. Idempotent; call it in each
    worker process before building any Megatron module."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_stubs() is for CPU-only test workers; CUDA is available here")

    cuda = torch.cuda
    cuda.current_device = lambda: CPU
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _cpu_torch_view()

    _INSTALLED = True
