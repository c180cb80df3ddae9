"""Megatron-Core building blocks of the DiT that are not DiT-specific model structure: a
bias-in-GEMM column-parallel linear, SDPA core attention for self- and cross-attention (caption key
padding mask), the cross-attention with the model zoo's optional qk-norm, and the parameter marks
Megatron's gradient reductions read. Used by moedit/engines/megatron/model.py (which takes the
compiled adaLN pieces from moedit/models/kernels/adaln.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, hand tensor-parallel linears their compute dtype: with sequence parallelism
    their backward reduce-scatters the input gradient into a buffer of the input's dtype."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return x.to(torch.get_autocast_dtype("cuda"))
    return x


def mark_params(module: nn.Module, **attrs) -> None:
    for p in module.parameters():
        for name, value in attrs.items():
            setattr(p, name, value)


class LocalColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear that, with no tensor-parallel peers, is `F.linear`: the bias is added in
    the GEMM's epilogue. Megatron's own path adds it in a separate broadcast pass over the output
    (for DiT-XL/2's qkv, 0.3 ms per layer on an H100). Parameters and checkpoints are unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = self.tp_group.size() == 1 and not self.config.defer_embedding_wgrad_compute

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        if not self.local or weight is not None or self.config._cpu_offloading_context is not None:
            return super().forward(input_, weight, runtime_gather_output)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


# ----- attention ---------------------------------------------------------------------------------
class SDPACoreAttention(MegatronModule):
    """Megatron core-attention interface over F.scaled_dot_product_attention (flash on H100).

    query [sq, b, heads_local, head_dim], key/value [sk, b, heads_local, head_dim] ->
    [sq, b, heads_local * head_dim]. Self-attention is bidirectional over all image tokens (no
    mask). Cross-attention (`attention_type` "cross") takes `attention_mask` (b, sk) bool in
    moedit's convention, True = a real caption token (Megatron's masks mean the opposite): padded
    tokens get exactly zero weight, as in the single-device `CrossAttention`.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.cross = attention_type == "cross"

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None or (attention_mask is not None
                                                                             and not self.cross):
            raise ValueError("SDPACoreAttention: a DiT attends over all tokens (cross-attention: a key padding "
                             "mask only); biases, self-attention masks and packed sequences are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, head_dim)
        mask = None
        if attention_mask is not None:
            b, sk = key.shape[1], key.shape[0]
            if attention_mask.shape != (b, sk) or attention_mask.dtype != torch.bool:
                raise ValueError(f"SDPACoreAttention: cross-attention mask of shape {tuple(attention_mask.shape)} "
                                 f"and dtype {attention_mask.dtype}: expected ({b}, {sk}) bool")
            mask = attention_mask[:, None, None, :]  # (b, 1, 1, sk) broadcasts over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class ContextColumnLinear(LocalColumnLinear):
    """Column-parallel linear for a context that is whole on every tensor-parallel rank (the
    projected caption): never gathers its input over the sequence. Under sequence parallelism
    the input gradient is not all-reduced either: it stays this rank's part (its heads), and
    the context's producer (the caption embedder) is marked `sequence_parallel`, so
    finalize_model_grads sums its parameter gradients over TP. Without sequence parallelism
    Megatron's usual all-reduce makes the gradient whole, as for every replicated module."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.disable_grad_reduce = self.sequence_parallel
        self.sequence_parallel = False
        self.allreduce_dgrad = self.tp_group.size() > 1 and not self.disable_grad_reduce


@dataclass
class DiTCrossAttentionSubmodules(CrossAttentionSubmodules):
    q_layernorm: type | None = None
    k_layernorm: type | None = None


class DiTCrossAttention(CrossAttention):
    """Megatron's cross-attention with the model zoo's optional qk-norm (per head, before the
    scores), which Megatron's `CrossAttention` lacks. Named q_layernorm / k_layernorm as in
    self-attention, so finalize_model_grads sums their gradients over tensor-parallel ranks."""

    def __init__(self, config: TransformerConfig, submodules: DiTCrossAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.padding, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.q_layernorm, self.k_layernorm = (
            build_module(norm, hidden_size=self.hidden_size_per_attention_head, config=config,
                         eps=config.layernorm_epsilon) if norm is not None else None
            for norm in (submodules.q_layernorm, submodules.k_layernorm))

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False, split_qkv=True):
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate,
                                                                split_qkv)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value


class HeadNorm(nn.LayerNorm):
    """qk-norm over the head dimension with Megatron's norm constructor signature."""

    def __init__(self, hidden_size: int, config: TransformerConfig, eps: float = 1e-6):
        super().__init__(hidden_size, eps=1e-6, dtype=config.params_dtype)


__all__ = ["ContextColumnLinear", "DiTCrossAttention", "DiTCrossAttentionSubmodules", "HeadNorm", "LocalColumnLinear",
           "SDPACoreAttention", "compute_dtype", "gelu_tanh", "mark_params"]
