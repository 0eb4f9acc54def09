"""Attentional pooler: a fixed number of learned queries cross-attend to the encoder frames.

Turns a variable number of ECG frames into exactly ``num_queries`` vectors of ``width``.
MELP uses two: the beat pooler (K queries -> beat embeddings) and the caption pooler
(128 queries -> the memory the multimodal decoder reads).
"""
from __future__ import annotations

import torch
from torch import nn

from melp_ray.model.layers import MultiHeadAttention


class AttentionalPooler(nn.Module):
    def __init__(self, width: int, context_dim: int, num_queries: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width ** -0.5)
        self.norm_context = nn.LayerNorm(context_dim)
        self.attn = MultiHeadAttention(width, heads, context_dim=context_dim)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N, context_dim) -> (B, num_queries, width)."""
        queries = self.queries.unsqueeze(0).expand(frames.shape[0], -1, -1)
        pooled = self.attn(queries, context=self.norm_context(frames))
        return self.norm_out(pooled)
