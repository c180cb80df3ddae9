"""Routers: from token features to a `RoutingDecision` (which token goes to which expert, weight).

A router sees the flattened routing pool x (S, D), S = B * T, tokens sample-major, and returns
assignments sorted by expert. The MoE layer (moe.py) dispatches, runs the experts and combines;
a new routing scheme is a new router class registered in `ROUTER_CLASSES`.

Training forwards of every router avoid host syncs (no .item(), no nonzero): shapes depend only
on S, E and the config. DiffMoE's dynamic inference has data-dependent counts and syncs once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moedit.models.config import MoEConfig
from moedit.models.kernels import KernelOptions
from moedit.models.kernels.predictor import gate_and_predictor, predictor_usable
from moedit.models.kernels.router_tail import DiffMoETail, fused_tail_usable


@dataclass
class RoutingDecision:
    """Assignments sorted by expert: rows [start_e, start_e + tokens_per_expert[e]) go to expert e."""

    token_index: torch.Tensor  # (N,) long, index into the pool of S tokens
    weight: torch.Tensor  # (N,) combine weight (0 on padding slots)
    tokens_per_expert: torch.Tensor  # (E,) long, real (non-padding) rows per expert
    # (S, E) router probabilities (rows sum to 1), for stats and capture; from DiffMoE's fused training
    # tail they carry no gradient (its combine weights `weight` do)
    probs: torch.Tensor
    capacity: int | None = None  # K when every expert has exactly K rows (N = E * K, padding included)
    valid: torch.Tensor | None = None  # (N,) bool, False on padding slots; None: all valid
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted auxiliary losses
    dropped: torch.Tensor | None = None  # () long, assignments dropped by a capacity limit
    predictor_prob: torch.Tensor | None = None  # (S, E) DiffMoE capacity-predictor probabilities
    predictor_hits: torch.Tensor | None = None  # (2,) float64: true positives, predicted positives
    tokens_per_sample: torch.Tensor | None = None  # (B, E) long real rows per sample and expert; None: from token_index
    entropy_sum: torch.Tensor | None = None  # () float64 sum over tokens of the score entropy; None: from probs
    inverse: torch.Tensor | None = None  # (E, S) int32 row of each (expert, token) assignment or -1; None: built


def _full_counts(num_experts: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.full((num_experts,), count, dtype=torch.long, device=device)


def _gate(hidden_size: int, num_experts: int, init_std: float | None) -> nn.Linear:
    gate = nn.Linear(hidden_size, num_experts, bias=False)
    if init_std is not None:
        nn.init.normal_(gate.weight, std=init_std)
    return gate


def router_float(t: torch.Tensor) -> torch.Tensor:
    """Routing math in float32 at least (float64 stays float64, for exact reference tests)."""
    return t if t.dtype == torch.float64 else t.float()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE router z-loss)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def _stable_sort_by_expert(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of assignments by expert, stable (first come first served within an expert).

    expert: (N,) long in [0, E). Returns (order (N,): sorted position -> assignment, counts (E,)).
    A running count per expert replaces a radix argsort (several passes, ~0.2 ms for 8k keys on
    an H100) and bincount (which reads the max on the host: a sync on CUDA).
    """
    N = expert.shape[0]
    # (E, N): the scan runs along the contiguous last dim (a scan over dim 0 of (N, E) is ~1.5 ms)
    running = (torch.arange(num_experts, device=expert.device)[:, None] == expert[None]).cumsum(1)
    counts = running[:, -1] if N else torch.zeros(num_experts, dtype=torch.long, device=expert.device)
    rank = running.gather(0, expert[None]).squeeze(0) - 1  # (N,) earlier assignments to the same expert
    position = (counts.cumsum(0) - counts)[expert] + rank  # (N,) sorted position
    order = torch.empty_like(expert).scatter_(0, position, torch.arange(N, device=expert.device))
    return order, counts


