"""The MoE FFN: route -> dispatch -> experts -> combine, plus routing statistics buffers.

Dispatch is a gather of the pool rows the decision names (the place expert parallelism would
plug in); combine adds the weighted expert outputs into their tokens, so a token taken by several
experts (expert choice) gets the sum and a token taken by none gets 0. Where Triton runs (CUDA)
the combine and the backward of dispatch are gather-sums over an (E, S) inverse map
(kernels/moe.py: no atomics); elsewhere one in-place index_add_ (scatter-add) each. Which runs, and
the kernels' tiles: the layer's `kernel_options` (moedit.models.kernels.KernelOptions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moedit.models.config import ModelConfig
from moedit.models.experts import GroupedExperts
from moedit.models.kernels import KernelOptions, triton_usable
from moedit.models.kernels.moe import GatherCombine, GatherDispatch, inverse_map
from moedit.models.layers import build_dense_ffn
from moedit.models.routers import RoutingDecision, aux_terms, build_router

# Slots of the per-layer float64 statistics vector `stat_scalars` (all sums). The predictor's
# fp/fn/tn are derived in the snapshot from tp, predicted and target positives and the total.
SCALAR_SLOTS = ("tokens", "dropped", "entropy_sum", "entropy_count", "capacity_used_sum", "forwards",
                "predictor_tp", "predictor_predicted", "predictor_target", "predictor_total",
                "aux_balance", "aux_z", "aux_predictor")
SLOT = {name: i for i, name in enumerate(SCALAR_SLOTS)}


@dataclass
class RoutingContext:
    """Per-sample side information the model hands to its MoE layers for statistics."""

    batch_size: int
    noise_level: torch.Tensor  # (B,) in [0, 1], 1 = pure noise
    noise_bin: torch.Tensor  # (B,) long
    labels: torch.Tensor | None  # (B,) long after label dropout (num_classes = null), None if unconditional


class RoutingStats:
    """Routing-statistics buffers and their on-device updates, for any module that routes.

    A mixin for nn.Module subclasses: the canonical `MoELayer` below and the Megatron-Core
    router wrapper (moedit/engines/megatron) share it, so both record the same statistics from a
    `RoutingDecision`. `moedit.models.stats` finds every module of this type.
    """

    def init_routing_stats(self, cfg: ModelConfig, block_index: int, num_noise_bins: int) -> None:
        moe = cfg.moe
        assert moe is not None
        E = moe.num_experts
        self.block_index = block_index
        self.router_name = moe.router
        self.num_experts = E
        self.top_k = moe.top_k
        self.capacity = moe.capacity
        self.last_aux: dict[str, torch.Tensor] = {}
        self.capture: list | None = None  # set by moedit.models.stats.capture_routing
        self.last_capacity: torch.Tensor | None = None  # () tokens processed / S of the latest forward
        self.aux_names = aux_terms(moe)
        # Text models have no labels: no per-class rows (snapshots report null, as for unconditional models).
        by_class = moe.stats_by_class and cfg.num_classes > 0 and cfg.condition == "class"
        num_classes = cfg.num_classes + 1 if by_class else 0
        # Statistics are not persistent: checkpoints hold weights; the trainer snapshots stats per interval.
        self.register_buffer("stat_scalars", torch.zeros(len(SCALAR_SLOTS), dtype=torch.float64), persistent=False)
        self.register_buffer("stat_tokens_per_expert", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("stat_tokens_per_expert_by_noise", torch.zeros(num_noise_bins, E, dtype=torch.long),
                             persistent=False)
        self.register_buffer("stat_tokens_per_expert_by_class", torch.zeros(num_classes, E, dtype=torch.long),
                             persistent=False)
        self._constants: dict = {}  # device tensors built once per shape (no per-step host->device copy)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would cast the float64 sums too: keep them float64 (exact counts)
        super()._apply(fn, recurse)
        if self.stat_scalars.dtype != torch.float64:
            self.stat_scalars = self.stat_scalars.to(torch.float64)
        self._constants = {}
        return self

    def stat_buffers(self) -> list[torch.Tensor]:
        return [b for n, b in self.named_buffers(recurse=False) if n.startswith("stat_")]

    def _constant_increment(self, S: int, d: RoutingDecision) -> torch.Tensor:
        """The per-forward increments that depend only on shapes, cached on device (a host->device
        copy happens once per new shape, not per step). For uniform decisions without padding this
        includes the capacity used, E*K/S."""
        E = self.num_experts
        hits = d.predictor_hits is not None
        uniform = d.capacity is not None and d.valid is None
        key = (d.probs.device, S, int(d.tokens_per_expert.shape[0]) * (d.capacity or 0), hits, uniform)

        def make() -> torch.Tensor:
            values = [0.0] * len(SCALAR_SLOTS)
            values[SLOT["tokens"]] = values[SLOT["entropy_count"]] = S
            values[SLOT["forwards"]] = 1
            if uniform:
                values[SLOT["capacity_used_sum"]] = E * d.capacity / S
            if hits:  # expert choice at training: every expert selects exactly K tokens
                values[SLOT["predictor_target"]] = E * d.capacity
                values[SLOT["predictor_total"]] = E * S
            return torch.tensor(values, dtype=torch.float64, device=d.probs.device)

        return self._constant(key, make)

    def _constant(self, key: tuple, make) -> torch.Tensor:
        """`make()`, built once per key and kept on the device. Under torch.compile it is built in
        the graph each call instead (a constant there): a tensor made inside a compiled region and
        kept would be a graph output, which CUDA-graph replays overwrite."""
        if torch.compiler.is_compiling():
            return make()
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def _slot_index(self, slots: tuple[str, ...]) -> torch.Tensor:
        device = self.stat_scalars.device
        return self._constant((device, slots), lambda: torch.tensor([SLOT[n] for n in slots], device=device))

    def _row_expert(self, d: RoutingDecision) -> torch.Tensor:
        """(N,) the expert of each assignment row."""
        N = d.token_index.shape[0]
        if d.capacity is not None:  # a shape-only constant: built once per capacity
            return self._constant(("row_expert", d.probs.device, d.capacity), lambda: torch.arange(
                self.num_experts, device=d.probs.device).repeat_interleave(d.capacity))
        experts = torch.arange(self.num_experts, device=d.probs.device)
        return torch.repeat_interleave(experts, d.tokens_per_expert, output_size=N)

    def _tokens_per_sample(self, d: RoutingDecision, batch_size: int, T: int) -> torch.Tensor:
        """(B, E) long rows per (sample, expert): the router's when it has them, else a histogram."""
        if d.tokens_per_sample is not None:
            return d.tokens_per_sample
        E, N = self.num_experts, d.token_index.shape[0]
        valid = torch.ones(N, dtype=torch.long, device=d.probs.device) if d.valid is None else d.valid.long()
        sample = torch.div(d.token_index, T, rounding_mode="floor")  # (N,)
        return torch.zeros(batch_size * E, dtype=torch.long, device=d.probs.device).index_add_(
            0, sample * E + self._row_expert(d), valid).view(batch_size, E)

    @torch.no_grad()
    def _record(self, d: RoutingDecision, ctx: RoutingContext, T: int) -> None:
        """Accumulate statistics on device in a handful of kernels (no host sync)."""
        S, E = d.probs.shape
        per_sample = self._tokens_per_sample(d, ctx.batch_size, T)  # (B, E)
        self.stat_tokens_per_expert += d.tokens_per_expert
        self.stat_tokens_per_expert_by_noise.index_add_(0, ctx.noise_bin, per_sample)
        if self.stat_tokens_per_expert_by_class.shape[0] and ctx.labels is not None:
            self.stat_tokens_per_expert_by_class.index_add_(0, ctx.labels, per_sample)

        constant = self._constant_increment(S, d)
        entropy = d.entropy_sum if d.entropy_sum is not None else torch.special.entr(d.probs).sum(dtype=torch.float64)
        slots, values = ["entropy_sum"], [entropy]
        if d.capacity is not None and d.valid is None:
            self.last_capacity = constant[SLOT["capacity_used_sum"]]
        else:
            self.last_capacity = d.tokens_per_expert.sum(dtype=torch.float64) / S  # tokens processed / (S/E) / E
            slots.append("capacity_used_sum")
            values.append(self.last_capacity)
        if d.dropped is not None:
            slots.append("dropped")
            values.append(d.dropped.to(torch.float64))
        if d.predictor_hits is not None:
            slots += ["predictor_tp", "predictor_predicted"]
            values += list(d.predictor_hits.unbind())
        for name, value in d.aux.items():
            slots.append(f"aux_{name}")
            values.append(value.detach().to(torch.float64))
        self.stat_scalars.index_add_(0, self._slot_index(tuple(slots)), torch.stack(values))
        self.stat_scalars += constant
        if self.capture is not None:
            self._capture(d, ctx, T)

    def _capture(self, d: RoutingDecision, ctx: RoutingContext, T: int) -> None:
        S, E = d.probs.shape
        row_expert = self._row_expert(d)
        valid = torch.ones_like(row_expert, dtype=torch.bool) if d.valid is None else d.valid
        selected = torch.zeros(S, E, dtype=torch.bool, device=d.probs.device)
        selected[d.token_index[valid], row_expert[valid]] = True
        labels = ctx.labels if ctx.labels is not None else torch.full_like(ctx.noise_bin, -1)
        self.capture.append({
            "block": self.block_index,
            "router": self.router_name,
            "num_experts": E,
            "selected": selected.cpu(),
            "scores": d.probs.detach().float().cpu(),
            "noise_level": ctx.noise_level.float().repeat_interleave(T).cpu(),
            "labels": labels.repeat_interleave(T).cpu(),
            "predictor_prob": None if d.predictor_prob is None else d.predictor_prob.float().cpu(),
        })

    def aux_terms(self) -> tuple[str, ...]:
        return self.aux_names

    def reset_stats(self) -> None:
        for b in self.stat_buffers():
            b.zero_()


