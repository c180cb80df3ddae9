"""DiT (Peebles & Xie 2023) with adaLN-Zero blocks whose FFN is dense or an MoE layer.

Called as `model(x_t, t, y)` (class condition) or `model(x_t, t, text=..., text_mask=...,
drop_text=...)` (text condition: cross-attention to caption tokens between self-attention and the
FFN, PixArt-alpha's layout); see docs/DESIGN.md for the time convention. The model maps t to a
noise level (1 = pure noise) only for routing statistics: `set_time_convention("flow" | "ddpm")`.
"""

from __future__ import annotations

import torch
from torch import nn

from moedit.models.config import ModelConfig
from moedit.models.layers import (
    Attention,
    CaptionEmbedder,
    CrossAttention,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    build_dense_ffn,
    sincos_2d,
)
from moedit.models.kernels import KernelOptions
from moedit.models.kernels.adaln import gated_residual, ln_modulate
from moedit.models.moe import MoELayer, RoutingContext
from moedit.models.repa import REPA_TERM, build_projector, repa_loss
from moedit.models.routers import AUX_COEF_FIELDS, DiffMoERouter

TIME_CONVENTIONS = ("flow", "ddpm")


class DiTBlock(nn.Module):
    """Pre-norm attention + FFN, both modulated and gated by adaLN-Zero from the condition c; a
    text model has a cross-attention sublayer between them (pre-norm, not modulated: the caption
    is its input, the timestep stays on adaLN)."""

    def __init__(self, cfg: ModelConfig, index: int, num_noise_bins: int):
        super().__init__()
        D = cfg.hidden_size
        self.kernel_options = KernelOptions()  # compiled_adaln: the modulation and residuals below
        self.attn = Attention(D, cfg.num_heads, qk_norm=cfg.qk_norm)
        if cfg.is_text:
            self.norm_cross = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(D, cfg.num_heads, qk_norm=cfg.qk_norm)
        else:
            self.cross_attn = None
        if cfg.is_moe_block(index):
            self.mlp = MoELayer(cfg, index, num_noise_bins)
        else:
            self.mlp = build_dense_ffn(cfg.ffn_type, D, cfg.ffn_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: RoutingContext | None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), c (B, D); text (B, L, D) projected caption and text_mask (B, L) for a text model."""
        # LayerNorm (no affine, eps 1e-6) + modulation, and x + gate * branch, each one compiled kernel
        # on CUDA (moedit/models/kernels/adaln.py); the same ops eagerly elsewhere
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D): each chunk broadcasts over the tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        fuse = self.kernel_options.compiled_adaln
        attn = self.attn(ln_modulate(x, shift_msa, scale_msa, 1e-6, compiled=fuse))
        x = gated_residual(x, gate_msa, attn, None, compiled=fuse)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        mlp = self.mlp(ln_modulate(x, shift_mlp, scale_mlp, 1e-6, compiled=fuse), ctx)
        return gated_residual(x, gate_mlp, mlp, None, compiled=fuse)


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.input_size // p
        self.x_embedder = PatchEmbed(p, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D) if cfg.num_classes and not cfg.is_text else None
        self.caption_embedder = (CaptionEmbedder(cfg.text_dim, cfg.text_len, D, pooled=cfg.text_pooled)
                                 if cfg.is_text else None)
        # A frozen parameter (not a buffer), as in DiT: it is part of the published parameter count.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D), requires_grad=False)
        edges = cfg.moe.noise_bin_edges() if cfg.moe else [0.0, 1.0]
        self.noise_bin_edges = list(edges)
        self.register_buffer("_inner_edges", torch.tensor(edges[1:-1], dtype=torch.float32), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i, len(edges) - 1) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, cfg.out_channels)
        self.time_convention, self.num_timesteps = "flow", 1000
        self.initialize_weights()
        # Training-only (REPA), built after the DiT's own init and off the global RNG: the DiT's
        # weights are those of the same model without it. Inference loads strip it (moedit.models.repa).
        self.repa_projector = build_projector(cfg) if cfg.has_repa else None
        self.last_repa: torch.Tensor | None = None  # the `repa` term of the latest forward

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear, zero adaLN and output (adaLN-Zero), N(0, 0.02) embeddings."""
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        if self.pos_embed.device.type != "meta":
            self.pos_embed.data.copy_(sincos_2d(self.cfg.hidden_size, self.grid, self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.caption_embedder is not None:
            # Null-caption rows of norm about 1, the scale of a normalised encoder feature.
            nn.init.normal_(self.caption_embedder.null_caption, std=self.cfg.text_dim ** -0.5)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                # adaLN-Zero makes every block the identity at init through zero gates; cross-attention
                # has no gate, so its output projection starts at zero instead (PixArt-alpha does the
                # same). Its weight still gets a gradient at step 0 (from the attention output), so
                # q/kv start learning one step later, as a gated branch does after its gate moves.
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
            if isinstance(block.mlp, MoELayer):
                block.mlp.router.reset_gate()  # after the xavier sweep: DiffMoE gates are N(0, 0.006^2)
                block.mlp.experts.reset_parameters()
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ----- forward -----------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W), in DiT's (h, w, p, q, c) order."""
        B, p, c, g = x.shape[0], self.cfg.patch_size, self.cfg.out_channels, self.grid
        x = x.reshape(B, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, g * p, g * p)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) model time -> noise level in [0, 1] (1 = pure noise)."""
        level = 1.0 - t.float() if self.time_convention == "flow" else t.float() / self.num_timesteps
        return level.clamp(0.0, 1.0)

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.input_size
        if x.dim() != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"model input has shape {tuple(x.shape)}: expected (B, {c}, {s}, {s}) "
                             f"for in_channels={c}, input_size={s}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"model timesteps t have shape {tuple(t.shape)}: expected ({x.shape[0]},)")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, drop_text: torch.Tensor | None = None,
                repa_target: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> (B, out_channels, H, W).

        Class models: y (B,) long (num_classes = the null class). Text models (y is ignored): text
        (B, L, text_dim) caption features, text_mask (B, L) bool (True = real token; None: all real),
        drop_text (B,) bool (True: the learned null caption instead, for CFG; None: all False).
        Without text every sample must be dropped (the unconditional model).
        repa_target (B, T, repa_dim), a REPA model in training: the clean image's encoder features in
        token order; the forward then records the auxiliary term `repa` (see `aux_losses`)."""
        self._check_input(x, t)
        self.last_repa = None
        if repa_target is not None:
            self._check_repa_target(x.shape[0], repa_target)
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = (H/p) * (W/p)
        c = self.t_embedder(t)  # (B, D)
        labels = context = context_mask = None
        if self.caption_embedder is not None:
            context, context_mask, pooled = self._caption(x.shape[0], text, text_mask, drop_text)
            if pooled is not None:
                c = c + pooled
        elif self.y_embedder is not None:
            if y is None:
                raise ValueError("model: class labels y are required (num_classes > 0); pass num_classes "
                                 "for the null class")
            labels = y  # label dropout for guidance is drawn by the trainer (the null class num_classes)
            c = c + self.y_embedder(labels)
        ctx = None
        if self.cfg.moe is not None:
            level = self.noise_level(t)
            bins = torch.bucketize(level, self._inner_edges, right=True)  # (B,)
            ctx = RoutingContext(x.shape[0], level, bins, labels)
        for index, block in enumerate(self.blocks):
            h = block(h, c, ctx, context, context_mask)
            if repa_target is not None and index + 1 == self.cfg.repa_depth:
                # lambda = 0: a logged diagnostic that nothing trains (no graph, no gradient)
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.repa_coef != 0):
                    self.last_repa = repa_loss(self.repa_projector(h), repa_target)  # h (B, T, D)
        return self.unpatchify(self.final_layer(h, c))

    def _check_repa_target(self, batch: int, target: torch.Tensor) -> None:
        m = self.cfg
        if self.repa_projector is None:
            raise ValueError("model: repa_target given to a model without a REPA projector (model.repa_depth = 0; "
                             "enable train.repa)")
        if target.shape != (batch, m.num_tokens, m.repa_dim) or not target.is_floating_point():
            raise ValueError(f"model: repa_target has shape {tuple(target.shape)} and dtype {target.dtype}: expected "
                             f"floating ({batch}, {m.num_tokens}, {m.repa_dim}) for T = {m.num_tokens} tokens and "
                             f"model.repa_dim = {m.repa_dim}")

    def _caption(self, batch: int, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                 drop_text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Check the caption inputs; (tokens (B, L, D), mask (B, L), pooled (B, D) or None)."""
        L, W = self.cfg.text_len, self.cfg.text_dim
        embedder = self.caption_embedder
        if text is None:
            if drop_text is None or drop_text.shape != (batch,) or not bool(drop_text.all()):
                raise ValueError("model: a text model needs text (B, L, text_dim) and text_mask (B, L); "
                                 "without text pass drop_text all true (the null caption)")
            text = embedder.null_caption.unsqueeze(0).expand(batch, L, W)
        if text.shape != (batch, L, W):
            raise ValueError(f"model: text has shape {tuple(text.shape)}: expected ({batch}, {L}, {W}) for "
                             f"model.text_len={L}, model.text_dim={W}")
        if text_mask is None:
            text_mask = torch.ones(batch, L, dtype=torch.bool, device=text.device)
        if text_mask.shape != (batch, L) or text_mask.dtype != torch.bool:
            raise ValueError(f"model: text_mask has shape {tuple(text_mask.shape)} and dtype {text_mask.dtype}: "
                             f"expected ({batch}, {L}) bool")
        if drop_text is None:
            drop_text = torch.zeros(batch, dtype=torch.bool, device=text.device)
        if drop_text.shape != (batch,) or drop_text.dtype != torch.bool:
            raise ValueError(f"model: drop_text has shape {tuple(drop_text.shape)} and dtype {drop_text.dtype}: "
                             f"expected ({batch},) bool")
        if not text.is_floating_point():
            raise ValueError(f"model: text has dtype {text.dtype}: expected floating-point encoder features")
        # float16 features from the shards meet float32 (or bf16) weights: compute in the weights' dtype
        text = text.to(embedder.fc1.weight.dtype)
        return embedder(text, text_mask, drop_text)

    def compile_blocks(self, mode: str | None = None) -> None:
        """torch.compile each transformer block in place (`mode`: torch.compile's; None = default).

        Regional compilation: the blocks share their code, so dynamo traces one dense and one MoE
        block and reuses the graphs for the others (parameters are graph inputs), and the first step
        compiles in about the time of two blocks instead of the whole depth. The embedders and the
        final layer stay eager; parameter names (checkpoints) do not change."""
        for block in self.blocks:
            block.compile(mode=mode)

    # ----- MoE API (docs/DESIGN.md) -------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary terms of the latest forward: the MoE layers' summed over layers, and
        `repa` when the forward had a repa_target."""
        total: dict[str, torch.Tensor] = {}
        for layer in self.moe_layers():
            for name, value in layer.last_aux.items():
                total[name] = total[name] + value if name in total else value
        if self.last_repa is not None:
            total[REPA_TERM] = self.last_repa
        return total

    def aux_loss_coefs(self) -> dict[str, float]:
        """Weight of each term `aux_losses` can return for this model."""
        coefs = {}
        if self.cfg.moe is not None and self.moe_layers():
            for name in self.moe_layers()[0].aux_terms():
                coefs[name] = float(getattr(self.cfg.moe, AUX_COEF_FIELDS[name]))
        if self.repa_projector is not None:
            coefs[REPA_TERM] = float(self.cfg.repa_coef)
        return coefs

    def threshold_buffers(self) -> list[torch.Tensor]:
        """DiffMoE per-expert thresholds, for engines to average across data-parallel ranks in place."""
        return [layer.router.expert_threshold for layer in self.moe_layers()
                if isinstance(layer.router, DiffMoERouter)]

    def set_time_convention(self, convention: str, num_timesteps: int = 1000) -> None:
        """How t maps to noise level for statistics: 'flow' (1 - t) or 'ddpm' (t / num_timesteps)."""
        if convention not in TIME_CONVENTIONS:
            raise ValueError(f"time convention {convention!r}: must be one of {', '.join(TIME_CONVENTIONS)}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps = {num_timesteps}: must be >= 1")
        self.time_convention, self.num_timesteps = convention, int(num_timesteps)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> DiT:
    """Instantiate a DiT from its config (on `device`; "meta" allocates nothing)."""
    if device is None:
        return DiT(cfg)
    with torch.device(device):
        return DiT(cfg)
