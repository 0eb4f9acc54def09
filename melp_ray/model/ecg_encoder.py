"""ECG encoder: the reference's Wav2Vec2-CMSC backbone (fairseq-signals), as MELP builds it.

    (B, leads, T) -> conv feature extractor -> LayerNorm -> Linear -> dropout_input
                  -> + weight-normed positional conv -> LayerNorm -> dropout
                  -> post-LN transformer layers -> (B, frames, ecg_width)

The conv extractor is wav2vec2's "default" mode: bias-free convolutions, GELU after each,
and a single GroupNorm (one group per channel: each channel normalised over time) after
the first. That per-channel normalisation over time is what removes the large common
offset of min-max scaled ECGs; the other mode (LayerNorm over channels in every block)
leaves the frames of different records almost parallel. Gradients into the conv stack are
scaled by ``feature_grad_mult`` (0.1), as MELP sets it.

Nothing depends on the sampling rate or the record length: the convolutions slide over
any T (at least ``conv_stride ** conv_layers`` samples) and positions come from a
convolution, not from a fixed-size table.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from melp_ray.model.config import ModelConfig
from melp_ray.model.layers import PostLNLayer, run_block


class ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class GroupNormFp32(nn.GroupNorm):
    """GroupNorm computed in fp32 (fairseq's Fp32GroupNorm): statistics over 500 Hz x 10 s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class ConvFeatureExtractor(nn.Module):
    """Conv1d(no bias) -> [GroupNorm, first block only] -> GELU, ``conv_layers`` times."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        blocks, c_in = [], cfg.ecg_leads
        for i in range(cfg.conv_layers):
            conv = nn.Conv1d(c_in, cfg.conv_channels, cfg.conv_kernel, stride=cfg.conv_stride,
                             bias=False)
            nn.init.kaiming_normal_(conv.weight)
            parts = [conv]
            if i == 0:
                parts.append(GroupNormFp32(cfg.conv_channels, cfg.conv_channels))
            parts.append(nn.GELU())
            blocks.append(nn.Sequential(*parts))
            c_in = cfg.conv_channels
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, leads, T) -> (B, C, T')
        for block in self.conv_layers:
            x = block(x)
        return x


class ConvPositionalEmbedding(nn.Module):
    """Grouped conv over time, weight-normed over the kernel dimension (dim 2), then GELU.

    Weight norm is written out here (``weight = g * v / ||v||``, the norm over every dim but
    2) rather than through ``torch.nn.utils.parametrizations``: the parameters then belong
    to the module whose forward uses them, which is what ZeRO-3's gathering relies on.
    An even kernel with "same" padding yields one frame too many; the last is dropped.
    """

    def __init__(self, width: int, kernel: int, groups: int):
        super().__init__()
        if width % groups:
            raise ValueError(f"ecg_width {width} is not divisible by pos_conv_groups {groups}")
        self.padding, self.groups = kernel // 2, groups
        self.drop_last = kernel % 2 == 0
        v = torch.randn(width, width // groups, kernel) * math.sqrt(4 / (kernel * width))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(self._norm(v))
        self.bias = nn.Parameter(torch.zeros(width))

    @staticmethod
    def _norm(v: torch.Tensor) -> torch.Tensor:  # (out, in/groups, K) -> (1, 1, K)
        return v.norm(dim=(0, 1), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, N, W)
        weight = self.weight_g * self.weight_v / self._norm(self.weight_v)
        pos = F.conv1d(x.transpose(1, 2), weight, self.bias, padding=self.padding,
                       groups=self.groups)
        if self.drop_last:
            pos = pos[..., :-1]
        return F.gelu(pos).transpose(1, 2)


class ECGEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.feature_extractor = ConvFeatureExtractor(cfg)
        self.feature_grad_mult = cfg.feature_grad_mult
        self.layer_norm = nn.LayerNorm(cfg.conv_channels)
        self.post_extract_proj = (nn.Linear(cfg.conv_channels, cfg.ecg_width)
                                  if cfg.conv_channels != cfg.ecg_width else nn.Identity())
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.pos_conv = ConvPositionalEmbedding(cfg.ecg_width, cfg.pos_conv_kernel,
                                                cfg.pos_conv_groups)
        self.encoder_layer_norm = nn.LayerNorm(cfg.ecg_width)  # post-LN: on the stack's input
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([
            PostLNLayer(cfg.ecg_width, cfg.ecg_heads, cfg.ecg_ffn, cfg.dropout,
                        cfg.attention_dropout, cfg.activation_dropout)
            for _ in range(cfg.ecg_layers)
        ])
        self.width = cfg.ecg_width
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, leads, T) -> (B, frames, ecg_width)."""
        features = self.feature_extractor(ecg)
        if self.feature_grad_mult != 1.0:
            features = ScaleGradient.apply(features, self.feature_grad_mult)
        x = self.layer_norm(features.transpose(1, 2))               # (B, N, C)
        x = self.dropout_input(self.post_extract_proj(x))
        x = x + self.pos_conv(x)
        x = self.dropout(self.encoder_layer_norm(x))
        for layer in self.layers:
            x = run_block(layer, self.gradient_checkpointing, x)
        return x
