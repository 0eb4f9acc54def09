"""Multimodal text decoder (open_clip's MultimodalTransformer, as CoCa and MELP use it).

Each of its layers is two residual blocks: causal self-attention + MLP over the text
states, then cross-attention to the caption-pooler memory (LayerNorm-ed) + MLP. A final
LayerNorm and a bias-free projection give the vocabulary logits. Its width is the text
tower's hidden size: it reads the text tower's (already causal) token states directly.
"""
from __future__ import annotations

import torch
from torch import nn

from melp_ray.model.config import ModelConfig
from melp_ray.model.layers import ResidualAttentionBlock, run_block


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int, vocab_size: int):
        super().__init__()
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width, cfg.decoder_heads, cfg.decoder_mlp_ratio)
            for _ in range(cfg.decoder_layers)])
        self.cross_attn = nn.ModuleList([
            ResidualAttentionBlock(width, cfg.decoder_heads, cfg.decoder_mlp_ratio,
                                   cross_attention=True)
            for _ in range(cfg.decoder_layers)])
        self.ln_final = nn.LayerNorm(width)
        # The reference leaves this matrix uninitialised (torch.empty); open_clip's intent:
        self.text_projection = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.text_projection.weight, std=width ** -0.5)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, text_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """(B, L, width), (B, Q, width) -> (B, L, vocab) next-token logits."""
        x = text_states
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            x = run_block(self_block, self.gradient_checkpointing, x, is_causal=True)
            x = run_block(cross_block, self.gradient_checkpointing, x, memory=memory)
        return self.text_projection(self.ln_final(x))
