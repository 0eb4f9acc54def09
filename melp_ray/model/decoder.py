"""Multimodal text decoder: causal self-attention over the text states + cross-attention to
the caption-pooler queries, then vocabulary logits (CoCa's multimodal decoder).

Its input is the text tower's (already causal) token states, projected to
``decoder_width`` when the two widths differ.
"""
from __future__ import annotations

import torch
from torch import nn

from melp_ray.model.config import ModelConfig
from melp_ray.model.layers import Block


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, text_width: int, vocab_size: int):
        super().__init__()
        width = cfg.decoder_width
        self.input_proj = nn.Linear(text_width, width) if text_width != width else nn.Identity()
        self.blocks = nn.ModuleList([
            Block(width, cfg.decoder_heads, int(width * cfg.decoder_mlp_ratio), cfg.dropout,
                  cross_attention=True, context_dim=width)
            for _ in range(cfg.decoder_layers)
        ])
        self.final_norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size)

    def forward(self, text_states: torch.Tensor, caption_queries: torch.Tensor) -> torch.Tensor:
        """(B, L, text_width), (B, Q, decoder_width) -> (B, L, vocab) next-token logits."""
        x = self.input_proj(text_states)
        for block in self.blocks:
            x = block(x, context=caption_queries, causal=True)
        return self.lm_head(self.final_norm(x))
