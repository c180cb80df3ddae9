"""The DiT on Megatron-Core: a `TransformerBlock` of adaLN-Zero layers, sequence-first.

The model zoo's modules are reused, not copied: the embedders and final layer are
`moedit.models.layers`, the routers are `moedit.models.routers` (wrapped to return Megatron's
(probs, routing_map) pair), the experts are `moedit.models.experts.GroupedExperts` behind
Megatron's experts interface, and routing statistics are the same `RoutingStats` buffers. The
wrappers live in moe.py; attention and the linears in layers.py; the compiled adaLN pieces are the
model zoo's (moedit/models/kernels/adaln.py).
Megatron supplies tensor-parallel attention and dense MLPs, the MoE token dispatcher (alltoall
across expert-parallel ranks), the pipeline schedules and distributed checkpointing.

Conventions (as NVIDIA's own diffusion code builds a DiT on Megatron):
- hidden states are [s, b, h]; with sequence parallelism each tensor-parallel rank holds s / TP;
- the conditioning vector c (b, h) travels through the layers' `attention_mask` argument;
- adaLN linears, embedders, routers and the final layer are replicated across tensor-parallel
  ranks; under sequence parallelism each rank sees part of the tokens, so their gradients are
  partial and are marked `sequence_parallel` (Megatron's finalize_model_grads sums them over TP);
- timestep / label / caption embedders live on every pipeline stage; their parameters are marked
  `pipeline_parallel` and the config `has_cond_embedder`, so Megatron's finalize_model_grads sums
  their gradients over the pipeline group; every stage gets (t, y) or (t, text, text_mask,
  drop_text) from its data iterator.

Text models: every layer has a cross-attention sublayer (Megatron's `CrossAttention`: linear_q
and linear_kv column-parallel, linear_proj row-parallel, so heads split over tensor-parallel ranks
as in self-attention). The projected caption (the context, [L, b, h]) is whole on every rank,
also under sequence parallelism: queries come from the gathered sequence (linear_q gathers it,
linear_proj scatters the output back), keys and values from the whole context. Megatron's own
cross-attention expects a sequence-split context (T5's encoder output) and would gather it;
`ContextColumnLinear` does not. Under sequence parallelism it also leaves the context's gradient
partial (this rank's heads), like the conditioning vector's, and the caption embedder is marked
`sequence_parallel` like the timestep embedder, so finalize_model_grads sums it over TP once.

Routing pool: the DiffMoE pool is the whole micro-batch, as on one device. Under sequence
parallelism a router gathers its input over the tensor-parallel group, decides on the full pool
(identically on every TP rank) and keeps its own rows, so TP does not change the routing. Each
TP rank then carries the full auxiliary loss: it is added with weight 1 / TP so the sum over
ranks is the loss once.

REPA (a model with `ModelConfig.has_repa`): the training-only projector lives on the pipeline stage
that holds block `repa_depth` (global layer number). A forward hook on that layer takes its output,
gathers the tokens over the tensor-parallel group under sequence parallelism, and computes the
`repa` term on the whole micro-batch in the single-device (b, s, h) order, on every TP rank. The
gather's backward keeps this rank's slice of the (whole) hidden-state gradient, so each rank adds
the term with weight 1 and the projector's gradient is whole on every rank: it is replicated like a
tensor-parallel copy, not marked `sequence_parallel`. The weighted term enters the loss through
MoEAuxLossAutoScaler on the layer's output, as the routers' terms do.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import (
    CrossAttention,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from moedit.engines.megatron.layers import (
    ContextColumnLinear,
    DiTCrossAttention,
    DiTCrossAttentionSubmodules,
    HeadNorm,
    LocalColumnLinear,
    SDPACoreAttention,
    compute_dtype,
    gelu_tanh,
    mark_params,
)
from moedit.engines.megatron.moe import DiTMoELayer, MegatronExperts, MegatronRouter
from moedit.models.config import ModelConfig
from moedit.models.dit import DiT
from moedit.models.kernels import KernelOptions
from moedit.models.kernels.adaln import gated_residual, ln_modulate
from moedit.models.layers import CaptionEmbedder, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from moedit.models.moe import RoutingContext
from moedit.models.repa import build_projector, repa_loss
from moedit.models.routers import DiffMoERouter


# ----- the adaLN-Zero layer ------------------------------------------------------------------------
class AdaLNZeroLayer(TransformerLayer):
    """DiT block on Megatron: x + gate * attn(modulate(LN(x))), x + gate * mlp(modulate(LN(x))); a
    text model's block has x + cross_attn(LN(x), context) between them (pre-norm without affine,
    not modulated, as the single-device block's norm_cross).

    `attention_mask` carries the conditioning c (b, h); the adaLN linear is replicated. `context`
    [L, b, h] and `context_mask` (b, L) bool (True = real token) are the projected caption."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1,
                 hidden_dropout: float | None = None, pg_collection=None, vp_stage: int | None = None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        D = config.hidden_size
        self.kernel_options = KernelOptions()  # compiled_adaln, as the single-device block
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, dtype=config.params_dtype))
        if config.sequence_parallel:
            mark_params(self.adaLN_modulation, sequence_parallel=True)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, **kwargs):
        c = attention_mask  # (b, h)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m.unsqueeze(0) for m in self.adaLN_modulation(c).chunk(6, dim=-1))  # each (1, b, h)
        x = hidden_states
        eps, fuse = self.config.layernorm_epsilon, self.kernel_options.compiled_adaln
        attn, bias = self.self_attention(compute_dtype(ln_modulate(x, shift_msa, scale_msa, eps, compiled=fuse)),
                                         attention_mask=None)
        x = gated_residual(x, gate_msa, attn, bias, compiled=fuse)
        if isinstance(self.cross_attention, CrossAttention):
            out, bias = self.cross_attention(compute_dtype(F.layer_norm(x, x.shape[-1:], eps=eps)),
                                             attention_mask=context_mask, key_value_states=compute_dtype(context))
            x = x + (out if bias is None else out + bias)
        out, bias = self.mlp(compute_dtype(ln_modulate(x, shift_mlp, scale_mlp, eps, compiled=fuse)))
        return gated_residual(x, gate_mlp, out, bias, compiled=fuse), context  # the block hands context to the next layer