class MoELayer(RoutingStats, nn.Module):
    """Routed experts (+ optional shared experts) replacing one block's FFN.

    `kernel_options` (default `KernelOptions()`) is given to the router and the experts too;
    `moedit.models.kernels.set_kernel_options(model, options)` changes all three."""

    def __init__(self, cfg: ModelConfig, block_index: int, num_noise_bins: int,
                 kernel_options: KernelOptions | None = None):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        D = cfg.hidden_size
        self.kernel_options = kernel_options = kernel_options or KernelOptions()
        self.router = build_router(moe, D, kernel_options)
        self.experts = GroupedExperts(moe.num_experts, D, cfg.expert_hidden, cfg.ffn_type, kernel_options)
        self.shared_experts = build_dense_ffn(cfg.ffn_type, D, cfg.shared_hidden) if cfg.shared_hidden else None
        self.init_routing_stats(cfg, block_index, num_noise_bins)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        B, T, D = x.shape
        pool = x.reshape(B * T, D)  # (S, D), sample-major
        decision = self.router(pool, B)
        combined = run_experts(pool, decision, self.experts, self._row_expert(decision), self.kernel_options)
        if self.shared_experts is not None:
            combined = combined + self.shared_experts(pool)
        self.last_aux = decision.aux
        self._record(decision, ctx, T)
        return combined.view(B, T, D).to(x.dtype)


