"""wav2vec2-style ECG encoder: conv feature extractor -> conv positional embedding -> transformer.

(B, leads, T) raw signal  ->  (B, frames, ecg_width) frame features, frames = T / stride**layers.

Nothing depends on the sampling rate or the record length: the convolutions slide over
any T (at least ``conv_stride ** conv_layers`` samples) and the positional information
comes from a convolution, not from a fixed-size table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melp_ray.model.config import ModelConfig
from melp_ray.model.layers import Block


class ConvLayer(nn.Module):
    """Conv1d -> LayerNorm over channels -> GELU (wav2vec2's "layer" normalisation mode)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C', T')
        x = self.conv(x)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class ConvPositionalEmbedding(nn.Module):
    """Grouped convolution over time whose output is added to the frames (relative positions).

    "Same" padding keeps the length; for an even kernel that leaves one frame too many,
    which we drop at the end (as wav2vec2 does).
    """

    def __init__(self, width: int, kernel: int, groups: int, weight_norm: bool = False):
        super().__init__()
        conv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=groups)
        if weight_norm:  # wav2vec2 normalises over the kernel dimension
            conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.conv = conv
        self.drop_last = kernel % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, N, W)
        pos = self.conv(x.transpose(1, 2))
        if self.drop_last:
            pos = pos[..., :-1]
        return F.gelu(pos).transpose(1, 2)


class ECGEncoder(nn.Module):
    """Pre-LN transformer (with a final LayerNorm) over convolutional frame features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        channels = [cfg.ecg_leads] + [cfg.conv_channels] * cfg.conv_layers
        self.feature_extractor = nn.Sequential(*[
            ConvLayer(c_in, c_out, cfg.conv_kernel, cfg.conv_stride)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        self.feature_norm = nn.LayerNorm(cfg.conv_channels)
        self.feature_projection = nn.Linear(cfg.conv_channels, cfg.ecg_width)
        self.positional = ConvPositionalEmbedding(
            cfg.ecg_width, cfg.pos_conv_kernel, cfg.pos_conv_groups, cfg.pos_conv_weight_norm)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([
            Block(cfg.ecg_width, cfg.ecg_heads, cfg.ecg_ffn, cfg.dropout)
            for _ in range(cfg.ecg_layers)
        ])
        self.final_norm = nn.LayerNorm(cfg.ecg_width)
        self.width = cfg.ecg_width

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, leads, T) -> (B, frames, ecg_width)."""
        frames = self.feature_extractor(ecg).transpose(1, 2)  # (B, N, C)
        x = self.feature_projection(self.feature_norm(frames))
        x = self.dropout(x + self.positional(x))
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)