def layer_spec(cfg: ModelConfig, block_index: int, num_noise_bins: int) -> ModuleSpec:
    """The Megatron spec of DiT block `block_index` (dense MLP or MoE with moedit's router/experts)."""
    qk_norm = partial(nn.LayerNorm, eps=1e-6) if cfg.qk_norm else None
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=LocalColumnLinear, core_attention=SDPACoreAttention, linear_proj=RowParallelLinear,
            q_layernorm=HeadNorm if qk_norm else None, k_layernorm=HeadNorm if qk_norm else None),
    )
    if cfg.is_moe_block(block_index):
        mlp = ModuleSpec(module=DiTMoELayer, submodules=MoESubmodules(
            experts=ModuleSpec(module=MegatronExperts, params={"model_cfg": cfg}),
            router=partial(MegatronRouter, model_cfg=cfg, block_index=block_index, num_noise_bins=num_noise_bins)))
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=LocalColumnLinear,
                                                               linear_fc2=RowParallelLinear))
    cross = IdentityOp
    if cfg.is_text:
        cross = ModuleSpec(
            module=DiTCrossAttention,
            params={"attn_mask_type": AttnMaskType.padding},
            submodules=DiTCrossAttentionSubmodules(
                linear_q=LocalColumnLinear, linear_kv=ContextColumnLinear, core_attention=SDPACoreAttention,
                linear_proj=RowParallelLinear, q_layernorm=HeadNorm if qk_norm else None,
                k_layernorm=HeadNorm if qk_norm else None))
    return ModuleSpec(module=AdaLNZeroLayer, submodules=TransformerLayerSubmodules(
        self_attention=attention, cross_attention=cross, mlp=mlp))


