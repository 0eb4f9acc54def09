"""Small transformer building blocks shared by the ECG encoder, the poolers and the decoder.

All blocks are pre-LN (LayerNorm before each sub-layer, residual around it): it trains
stably without warm-up tricks at every depth we use. Attention goes through
``F.scaled_dot_product_attention`` so PyTorch picks the fastest kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention. ``context`` may have a different width (``context_dim``)."""

    def __init__(self, width: int, heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        context_dim = context_dim or width
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_dim, width)
        self.value = nn.Linear(context_dim, width)
        self.out = nn.Linear(width, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, H, N, W/H)
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(context))
        v = self._split_heads(self.value(context))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        b, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * d))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, width))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, dropout: float = 0.0,
                 cross_attention: bool = False, context_dim: int | None = None):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = MultiHeadAttention(width, heads, dropout=dropout)
        self.norm_cross = nn.LayerNorm(width) if cross_attention else None
        self.cross_attn = (MultiHeadAttention(width, heads, context_dim, dropout=dropout)
                           if cross_attention else None)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.norm_self(x), causal=causal))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), context))
        return x + self.drop(self.mlp(self.norm_mlp(x)))