class Router(nn.Module):
    """Base: a bias-free gate Linear(D, E) (`gate.weight` (E, D)); `kernel_options` (default
    `KernelOptions()`) chooses fused or reference paths where a router has them (DiffMoE)."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, kernel_options: KernelOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.kernel_options = kernel_options or KernelOptions()
        self.num_experts = cfg.num_experts
        self.gate = _gate(hidden_size, cfg.num_experts, cfg.gate_init_std)

    def reset_gate(self) -> None:
        if self.cfg.gate_init_std is not None:
            nn.init.normal_(self.gate.weight, std=self.cfg.gate_init_std)
        else:
            self.gate.reset_parameters()


class DiffMoERouter(Router):
    """Expert choice over the batch-level token pool with a capacity predictor (DiffMoE).

    Training: each expert takes its top-K tokens by softmax score over all S tokens,
    K = int(S / E * capacity); the score is the combine weight. The predictor (Linear-SiLU-Linear
    on x.detach()) learns the selection mask with BCE, and each expert's threshold tracks the
    K-th largest predictor probability by EMA. Eval: `dynamic` gives expert e the top-k_e tokens
    by score with k_e = #{sigmoid(pred_e) > tau_e}; `global_threshold` uses one gamma;
    `static` uses K at `inference_capacity`.

    `kernel_options.fused_router_tail`: the training tail in four Triton kernels
    (kernels/router_tail.py) where they run (CUDA, z-loss off); False: the PyTorch ops below (the
    reference; benchmarks/moe_layer.py --unfused-router). `kernel_options.fused_predictor`: the gate
    in the predictor's first GEMM and the predictor's SiLU inside its Triton kernels
    (kernels/predictor.py) where they run; False: the gate and the three modules apart (the
    reference; benchmarks/moe_layer.py --unfused-predictor).
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, kernel_options: KernelOptions | None = None):
        super().__init__(cfg, hidden_size, kernel_options)
        E, D = cfg.num_experts, hidden_size
        self.capacity_predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
        self.register_buffer("expert_threshold", torch.zeros(E))

    def forward(self, x: torch.Tensor, batch_size: int) -> RoutingDecision:
        S, E = x.shape[0], self.num_experts
        logits, pred_logits = self.logits(x)
        if (self.training and self.kernel_options.fused_router_tail and self.cfg.z_loss_coef == 0
                and fused_tail_usable(logits) and fused_tail_usable(pred_logits)):
            return self._fused_training_decision(logits, pred_logits, batch_size)
        logits, pred_logits = router_float(logits), router_float(pred_logits)
        probs = logits.softmax(dim=-1)
        pred_prob = torch.sigmoid(pred_logits)
        aux = {"z": z_loss(logits)} if self.cfg.z_loss_coef > 0 else {}
        if not self.training and self.cfg.inference_mode != "static":
            gamma = self.expert_threshold if self.cfg.inference_mode == "dynamic" else torch.full_like(
                self.expert_threshold, self.cfg.global_threshold)
            decision = self._threshold_decision(probs, pred_prob > gamma.to(pred_prob.dtype)[None])
        else:
            K = self._tokens_per_expert(S, self.cfg.capacity if self.training else self.cfg.inference_capacity)
            if self.training:
                decision = self._training_decision(probs, pred_logits, pred_prob.detach(), K, batch_size)
                aux["predictor"] = decision.aux.pop("predictor")
            else:
                weight, index = probs.t().topk(K, dim=1, sorted=False)  # (E, K) each
                decision = RoutingDecision(index.reshape(-1), weight.reshape(-1), _full_counts(E, K, x.device),
                                           probs, capacity=K)
        decision.aux = aux
        decision.predictor_prob = pred_prob.detach()
        return decision

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate logits, capacity-predictor logits), each (S, E), of a pool x (S, D). The predictor
        reads x detached: it must not shape the backbone's features."""
        if self.kernel_options.fused_predictor and predictor_usable(x):  # one GEMM for both (kernels/predictor.py)
            return gate_and_predictor(self.gate, self.capacity_predictor, x, self.kernel_options)
        return self.gate(x), self.capacity_predictor(x.detach())

    def _tokens_per_expert(self, S: int, capacity: float) -> int:
        E = self.num_experts
        K = int(S / E * capacity)
        if K < 1:
            raise ValueError(f"moe.capacity = {capacity}: gives K = int(S/E * C) = 0 tokens per expert "
                             f"for a pool of S = {S} tokens and E = {E}; raise capacity or the batch size")
        return K

    def _sample_edges(self, S: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """(E, B + 1) long, contiguous (searchsorted copies other layouts): each row the first token of
        every sample, then S. Built once per shape."""
        key = (S, batch_size, device)
        if getattr(self, "_edges", (None,))[0] != key:
            edges = torch.arange(0, S + 1, S // batch_size, device=device)
            self._edges = (key, edges.expand(self.num_experts, -1).contiguous())
        return self._edges[1]

    def _update_threshold(self, kth: torch.Tensor) -> None:
        """EMA of each expert's K-th largest predictor probability."""
        d = self.cfg.threshold_decay
        self.expert_threshold.mul_(d).add_(kth.to(self.expert_threshold.dtype), alpha=1 - d)

    def _fused_training_decision(self, logits, pred_logits, batch_size: int) -> RoutingDecision:
        """`_training_decision` through kernels/router_tail.py: the same decision, loss, statistics
        and threshold update in four kernels, plus the inverse map the combine reads."""
        S, E = logits.shape
        K = self._tokens_per_expert(S, self.cfg.capacity)
        weight, loss, index, inverse, kth, stats, stacked = DiffMoETail.apply(
            logits, pred_logits, self.expert_threshold, K, self.kernel_options)
        with torch.no_grad():
            self._update_threshold(kth[E:])
            # each expert's tokens are in token order: per sample, the difference of the positions of
            # its first token (one searchsorted instead of a compare and a sum over the (E, S) map)
            per_sample = torch.searchsorted(index, self._sample_edges(S, batch_size, logits.device)).diff(dim=1)
        return RoutingDecision(index.reshape(-1), weight.reshape(-1), _full_counts(E, K, logits.device),
                               stacked[:E].t(), capacity=K, aux={"predictor": loss}, predictor_prob=stacked[E:].t(),
                               predictor_hits=stats[1:], tokens_per_sample=per_sample.t(), entropy_sum=stats[0],
                               inverse=inverse)

    def _training_decision(self, probs, pred_logits, pred_prob, K: int, batch_size: int) -> RoutingDecision:
        """Top-K tokens per expert by score, the predictor's BCE against that selection, the
        threshold EMA, and the statistics that come with them (probs, pred_*: (S, E))."""
        S, E = probs.shape
        # One topk over the router scores and the predictor probabilities stacked (2E rows): the
        # predictor's K-th largest value (threshold EMA) rides along with the expert selection.
        # Unsorted: the order within an expert changes no sum, and sorting costs more than amin.
        values, index = torch.cat([probs, pred_prob], dim=1).t().topk(K, dim=1, sorted=False)  # (2E, K)
        weight, index = values[:E], index[:E]  # (E, K): the combine weights carry the router's gradient
        target = torch.zeros(E, S, dtype=pred_logits.dtype, device=probs.device).scatter_(1, index, 1.0)  # (E, S)
        loss = F.binary_cross_entropy_with_logits(pred_logits.t(), target)
        # (true positives, predicted positives) of dynamic inference with the thresholds before this update
        predicted = (pred_prob.t() > self.expert_threshold.to(pred_prob.dtype)[:, None]).to(target.dtype)  # (E, S)
        hits = torch.stack([predicted * target, predicted]).sum(dim=(1, 2), dtype=torch.float64)  # (2,)
        self._update_threshold(values[E:].detach().amin(dim=1))  # (E,) K-th largest predictor probability
        per_sample = target.view(E, batch_size, S // batch_size).sum(dim=2)  # (E, B) tokens taken per sample
        return RoutingDecision(index.reshape(-1), weight.reshape(-1), _full_counts(E, K, probs.device), probs,
                               capacity=K, aux={"predictor": loss}, predictor_hits=hits,
                               tokens_per_sample=per_sample.t().long())

    @staticmethod
    def _threshold_decision(probs: torch.Tensor, above: torch.Tensor) -> RoutingDecision:
        """Expert e takes its top-k_e tokens by score, k_e = above[:, e].sum() (data-dependent: syncs)."""
        S, E = probs.shape
        counts = above.sum(dim=0)  # (E,)
        weight_sorted, order = probs.t().sort(dim=1, descending=True)  # (E, S)
        keep = torch.arange(S, device=probs.device)[None] < counts[:, None]  # (E, S)
        return RoutingDecision(order[keep], weight_sorted[keep], counts.long(), probs)


class TokenChoiceRouter(Router):
    """Top-k experts per token (GShard/Switch/DiT-MoE), with optional capacity and aux-free bias."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, kernel_options: KernelOptions | None = None):
        super().__init__(cfg, hidden_size, kernel_options)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=cfg.aux_free_bias)

    def forward(self, x: torch.Tensor, batch_size: int) -> RoutingDecision:
        S, E, k = x.shape[0], self.num_experts, self.cfg.top_k
        logits = router_float(self.gate(x))  # (S, E)
        if self.cfg.score_func == "softmax":
            scores = probs = logits.softmax(dim=-1)
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        select = scores + self.expert_bias.to(scores.dtype)[None] if self.cfg.aux_free_bias else scores
        top_index = select.topk(k, dim=-1).indices  # (S, k); the bias steers selection only
        top_weight = scores.gather(1, top_index)  # (S, k)
        if self.cfg.renormalize:
            top_weight = top_weight / top_weight.sum(dim=-1, keepdim=True)
        expert_flat = top_index.reshape(-1)  # (S*k,), token-major
        order, counts = _stable_sort_by_expert(expert_flat, E)
        # Switch balance: sum_i f_i P_i, f_i = E * share of assignments, P_i = mean router prob
        balance = (counts.float() * (E / (S * k)) * probs.mean(dim=0)).sum()
        aux = {"balance": balance}
        if self.cfg.z_loss_coef > 0:
            aux["z"] = z_loss(logits)
        if self.training and self.cfg.aux_free_bias:
            with torch.no_grad():
                load = counts.float()
                self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.cfg.aux_free_rate)

        token_sorted = torch.div(order, k, rounding_mode="floor")
        weight_sorted = top_weight.reshape(-1)[order]
        if self.cfg.capacity_factor is None:
            decision = RoutingDecision(token_sorted, weight_sorted, counts, probs)
        else:
            decision = self._drop_to_capacity(expert_flat[order], token_sorted, weight_sorted, counts, probs)
        decision.aux = aux
        return decision

    def _drop_to_capacity(self, expert_sorted, token_sorted, weight_sorted, counts, probs) -> RoutingDecision:
        """Pack assignments into (E, cap) slots; those past `cap` in an expert are dropped."""
        S, E, k = probs.shape[0], self.num_experts, self.cfg.top_k
        cap = math.ceil(S * k / E * self.cfg.capacity_factor)
        N = expert_sorted.shape[0]
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        pos = torch.arange(N, device=probs.device) - starts[expert_sorted]  # (N,) rank within expert
        keep = pos < cap
        slot = torch.where(keep, expert_sorted * cap + pos, E * cap)  # dropped -> one spare slot
        size = E * cap + 1
        slot_token = torch.zeros(size, dtype=torch.long, device=probs.device).scatter_(0, slot, token_sorted)
        slot_weight = torch.zeros(size, dtype=weight_sorted.dtype, device=probs.device).scatter(
            0, slot, weight_sorted * keep)
        slot_valid = torch.zeros(size, dtype=torch.bool, device=probs.device).scatter_(0, slot, keep)
        return RoutingDecision(slot_token[:-1], slot_weight[:-1], counts.clamp(max=cap), probs, capacity=cap,
                               valid=slot_valid[:-1], dropped=(~keep).sum())


class ExpertChoiceRouter(Router):
    """Expert choice within each sample (EC-DiT): expert e takes the top-K of the T tokens of every
    sample, K = int(T / E * capacity); softmax scores are the combine weights."""

    def forward(self, x: torch.Tensor, batch_size: int) -> RoutingDecision:
        S, E = x.shape[0], self.num_experts
        T = S // batch_size
        logits = router_float(self.gate(x))  # (S, E)
        probs = logits.softmax(dim=-1)
        K = int(T / E * self.cfg.capacity)
        if K < 1:
            raise ValueError(f"moe.capacity = {self.cfg.capacity}: gives K = int(T/E * C) = 0 tokens per expert "
                             f"per sample for T = {T} tokens and E = {E}; raise capacity or lower num_experts")
        per_sample = probs.view(batch_size, T, E).permute(2, 0, 1)  # (E, B, T)
        weight, index = per_sample.topk(K, dim=-1)  # (E, B, K)
        index = index + (torch.arange(batch_size, device=x.device) * T).view(1, -1, 1)  # pool positions
        return RoutingDecision(index.reshape(-1), weight.reshape(-1), _full_counts(E, batch_size * K, x.device), probs,
                               capacity=batch_size * K, aux={"z": z_loss(logits)} if self.cfg.z_loss_coef > 0 else {},
                               tokens_per_sample=torch.full((batch_size, E), K, dtype=torch.long, device=x.device))


ROUTER_CLASSES: dict[str, type[Router]] = {
    "diffmoe": DiffMoERouter,
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
}

AUX_COEF_FIELDS = {"balance": "balance_coef", "z": "z_loss_coef", "predictor": "predictor_coef"}


def aux_terms(cfg: MoEConfig) -> tuple[str, ...]:
    """The auxiliary losses a router of this config produces in training (z only if weighted)."""
    terms = {"diffmoe": ("predictor",), "token_choice": ("balance",), "expert_choice": ()}[cfg.router]
    return terms + (("z",) if cfg.z_loss_coef > 0 else ())


def build_router(cfg: MoEConfig, hidden_size: int, kernel_options: KernelOptions | None = None) -> Router:
    if cfg.router not in ROUTER_CLASSES:
        raise ValueError(f"moe.router = {cfg.router!r}: must be one of {', '.join(ROUTER_CLASSES)}")
    return ROUTER_CLASSES[cfg.router](cfg, hidden_size, kernel_options)
