"""Attentional pooler (open_clip's): a fixed number of learned queries cross-attend to frames.

Turns a variable number of ECG frames into exactly ``num_queries`` vectors of ``width``.
MELP uses two: the beat pooler (K queries -> beat embeddings) and the caption pooler
(128 queries -> the memory the multimodal decoder reads). Queries ~ N(0, 1); both the
queries and the frames are LayerNorm-ed before multi-head attention (``nn.MultiheadAttention``'s
parameters, computed through SDPA: ``layers.MultiheadAttention``). The LayerNorm
after the pooler belongs to its user (``MELP.beat_norm`` / ``MELP.caption_norm``).
"""
from __future__ import annotations

import torch
from torch import nn

from melp_ray.model.layers import MultiheadAttention


class AttentionalPooler(nn.Module):
    def __init__(self, width: int, context_dim: int, num_queries: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, width))
        self.attn = MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N, context_dim) -> (B, num_queries, width)."""
        context = self.ln_k(frames)
        queries = self.ln_q(self.query).unsqueeze(0).expand(frames.shape[0], -1, -1)
        return self.attn(queries, context, context)
