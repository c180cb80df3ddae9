"""CUDA graphs for MoE layers at fixed shapes: one replay per forward and one per backward.

An MoE layer launches ~100 small kernels per training forward + backward (routing, statistics,
dispatch, combine); on a host that needs 7-14 us per launch the GPU idles between them. The
training forward of every router has no host sync and updates its buffers (statistics, DiffMoE
thresholds, aux-free bias) in place, so the whole layer can be captured once and replayed.

`graph_moe_layer(layer, x, ctx)` captures `layer` for inputs shaped like (x, ctx) (a forward graph
and a backward graph sharing one memory pool, as torch.cuda.make_graphed_callables does) and
installs the graphed forward on that layer instance: the module, its parameters, buffers,
`last_aux` (the aux losses, graph outputs so their gradients flow) and statistics API stay as
they were. Shapes, dtype, device and training mode must then stay
fixed; a call with other shapes raises ValueError, one in the other mode runs the eager forward.
Capture runs a few warm-up steps; the layer's buffers are restored afterwards, so graphing leaves
no trace in the statistics or thresholds. Gradient accumulation into `.grad` works as usual, but
costs a copy: the graph's gradient buffers are static, so autograd clones them into `.grad` (at
DiffMoE-L, E=16, the expert weight gradients are 16 x the dense FFN's). Outputs are static too:
one forward per backward (no second forward of the same layer before the first one's backward).

`CUDAGraphStep(fn)` captures a whole step instead (any no-argument callable: the forward and
backward of a model, optionally the optimizer): gradients are produced inside the graph, with no
copies. Its tensors (inputs, `.grad`) are static: copy new data into the captured inputs before
each replay. `replay_time_us(fn)` times one replay of `fn` captured alone (micro-benchmarks).
"""

from __future__ import annotations

import torch
from torch import nn

from moedit.models.moe import MoELayer, RoutingContext


class _GraphedLayer:
    """The static tensors and the two graphs (forward; backward of every output) of one layer."""

    def __init__(self, layer: MoELayer, x, noise_level, noise_bin, labels, has_labels: bool, warmup: int):
        self.layer, self.has_labels = layer, has_labels
        self.params = tuple(p for p in layer.parameters() if p.requires_grad)
        # x is captured as requiring grad (a block's hidden state always does in training)
        self.inputs = (x.detach().clone().requires_grad_(), noise_level.clone(), noise_bin.clone(), labels.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._backward(self._forward(), None)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool):
            self.outputs = self._forward()
        self.grad_outputs = [torch.zeros_like(o) for o in self.outputs]
        with torch.cuda.graph(self.backward_graph, pool=pool):
            self.grads = self._backward(self.outputs, self.grad_outputs)

    def _forward(self) -> tuple[torch.Tensor, ...]:
        x, noise_level, noise_bin, labels = self.inputs
        ctx = RoutingContext(x.shape[0], noise_level, noise_bin, labels if self.has_labels else None)
        out = type(self.layer).forward(self.layer, x, ctx)  # the class's forward: the instance's is the graph
        self.aux_names = tuple(self.layer.last_aux)
        return (out, *self.layer.last_aux.values())

    def _backward(self, outputs, grad_outputs) -> tuple[torch.Tensor | None, ...]:
        """Gradients of (x, *params) given every output's gradient (ones in the warm-up)."""
        grad_outputs = [torch.ones_like(o) for o in outputs] if grad_outputs is None else grad_outputs
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], (self.inputs[0],) + self.params, [g for _, g in pairs],
                                   allow_unused=True)


class _ReplayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed: _GraphedLayer, x, noise_level, noise_bin, labels, *params):
        for static, value in zip(graphed.inputs, (x, noise_level, noise_bin, labels)):
            static.detach().copy_(value)
        graphed.forward_graph.replay()
        ctx.graphed = graphed
        return tuple(o.detach() for o in graphed.outputs)

    @staticmethod
    def backward(ctx, *grads):
        graphed = ctx.graphed
        for static, grad in zip(graphed.grad_outputs, grads):
            static.copy_(grad)
        graphed.backward_graph.replay()
        # the static tensors themselves, not detached aliases: autograd then copies them into a fresh
        # .grad (or adds them into an existing one) instead of adopting the buffer the next replay
        # overwrites (which would break gradient accumulation over micro-batches)
        return (None, *graphed.grads[:1], None, None, None, *graphed.grads[1:])


def graph_moe_layer(layer: MoELayer, x: torch.Tensor, ctx: RoutingContext, warmup: int = 3) -> MoELayer:
    """Capture `layer`'s forward and backward for inputs like (x, ctx); returns the same layer."""
    if not x.is_cuda:
        raise ValueError(f"graph_moe_layer: x is on {x.device}; CUDA graphs need CUDA tensors")
    if not layer.training:
        raise ValueError("graph_moe_layer: capture in training mode (eval forwards may sync on the host)")
    saved = {name: b.clone() for name, b in layer.named_buffers()}
    has_labels = ctx.labels is not None
    labels = ctx.labels if has_labels else torch.zeros_like(ctx.noise_bin)
    graphed = _GraphedLayer(layer, x, ctx.noise_level, ctx.noise_bin, labels, has_labels, warmup)
    with torch.no_grad():  # undo the warm-up steps' statistics and threshold updates
        for name, b in layer.named_buffers():
            b.copy_(saved[name])
    shape, dtype = tuple(x.shape), x.dtype

    def forward(x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise ValueError(f"graphed MoE layer: captured for x {shape} {dtype}, got {tuple(x.shape)} {x.dtype}; "
                             f"graph it again for a new shape")
        if not layer.training:
            return type(layer).forward(layer, x, ctx)
        outs = _ReplayFunction.apply(graphed, x, ctx.noise_level, ctx.noise_bin,
                                     ctx.labels if has_labels else labels, *graphed.params)
        layer.last_aux = dict(zip(graphed.aux_names, outs[1:]))
        return outs[0]

    layer.forward = forward
    return layer


def ungraph_moe_layer(layer: MoELayer) -> MoELayer:
    """Back to the eager forward."""
    layer.__dict__.pop("forward", None)
    return layer


class CUDAGraphStep:
    """Capture a no-argument callable once (after `warmup` eager calls on a side stream); each call
    replays it and returns what the captured call returned (static tensors, overwritten by the next
    replay). `restore`: modules whose buffers are reset after the warm-up calls (statistics,
    thresholds), so only replays count."""

    def __init__(self, fn, warmup: int = 3, restore: tuple[nn.Module, ...] = ()):
        saved = [(b, b.clone()) for m in restore for b in m.buffers()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = fn()

    def __call__(self):
        self.graph.replay()
        return self.result


def replay_time_us(fn, iters: int = 100) -> float:
    """Microseconds per call of `fn` (no arguments) captured in a CUDA graph and replayed `iters`
    times: GPU time without launch overhead. `fn` runs once eagerly first (warm-up, allocations)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters
