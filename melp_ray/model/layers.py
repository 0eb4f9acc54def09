"""Transformer building blocks of MELP, each in the layout of the reference it comes from.

- ``SelfAttention`` + ``PostLNLayer``: the ECG encoder's layer (fairseq's
  TransformerSentenceEncoderLayer with ``layer_norm_first=False``): LayerNorm *after* each
  residual sum. Attention runs through ``F.scaled_dot_product_attention`` so PyTorch picks
  the fastest kernel.
- ``ResidualAttentionBlock``: the multimodal decoder's block (open_clip): pre-LN, built on
  ``MultiheadAttention``; as a cross-attention block it also normalises the memory.
- ``MultiheadAttention``: ``nn.MultiheadAttention``'s parameters, initialisation and state
  dict, with a forward that goes straight to ``F.scaled_dot_product_attention`` (one packed
  q/k/v projection for self-attention, ``is_causal`` instead of a mask tensor): torch's
  generic forward spends ~20 small operators a call on checks, mask conversion and reshapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, enabled: bool, *args, **kwargs) -> torch.Tensor:
    """``block(*args, **kwargs)``; with ``enabled``, in training with gradients on, under
    activation checkpointing: only the inputs are kept and the block's forward is re-run in
    backward. Non-reentrant (PyTorch's recommended mode): keyword arguments and inputs that
    need no gradient work, and dropout re-draws the same masks (the RNG state is restored)."""
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (fairseq layout)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        # fairseq's initialisation: "convergence much better with the scaled initialisation"
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, H, N, W/H)
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        b, h, n, d = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(b, n, h * d))


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch first, no attention weights returned) through SDPA."""

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None,
                 vdim: int | None = None):
        super().__init__(embed_dim, num_heads, kdim=kdim, vdim=vdim, batch_first=True)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:   # (B, N, E) -> (B, H, N, E/H)
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                is_causal: bool = False) -> torch.Tensor:
        """(B, Nq, E), (B, Nk, kdim), (B, Nk, vdim) -> (B, Nq, E)."""
        e = self.embed_dim
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        elif query is key and key is value:     # self-attention: one packed projection
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).split(e, dim=-1)
        else:
            q = F.linear(query, self.in_proj_weight[:e], self.in_proj_bias[:e])
            if key is value:
                k, v = F.linear(key, self.in_proj_weight[e:], self.in_proj_bias[e:]).split(e, dim=-1)
            else:
                k = F.linear(key, self.in_proj_weight[e:2 * e], self.in_proj_bias[e:2 * e])
                v = F.linear(value, self.in_proj_weight[2 * e:], self.in_proj_bias[2 * e:])
        y = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v),
            dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        b, h, n, d = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(b, n, h * d))


class PostLNLayer(nn.Module):
    """x = LN(x + drop(attn(x))); x = LN(x + drop(fc2(drop_act(gelu(fc1(x))))))."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float,
                 attention_dropout: float, activation_dropout: float):
        super().__init__()
        self.self_attn = SelfAttention(width, heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)
        self.final_layer_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
        y = self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(y))


class ResidualAttentionBlock(nn.Module):
    """open_clip's block: x += attn(LN(x), [LN_kv(memory)]); x += mlp(LN(x)). No dropout."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0,
                 cross_attention: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_1_kv = nn.LayerNorm(width) if cross_attention else None
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        q = self.ln_1(x)
        kv = q if memory is None else self.ln_1_kv(memory)
        x = x + self.attn(q, kv, kv, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))
