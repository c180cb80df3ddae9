"""Backbone pieces of a DiT: embedders, attention, dense FFNs, final layer.

Module and parameter names follow facebookresearch/DiT's state dict (x_embedder.proj,
t_embedder.mlp.0/2, y_embedder.embedding_table, attn.qkv/proj, mlp.fc1/fc2,
adaLN_modulation.1, final_layer.*) so official checkpoints load with a near-identity mapping.
SwiGLU FFNs use DiT-MoE's names (gate_proj, up_proj, down_proj). Text conditioning adds
`CaptionEmbedder` (caption_embedder.fc1/fc2, .null_caption, .pool_fc1/pool_fc2) and
`CrossAttention` (cross_attn.q/kv/proj) in every block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D position embedding (grid_h * grid_w, dim), row-major tokens.

    As in DiT, the first half of the channels encodes the column (w) and the second the row (h).
    """
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (T,)
    cols = torch.arange(grid_w).repeat(grid_h)  # (T,)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with a strided conv, T = (H/p) * (W/p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar t -> 256-d sinusoid [cos, sin] -> Linear -> SiLU -> Linear (D)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> D; row `num_classes` is the null class used for CFG and label dropout (the
    trainer draws the dropout: moedit.train.trainer)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash on CUDA)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens (queries) to caption tokens (keys, values), with the
    self-attention's head count. Padded caption tokens are masked out through a boolean mask, so
    they get exactly zero attention weight and their features never reach the output."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=True)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) image tokens, context (B, L, D) projected caption, mask (B, L) bool (True =
        a real token; every row needs one) -> (B, T, D)."""
        B, T, D = x.shape
        L = context.shape[1]
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, H, L, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        # (B, 1, 1, L) broadcasts over heads and queries; True = attend.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class CaptionEmbedder(nn.Module):
    """Caption token features (B, L, text_dim) -> (B, L, D) through fc1 -> GELU(tanh) -> fc2, with a
    learned null caption (L, text_dim) substituted for dropped captions (classifier-free guidance;
    the trainer draws the dropout). With `pooled`, also a (B, D) vector for the adaLN condition:
    the masked mean of the projected tokens through pool_fc1 -> SiLU -> pool_fc2."""

    def __init__(self, text_dim: int, text_len: int, hidden_size: int, pooled: bool = False):
        super().__init__()
        self.text_dim, self.text_len = text_dim, text_len
        self.fc1 = nn.Linear(text_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.null_caption = nn.Parameter(torch.empty(text_len, text_dim))
        self.pool_fc1 = nn.Linear(hidden_size, hidden_size) if pooled else None
        self.pool_fc2 = nn.Linear(hidden_size, hidden_size) if pooled else None

    def forward(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """text (B, L, text_dim), mask (B, L) bool, drop (B,) bool -> (tokens (B, L, D), mask (B, L),
        pooled (B, D) or None). Dropped rows (and rows without a real token: an empty caption is
        no caption) take the null caption with an all-true mask."""
        drop = drop | ~mask.any(dim=1)  # (B,): an all-false mask row would give NaN attention
        null = self.null_caption.to(text.dtype)
        text = torch.where(drop[:, None, None], null.unsqueeze(0), text)  # (B, L, text_dim)
        mask = mask | drop[:, None]
        tokens = self.fc2(F.gelu(self.fc1(text), approximate="tanh"))  # (B, L, D)
        if self.pool_fc1 is None:
            return tokens, mask, None
        weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1)  # (B, D)
        return tokens, mask, self.pool_fc2(F.silu(self.pool_fc1(mean)))


class GeluMLP(nn.Module):
    """DiT's FFN: fc1 -> GELU(tanh) -> fc2, with biases."""

    def __init__(self, hidden_size: int, ffn_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden)
        self.fc2 = nn.Linear(ffn_hidden, hidden_size)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """DiT-MoE's FFN: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, ffn_hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.down_proj = nn.Linear(ffn_hidden, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_dense_ffn(ffn_type: str, hidden_size: int, ffn_hidden: int) -> nn.Module:
    return GeluMLP(hidden_size, ffn_hidden) if ffn_type == "gelu" else SwiGLUMLP(hidden_size, ffn_hidden)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm -> Linear to p*p*C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)