# ----- the model -----------------------------------------------------------------------------------
class MegatronDiT(MegatronModule):
    """`model(x, t, y)` as the single-device DiT, on one pipeline stage of a Megatron layout.

    First stage: patch embedding + position. Last stage: final layer + unpatchify, returns
    (B, C_out, H, W). Other stages return hidden states [s, b, h] for the schedule to send on.
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, vp_stage: int | None = None):
        super().__init__(config=config)
        self._moe_layers: list | None = None  # moe_layers(), found on first use
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        if cfg.ffn_type != "gelu" or cfg.shared_hidden:
            raise ValueError(f"the megatron engine supports ffn_type = gelu without shared experts; got "
                             f"ffn_type = {cfg.ffn_type}, shared experts hidden = {cfg.shared_hidden}: "
                             f"train this flavor with parallel.engine = ddp or deepspeed")
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = config.sequence_parallel
        D, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.input_size // p
        edges = cfg.moe.noise_bin_edges() if cfg.moe else [0.0, 1.0]
        self.noise_bin_edges = list(edges)
        self.register_buffer("_inner_edges", torch.tensor(edges[1:-1], dtype=torch.float32), persistent=False)
        self.time_convention, self.num_timesteps = "flow", 1000
        dtype = config.params_dtype
        if pre_process:
            self.x_embedder = PatchEmbed(p, cfg.in_channels, D).to(dtype)
            self.pos_embed = nn.Parameter(sincos_2d(D, self.grid, self.grid).unsqueeze(0).to(dtype), requires_grad=False)
        # Conditioning on every stage (each computes c, and a text model's context, for its own layers)
        self.t_embedder = TimestepEmbedder(D).to(dtype)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D).to(dtype) if cfg.num_classes and not cfg.is_text else None
        self.caption_embedder = (CaptionEmbedder(cfg.text_dim, cfg.text_len, D, pooled=cfg.text_pooled).to(dtype)
                                 if cfg.is_text else None)
        for m in self.conditioning_embedders():
            mark_params(m, pipeline_parallel=True, sequence_parallel=config.sequence_parallel)

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        n_local = get_num_layers_to_build(config, vp_stage, pp_rank)
        specs = [layer_spec(cfg, offset + i, len(edges) - 1) for i in range(n_local)]
        self.decoder = TransformerBlock(config, TransformerBlockSubmodules(layer_specs=specs, layer_norm=None),
                                        post_layer_norm=False, pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        if post_process:
            self.final_layer = FinalLayer(D, p, cfg.out_channels).to(dtype)
            if config.sequence_parallel:
                mark_params(self.final_layer, sequence_parallel=True)
        # REPA: on the stage that holds block repa_depth only (its weights come from the canonical model)
        self.repa_projector = None
        self.last_repa: torch.Tensor | None = None  # the `repa` term of the latest forward (this stage)
        self._repa_target: torch.Tensor | None = None  # set for the duration of a forward
        if cfg.has_repa and offset < cfg.repa_depth <= offset + n_local:
            self.repa_projector = build_projector(cfg).to(dtype)
            self.decoder.layers[cfg.repa_depth - 1 - offset].register_forward_hook(self._align)

    def conditioning_embedders(self) -> list[nn.Module]:
        """The embedders every pipeline stage holds a copy of (gradients summed over stages)."""
        return [m for m in (self.t_embedder, self.y_embedder, self.caption_embedder) if m is not None]

    # --- pipeline plumbing -----------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def moe_layers(self) -> list[MegatronRouter]:
        """This stage's routers, found once (the module tree is fixed after construction; walking
        it costs the host ~1.5 ms a call at DiffMoE-L, and the loop asks every step)."""
        if self._moe_layers is None:
            self._moe_layers = [m for m in self.modules() if isinstance(m, MegatronRouter)]
        return self._moe_layers

    def threshold_buffers(self) -> list[torch.Tensor]:
        return [r.impl.expert_threshold for r in self.moe_layers() if isinstance(r.impl, DiffMoERouter)]

    # The single-device model's: this stage's auxiliary terms (detached here: the loss gets their
    # gradient through MoEAuxLossAutoScaler), time convention, patch order, checks, caption embedding.
    aux_losses = DiT.aux_losses
    set_time_convention = DiT.set_time_convention
    noise_level = DiT.noise_level
    unpatchify = DiT.unpatchify
    _caption = DiT._caption
    _check_repa_target = DiT._check_repa_target

    # --- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor | None, t: torch.Tensor, y: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None, repa_target: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) on the first stage (ignored elsewhere), t (B,), y (B,) labels after dropout;
        a text model takes text (B, L, text_dim), text_mask (B, L) and drop_text (B,) on every stage
        instead of y, as `DiT.forward`. A REPA model in training takes repa_target (B, T, repa_dim) on
        every stage (the stage holding block repa_depth records the `repa` term; the others ignore
        it). Pass all but x by keyword (Float16Module casts positionals)."""
        self.last_repa = None
        if repa_target is not None and (self.repa_projector is not None or not self.cfg.has_repa):
            self._check_repa_target(t.shape[0], repa_target)
            self._repa_target = repa_target
        try:
            return self._forward(x, t, y, text, text_mask, drop_text)
        finally:
            self._repa_target = None

    def _forward(self, x, t, y, text, text_mask, drop_text) -> torch.Tensor:
        c = self.t_embedder(t)
        labels = context = context_mask = None
        if self.caption_embedder is not None:
            tokens, context_mask, pooled = self._caption(t.shape[0], text, text_mask, drop_text)
            context = tokens.transpose(0, 1).contiguous()  # [L, b, h]: whole on every rank, also under SP
            if pooled is not None:
                c = c + pooled
        elif self.y_embedder is not None:
            if y is None:
                raise ValueError("model: class labels y are required (num_classes > 0)")
            labels = y
            c = c + self.y_embedder(y)
        if self.cfg.moe is not None:
            level = self.noise_level(t)
            ctx = RoutingContext(t.shape[0], level, torch.bucketize(level, self._inner_edges, right=True), labels)
            for router in self.moe_layers():
                router.ctx = ctx
        h = None
        if self.pre_process:
            h = (self.x_embedder(x.to(self.pos_embed.dtype)) + self.pos_embed).transpose(0, 1).contiguous()  # [s, b, h]
            if self.sequence_parallel:
                h = scatter_to_sequence_parallel_region(h)
        h = self.decoder(hidden_states=h, attention_mask=c, context=context, context_mask=context_mask)
        if not self.post_process:
            return h
        out = self.final_layer(h.transpose(0, 1), c)  # (b, s_local, p*p*C)
        if self.sequence_parallel:
            # every TP rank computes the loss on the full output: the backward keeps the local slice
            out = gather_from_sequence_parallel_region(out.transpose(0, 1).contiguous(),
                                                       tensor_parallel_output_grad=False).transpose(0, 1)
        return self.unpatchify(out)

    def _align(self, layer: nn.Module, inputs, output: tuple[torch.Tensor, torch.Tensor | None]):
        """Forward hook of layer repa_depth: the `repa` term on its output hidden states [s_local, b, h]
        (the single-device model's h after that block), recorded unweighted in `last_repa` and added
        to the loss with weight repa_coef through the returned hidden states."""
        target = self._repa_target
        if target is None:
            return None
        h, context = output
        tokens = h
        if self.sequence_parallel:
            # the whole sequence on every TP rank; the backward keeps this rank's slice of the gradient
            tokens = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)  # [s, b, h]
        # lambda = 0: a logged diagnostic that nothing trains (no graph, no gradient)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.repa_coef != 0):
            term = repa_loss(self.repa_projector(tokens.transpose(0, 1)), target)  # tokens (b, s, h)
        self.last_repa = term.detach()  # no graph kept past the step (see MegatronRouter.decide)
        if term.requires_grad:
            h = MoEAuxLossAutoScaler.apply(h, self.cfg.repa_coef * term)
        return h, context

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's sharded state dict, with layers keyed by global index (not stacked)."""
        metadata = dict(metadata or {})
        metadata["non_homogeneous_layers"] = True
        out = self.decoder.sharded_state_dict(f"{prefix}decoder.", sharded_offsets, metadata)
        local = {}
        for name, module in self.named_children():
            if name != "decoder":
                local.update({f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
        for name, param in self.named_parameters(recurse=False):
            local[name] = param
        shared = make_sharded_tensors_for_checkpoint(local, prefix, {}, sharded_offsets)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for key, sh in shared.items():
            if key.startswith(("t_embedder.", "y_embedder.", "caption_embedder.")):  # every stage: one main replica
                sh.replica_id = (pp_rank, *sh.replica_id[1:])
        out.update(shared)
        return out


def transformer_config(cfg: ModelConfig, *, tensor: int = 1, pipeline: int = 1, expert: int = 1,
                       sequence_parallel: bool = False, virtual_pipeline: int | None = None,
                       dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = False) -> TransformerConfig:
    """Megatron's TransformerConfig for a moedit ModelConfig and a parallel layout.

    Where CUDA is available, dense MLPs use Megatron's fused bias + GELU; that kernel is the tanh
    approximation, as DiT's GELU. Megatron selects it for activation_func = F.gelu, so the unfused
    path is given the tanh approximation explicitly."""
    fuse = torch.cuda.is_available()
    moe = cfg.moe
    kwargs = {}
    if moe is not None:
        kwargs = dict(
            num_moe_experts=moe.num_experts,
            moe_ffn_hidden_size=cfg.expert_hidden,
            moe_router_topk=moe.top_k if moe.router == "token_choice" else 1,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="none",
            moe_router_pre_softmax=True,  # unused (moedit routers score tokens); Megatron asks for it at top-1
            moe_aux_loss_coeff=0.0,
            # moedit routers make the routing decision (capacities, drops) themselves; a capacity
            # factor set without padding makes the dispatcher send exactly routing_map's tokens.
            # E x (S/E) = S tokens per expert: never binding.
            moe_expert_capacity_factor=float(moe.num_experts),
            moe_pad_expert_input_to_capacity=False,
        )
    config = TransformerConfig(
        num_layers=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_hidden,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=F.gelu if fuse else gelu_tanh,
        bias_activation_fusion=fuse,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        normalization="LayerNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=cfg.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert,
        expert_tensor_parallel_size=1,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=False,
        hetereogenous_dist_checkpoint=True,
        **kwargs,
    )
    config.has_cond_embedder = True  # finalize_model_grads: sum `pipeline_parallel` params over stages
    return config


def build_megatron_model(cfg: ModelConfig, config: TransformerConfig, vp_stage: int | None = None) -> MegatronDiT:
    """This rank's stage of the DiT (parallel_state must be initialised)."""
    from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage

    pp_group = parallel_state.get_pipeline_model_parallel_group()
    return MegatronDiT(cfg, config, pre_process=is_pp_first_stage(pp_group), post_process=is_pp_last_stage(pp_group),
                       vp_stage=vp_stage)


__all__ = ["AdaLNZeroLayer", "ContextColumnLinear", "DiTCrossAttention", "DiTMoELayer", "MegatronDiT",
           "MegatronExperts", "MegatronRouter", "SDPACoreAttention", "build_megatron_model", "layer_spec",
           "transformer_config"]