def run_experts(pool: torch.Tensor, decision: RoutingDecision, experts: GroupedExperts, row_expert: torch.Tensor,
                options: KernelOptions | None = None) -> torch.Tensor:
    """Dispatch the pool rows a decision names, run the experts, combine: (S, D) -> (S, D).

    `row_expert` (N,) is each assignment row's expert (`RoutingStats._row_expert`). `options`
    (default: the experts' `kernel_options`): `combine` "auto" = gather-sum combine where Triton
    runs, else index_add_; "gather" / "index_add" force one; and the gather-sum's tiles.
    """
    S, D = pool.shape
    E = experts.num_experts
    options = options if options is not None else experts.kernel_options
    backend = options.combine
    gather = backend == "gather" or (backend == "auto" and triton_usable(pool))
    if gather:
        inv = decision.inverse if decision.inverse is not None else inverse_map(
            decision.token_index, row_expert, decision.valid, E, S)  # (E, S)
        dispatched = GatherDispatch.apply(pool, decision.token_index, inv, options)  # (N, D)
    else:
        # index_select, not pool[idx]: its backward is an index_add, not a sort-based index_put
        dispatched = pool.index_select(0, decision.token_index)  # (N, D)
    bias = None  # uniform rows + gather-sum: the experts' output bias is added in the combine
    if decision.capacity is not None:
        x = dispatched.view(E, decision.capacity, D)
        bias = experts.output_bias(experts.compute_dtype(x)) if gather else None
        out = experts.forward_uniform(x, add_output_bias=bias is None).reshape(-1, D)  # (N, D)
    else:
        out = experts.forward_grouped(dispatched, decision.tokens_per_expert)  # (N, D)
    if gather:
        return GatherCombine.apply(out, decision.weight, decision.token_index, inv, bias, options)  # (S, D)
    weighted = out * decision.weight.to(out.dtype).unsqueeze(1)
    # in place into fresh zeros: the out-of-place index_add would clone them first
    return torch.zeros(S, D, dtype=out.dtype, device=pool.device).index_add_(0, decision.token_index, weighted)
