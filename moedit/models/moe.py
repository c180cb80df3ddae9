"""The MoE FFN: route -> dispatch -> experts -> combine, plus routing statistics buffers.

Dispatch is a gather of the pool rows the decision names (the place expert parallelism would
plug in); combine is one out-of-place index_add (scatter-add) of weighted expert outputs, so a
token taken by several experts (expert choice) gets the sum and a token taken by none gets 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moedit.models.config import ModelConfig
from moedit.models.experts import GroupedExperts
from moedit.models.layers import build_dense_ffn
from moedit.models.routers import AUX_TERMS, RoutingDecision, build_router

# name -> (shape builder, dtype); every statistic is a SUM so ranks reduce with all-reduce SUM.
_AUX_ORDER = ("balance", "z", "predictor")


@dataclass
class RoutingContext:
    """Per-sample side information the model hands to its MoE layers for statistics."""

    batch_size: int
    noise_level: torch.Tensor  # (B,) in [0, 1], 1 = pure noise
    noise_bin: torch.Tensor  # (B,) long
    labels: torch.Tensor | None  # (B,) long after label dropout (num_classes = null), None if unconditional


class MoELayer(nn.Module):
    """Routed experts (+ optional shared experts) replacing one block's FFN."""

    def __init__(self, cfg: ModelConfig, block_index: int, num_noise_bins: int):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        E, D = moe.num_experts, cfg.hidden_size
        self.block_index = block_index
        self.router_name = moe.router
        self.num_experts = E
        self.top_k = moe.top_k
        self.capacity = moe.capacity
        self.router = build_router(moe, D)
        self.experts = GroupedExperts(E, D, cfg.expert_hidden, cfg.ffn_type)
        self.shared_experts = build_dense_ffn(cfg.ffn_type, D, cfg.shared_hidden) if cfg.shared_hidden else None
        self.last_aux: dict[str, torch.Tensor] = {}
        self.capture: list | None = None  # set by moedit.models.stats.capture_routing
        self.last_capacity: torch.Tensor | None = None  # () tokens processed / S of the latest forward
        num_classes = cfg.num_classes + 1 if (moe.stats_by_class and cfg.num_classes > 0) else 0
        long = torch.long
        # Statistics are not persistent: checkpoints hold weights; the trainer snapshots stats per interval.
        for name, shape, dtype in [
            ("tokens", (), long), ("tokens_per_expert", (E,), long),
            ("tokens_per_expert_by_noise", (num_noise_bins, E), long),
            ("tokens_per_expert_by_class", (num_classes, E), long),
            ("dropped", (), long), ("entropy_sum", (), torch.float64), ("entropy_count", (), long),
            ("predictor_confusion", (4,), long), ("capacity_used_sum", (), torch.float64),
            ("forwards", (), long), ("aux_sum", (len(_AUX_ORDER),), torch.float64),
        ]:
            self.register_buffer(f"stat_{name}", torch.zeros(shape, dtype=dtype), persistent=False)

    def stat_buffers(self) -> list[torch.Tensor]:
        return [b for n, b in self.named_buffers(recurse=False) if n.startswith("stat_")]

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        B, T, D = x.shape
        pool = x.reshape(B * T, D)  # (S, D), sample-major
        decision = self.router(pool, B)
        dispatched = pool[decision.token_index]  # (N, D)
        if decision.capacity is not None:
            out = self.experts.forward_uniform(dispatched.view(self.num_experts, decision.capacity, D))
            out = out.reshape(-1, D)  # (N, D)
        else:
            out = self.experts.forward_grouped(dispatched, decision.tokens_per_expert)  # (N, D)
        weighted = out * decision.weight.to(out.dtype).unsqueeze(1)
        combined = torch.zeros(B * T, D, dtype=out.dtype, device=x.device).index_add(
            0, decision.token_index, weighted)  # (S, D)
        if self.shared_experts is not None:
            combined = combined + self.shared_experts(pool)
        self.last_aux = decision.aux
        self._record(decision, ctx, T)
        return combined.view(B, T, D).to(x.dtype)

    @torch.no_grad()
    def _record(self, d: RoutingDecision, ctx: RoutingContext, T: int) -> None:
        """Accumulate statistics on device (no host sync)."""
        S, E = d.probs.shape
        N = d.token_index.shape[0]
        experts = torch.arange(E, device=d.probs.device)
        if d.capacity is not None:
            row_expert = experts.repeat_interleave(d.capacity)  # (N,)
        else:
            row_expert = torch.repeat_interleave(experts, d.tokens_per_expert, output_size=N)
        valid = torch.ones(N, dtype=torch.long, device=d.probs.device) if d.valid is None else d.valid.long()
        sample = torch.div(d.token_index, T, rounding_mode="floor")  # (N,)
        self.stat_tokens += S
        self.stat_tokens_per_expert += d.tokens_per_expert
        by_noise = self.stat_tokens_per_expert_by_noise
        by_noise.view(-1).index_add_(0, ctx.noise_bin[sample] * E + row_expert, valid)
        if self.stat_tokens_per_expert_by_class.shape[0] and ctx.labels is not None:
            self.stat_tokens_per_expert_by_class.view(-1).index_add_(0, ctx.labels[sample] * E + row_expert, valid)
        if d.dropped is not None:
            self.stat_dropped += d.dropped
        p = d.probs
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        self.stat_entropy_sum += entropy.double()
        self.stat_entropy_count += S
        if d.predictor_confusion is not None:
            self.stat_predictor_confusion += d.predictor_confusion
        used = d.tokens_per_expert.sum().double() / S  # tokens processed / (S/E) / E
        self.last_capacity = used
        self.stat_capacity_used_sum += used
        self.stat_forwards += 1
        for i, name in enumerate(_AUX_ORDER):
            if name in d.aux:
                self.stat_aux_sum[i] += d.aux[name].detach().double()
        if self.capture is not None:
            self._capture(d, ctx, row_expert, valid.bool(), T)

    def _capture(self, d: RoutingDecision, ctx: RoutingContext, row_expert, valid, T: int) -> None:
        S, E = d.probs.shape
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
        return AUX_TERMS[self.router_name]

    def reset_stats(self) -> None:
        for b in self.stat_buffers():
            b.zero_()
