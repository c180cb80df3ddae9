"""moedit's routers and experts behind Megatron-Core's MoE interfaces: `MegatronRouter` (a model-zoo
router returning Megatron's (probs, routing_map), with the routing statistics and the auxiliary
losses), `MegatronExperts` (the grouped experts, sharded over expert-parallel ranks) and
`DiTMoELayer` (Megatron's MoELayer, with a dispatcher-free path where no token leaves its rank).
Used by moedit/engines/megatron/model.py's layer specs."""

from __future__ import annotations

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig

from moedit.engines.megatron.layers import mark_params
from moedit.models.config import ModelConfig
from moedit.models.experts import GroupedExperts
from moedit.models.moe import RoutingContext, RoutingStats, run_experts
from moedit.models.routers import AUX_COEF_FIELDS, RoutingDecision, build_router


class MegatronRouter(RoutingStats, MegatronModule):
    """A model-zoo router (`impl`) returning Megatron's (probs, routing_map) for the token dispatcher.

    `ctx` (a RoutingContext) is set by the model before each forward, for the statistics.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, *, model_cfg: ModelConfig,
                 block_index: int, num_noise_bins: int):
        super().__init__(config=config)
        self.impl = build_router(model_cfg.moe, model_cfg.hidden_size)
        self.init_routing_stats(model_cfg, block_index, num_noise_bins)
        self.aux_coefs = {name: float(getattr(model_cfg.moe, AUX_COEF_FIELDS[name])) for name in self.aux_names}
        self.tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        self.ctx: RoutingContext | None = None
        self.layer_number = None
        if config.sequence_parallel:
            mark_params(self, sequence_parallel=True)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingDecision]:
        """x [s, b, h] (the whole micro-batch) -> (sample-major pool (b*s, h), the model-zoo router's
        decision over it); records the routing statistics and `last_aux`."""
        s, b, h = x.shape
        pool = x.transpose(0, 1).reshape(b * s, h)  # sample-major, as the single-device pool
        decision = self.impl(pool, b)
        # detached: the loss gets the aux terms through MoEAuxLossAutoScaler; a graph kept here would
        # keep the step's activations (and, through them, a discarded model) alive
        self.last_aux = {k: v.detach() for k, v in decision.aux.items()}
        self._record(decision, self.ctx, s)
        return pool, decision

    def with_aux_loss(self, t: torch.Tensor, decision: RoutingDecision, tp: int = 1) -> torch.Tensor:
        """t unchanged; in backward the weighted auxiliary losses (each TP rank adds 1/TP) get their gradient."""
        if self.training and decision.aux:
            total = sum(self.aux_coefs[name] * value for name, value in decision.aux.items()) / tp
            t = MoEAuxLossAutoScaler.apply(t, total)
        return t

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """input [s_local, b, h] -> probs [s_local * b, E] (combine weights, 0 where not routed), routing_map (bool)."""
        tp = self.tp_group.size() if self.config.sequence_parallel else 1
        x = gather_from_sequence_parallel_region(input, group=self.tp_group) if tp > 1 else input  # [s, b, h]
        s, b, h = x.shape
        E = self.num_experts
        _, decision = self.decide(x)
        valid = decision.valid
        token, expert = decision.token_index, self._row_expert(decision)
        weight = decision.weight
        if valid is not None:
            token, expert, weight = token[valid], expert[valid], weight[valid]
        probs = torch.zeros(b * s, E, dtype=weight.dtype, device=x.device).index_put((token, expert), weight)
        routing_map = torch.zeros(b * s, E, dtype=torch.bool, device=x.device).index_put(
            (token, expert), torch.ones_like(token, dtype=torch.bool))

        def local(t: torch.Tensor) -> torch.Tensor:  # sample-major (b*s, E) -> this rank's [s_local*b, E]
            t = t.view(b, s, E).transpose(0, 1)
            if tp > 1:
                n = s // tp
                r = self.tp_group.rank()
                t = t[r * n:(r + 1) * n]
            return t.reshape(-1, E)

        probs, routing_map = local(probs), local(routing_map)
        return self.with_aux_loss(probs, decision, tp).float(), routing_map.contiguous()


class MegatronExperts(MegatronModule):
    """The model zoo's grouped experts (one batched / grouped GEMM) behind Megatron's experts
    interface: forward(dispatched tokens sorted by local expert, tokens per local expert, probs)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, *,
                 model_cfg: ModelConfig, submodules=None):
        super().__init__(config=config)
        self.num_local_experts = num_local_experts
        self.impl = GroupedExperts(num_local_experts, model_cfg.hidden_size, model_cfg.expert_hidden,
                                   model_cfg.ffn_type)
        self.ep_group = pg_collection.ep if pg_collection is not None else parallel_state.get_expert_model_parallel_group()
        self.expt_dp_group = (pg_collection.expt_dp if pg_collection is not None
                              else parallel_state.get_expert_data_parallel_group())
        mark_params(self, allreduce=False)  # Megatron DDP: reduce over the expert-data-parallel group

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        counts = tokens_per_expert.to(device=tokens.device, dtype=torch.long)
        out = self.impl.forward_grouped(tokens, counts)
        return (out * permuted_probs.unsqueeze(-1).to(out.dtype)).to(tokens.dtype), None

    def backward_dw(self) -> None:
        pass

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Each (E_local, ...) tensor is the slice [ep_rank * E_local, ...) of a global (E, ...) tensor.
        Its copies are the expert-data-parallel replicas: the replica id counts those only. (The
        tensor-parallel rank is not part of it: at TP x EP the TP ranks hold different experts, and
        counting it left some slices with no main replica, so the checkpoint, the gathers and the grad
        norm each missed them.)"""
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()  # 0: expert tensor parallel must be 1
        out = {}
        for name, tensor in self.impl.state_dict(keep_vars=True).items():
            key = f"{prefix}impl.{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key, tensor, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
                replica_id=(0, etp_rank, self.expt_dp_group.rank()), prepend_axis_num=len(sharded_offsets))
        return out


class DiTMoELayer(MegatronMoELayer):
    """Megatron's MoELayer with moedit's router and experts. Where no token leaves its rank
    (expert and tensor parallel size 1) it skips the token dispatcher: the model zoo's path
    (`moedit.models.moe.run_experts`: a gather of the decision's rows, one batched expert GEMM,
    a gather-sum combine) replaces the permute / unpermute of dense (tokens, E) maps, which made
    the MoE blocks of a DiffMoE-L-E8 step ~2x slower than the dense blocks' MLP on one H100.
    Parameters and checkpoints are the same either way."""

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules, layer_number: int | None = None,
                 pg_collection=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.local_path = config.expert_model_parallel_size == 1 and config.tensor_model_parallel_size == 1

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if not self.local_path or intermediate_tensors is not None or padding_mask is not None or self.moe_layer_recompute:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        s, b, h = hidden_states.shape
        pool, decision = self.router.decide(hidden_states)
        out = run_experts(pool, decision, self.experts.impl, self.router._row_expert(decision))  # (b*s, h)
        out = self.router.with_aux_loss(out, decision)
        return out.view(b, s, h).transpose(0, 1).contiguous().to(hidden_states.dtype), None


__all__ = ["DiTMoELayer", "MegatronExperts", "MegatronRouter"]
