"""The whole training step as one CUDA graph (`train.cuda_graph`).

At DiffMoE-L's widths and the paper's batch (32 per GPU) the GPU waits for the host: one step
launches thousands of kernels (forward, backward, the fused AdamW, the EMA, the clip, the masked
restore of deferred checks), and the host needs longer to launch them than the GPU needs to run
them. A CUDA graph records the launches once and replays them with one call.

What makes the step capturable: every routed layer has static shapes in training (expert choice
takes a fixed number of tokens per expert; token choice runs at a fixed capacity), the deferred step
never reads the device on the host, the learning rate lives in a device tensor that the trainer
fills before each step, and the optimizer is torch's fused AdamW with `capturable=True`.

`StepGraph(fn, warmup)` wraps the trainer's device step `fn(micro_batches) -> outputs`. The first
`warmup` calls run `fn` eagerly on a side stream (lazy initialisation: the optimizer's moments,
cuBLAS workspaces, compiled blocks); the next call captures `fn` on copies of its inputs and replays
the graph once; every later call copies its inputs into those static tensors and replays. Every call
is a real training step: capturing runs nothing, so no step is repeated or lost. The outputs are the
graph's static tensors, overwritten by the next replay: read or clone them before. A call whose
inputs have other shapes (a short last batch with data.drop_last=false) runs eagerly. A capture
that fails (an operation CUDA cannot record) is a MoeditError naming it, or with `fallback` (what
train.cuda_graph = auto asks for) leaves every later step eager; `failed` says why.

`capture=False` replaces capture and replay with calling `fn` on the static inputs (CPU tests of the
trainer's bookkeeping around the graph; nothing is recorded).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from moedit.errors import MoeditError

Batches = list[dict[str, torch.Tensor]]


class StepGraph:
    def __init__(self, fn: Callable[[Batches], object], warmup: int = 2, capture: bool = True,
                 fallback: bool = False):
        self.fn, self.warmup, self.capture, self.fallback = fn, warmup, capture, fallback
        self.failed: str | None = None  # why the capture failed (fallback: every step then runs eagerly)
        self.calls = 0
        self.eager_calls = 0  # warm-up steps and steps whose inputs did not fit the graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s: float | None = None  # host seconds the capture took (set once)
        self.static: Batches | None = None
        self.outputs = None
        self.stream = torch.cuda.Stream() if capture else None  # warm-up and capture run on it

    def __call__(self, batches: Batches):
        self.calls += 1
        if self.failed or (self.static is None and self.calls <= self.warmup):
            return self._eager(batches)
        if self.static is None:
            start = time.perf_counter()
            self.static = [{k: v.clone() for k, v in b.items()} for b in batches]
            if self.capture:
                try:
                    self._capture()
                except RuntimeError as exc:  # capturing ran nothing: this step is still to be done
                    self.graph = self.static = self.outputs = None
                    self.failed = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    if not self.fallback:
                        raise MoeditError(f"train.cuda_graph = true: capturing the step as a CUDA graph failed: "
                                          f"{self.failed}; set train.cuda_graph=false (or auto, which then "
                                          f"trains with eager steps)") from exc
                    return self._eager(batches)
            self.capture_s = time.perf_counter() - start
        elif not self._fits(batches):
            return self._eager(batches)
        else:
            with torch.no_grad():
                for static, batch in zip(self.static, batches):
                    for k, v in batch.items():
                        static[k].copy_(v, non_blocking=True)
        if self.graph is None:  # capture=False: the outputs stay the same tensors, as a graph's do
            outputs = self.fn(self.static)
            self.outputs = outputs if self.outputs is None else _copy_into(self.outputs, outputs)
        else:
            self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        # thread_local: the loader's and the checkpoint writer's threads may use CUDA meanwhile
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            self.outputs = self.fn(self.static)
        torch.cuda.current_stream().wait_stream(self.stream)

    def _fits(self, batches: Batches) -> bool:
        return len(batches) == len(self.static) and all(
            k in static and v.shape == static[k].shape and v.dtype == static[k].dtype
            for static, batch in zip(self.static, batches) for k, v in batch.items())

    def _eager(self, batches: Batches):
        self.eager_calls += 1
        if self.stream is None:
            return self.fn(batches)
        # On the stream the graph is captured on (per-stream lazy state is then initialised there).
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = self.fn(batches)
        torch.cuda.current_stream().wait_stream(self.stream)
        return out


def _copy_into(dst, src):
    """Copy the tensors of `src` into those of `dst` (same nesting of tuples, lists and dicts); returns dst."""
    if isinstance(dst, torch.Tensor):
        with torch.no_grad():
            dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    else:
        for d, s in zip(dst, src):
            _copy_into(d, s)
    return dst
