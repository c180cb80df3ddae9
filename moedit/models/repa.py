"""REPA (Yu et al., "Representation Alignment for Generation", ICLR 2025): a training-only projector.

An MLP maps the hidden tokens after block `ModelConfig.repa_depth` to the patch features that a
frozen self-supervised encoder gives for the clean image (data, computed at preparation), and the
auxiliary term `repa` is minus the cosine similarity per token, averaged (the paper's L_REPA). The
DiT records it among its auxiliary terms, so it is weighted (by `ModelConfig.repa_coef`, lambda)
where every auxiliary term is (moedit.diffusion.losses.combine_losses).

The projector is training-only: checkpoints keep it (exact resume), but every inference load goes
through `strip_training_only`, which drops its weights and gives the model config without it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moedit.models.config import ModelConfig

REPA_TERM = "repa"
"""Name of the auxiliary term (logged as `loss/repa`)."""
TRAINING_ONLY_PREFIXES = ("repa_projector.",)
"""State-dict key prefixes of training-only modules: never part of a sampled or exported model."""


class RepaProjector(nn.Module):
    """Linear(D, H) - SiLU - Linear(H, H) - SiLU - Linear(H, C), REPA's 3-layer projector (H = 2048)."""

    def __init__(self, hidden_size: int, projector_hidden: int, feature_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, projector_hidden)
        self.fc2 = nn.Linear(projector_hidden, projector_hidden)
        self.fc3 = nn.Linear(projector_hidden, feature_dim)

    def reset_parameters(self) -> None:
        """xavier weights and zero biases, as every Linear of the DiT."""
        for linear in (self.fc1, self.fc2, self.fc3):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) hidden tokens -> (B, T, C) predicted encoder features."""
        return self.fc3(F.silu(self.fc2(F.silu(self.fc1(h)))))


def build_projector(cfg: ModelConfig) -> RepaProjector:
    """The projector of a REPA model, initialised without moving the global RNG: a model with it
    starts from the same weights as one without it, and the draws after the build are the same too
    (so lambda = 0 trains bitwise like no REPA)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        projector = RepaProjector(cfg.hidden_size, cfg.repa_hidden, cfg.repa_dim)
        if next(projector.parameters()).device.type != "meta":
            projector.reset_parameters()
    if cfg.repa_coef == 0:
        # Nothing trains it: it gets no gradient, so DDP must not wait for one, and no optimizer holds it.
        projector.requires_grad_(False)
    return projector


def repa_similarity(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cos(projected, target) per token: (B, T, C) each -> (B, T). Float32 at least (float64 stays
    float64); the target is data, so no gradient flows into it (nor into an encoder behind it). The
    routing probe reads it per token (docs/routing_analysis.md, REPA similarity)."""
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == torch.float64 else t.float()

    predicted = F.normalize(wide(projected), dim=-1)
    aligned = F.normalize(wide(target.detach()).to(predicted.dtype), dim=-1)
    return (predicted * aligned).sum(dim=-1)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean over tokens of cos(projected, target): (B, T, C) each -> ()."""
    return -repa_similarity(projected, target).mean()


def without_repa(cfg: ModelConfig) -> ModelConfig:
    """The model config with no REPA projector (the inference model)."""
    if not cfg.has_repa:
        return cfg
    return dataclasses.replace(cfg, repa_depth=0, repa_dim=0, repa_hidden=0, repa_coef=0.0)


def strip_training_only(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict, model config) of the inference model: training-only weights (the REPA projector)
    removed and the config without them. The one helper every inference load uses (load_for_inference,
    exports, upcycling); only the routing probe keeps the projector, for its REPA similarity
    (load_for_inference(..., training_only=True))."""
    kept = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    return kept, without_repa(cfg)


__all__ = ["REPA_TERM", "TRAINING_ONLY_PREFIXES", "RepaProjector", "build_projector", "repa_loss", "repa_similarity",
           "strip_training_only", "without_repa"]
