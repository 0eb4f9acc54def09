"""Analytic FLOPs of MELP per sample, and model FLOPs utilisation (MFU), nanoGPT-style.

    fwd = forward_flops(cfg, n_samples=5000)            # one sample, forward pass
    train = training_flops(cfg, n_samples=5000)         # forward + backward
    mfu = estimate_mfu(train, samples_per_s, PEAK_FLOPS["h100-sxm-bf16"])

Conventions (the usual ones, so MFU numbers compare with other reports):
- a multiply-add is 2 FLOPs; only matmuls, convolutions and attention are counted
  (norms, activations, softmax, losses and embedding lookups are a few % at most);
- attention counts the full L x L score matrix, also when causal (kernels that skip the
  masked half are not credited for it);
- the text is ``text_length`` tokens (default ``max_text_length``): the model runs each batch
  on its longest report plus the [CLS] (``text_tower.text_columns``), so pass the batch's
  width (``len(text_columns(attention_mask))``), or ``mean_training_flops`` over batches;
- backward = 2 x forward for every part that trains. The frozen text prefix (embeddings and
  the first ``text_frozen_layers`` layers) needs no backward at all when the embeddings are
  frozen, since nothing before it wants a gradient; otherwise it needs input gradients (1 x).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from melp_ray.model.config import ModelConfig
from melp_ray.model.text_tower import text_columns

# Dense peak throughput per device (no sparsity), in FLOP/s, from the vendors' data sheets.
PEAK_FLOPS: dict[str, float] = {
    "h100-sxm-bf16": 989e12,
    "h200-bf16": 989e12,       # same compute die as H100 SXM; more / faster memory only
    "h100-pcie-bf16": 756e12,
    "a100-bf16": 312e12,
}


@dataclass(frozen=True)
class TextDims:
    """The text tower's shape (a BERT-style config)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int


def text_dims(cfg: ModelConfig) -> TextDims:
    """Read the text tower's sizes from its Hugging Face config (no weights are loaded)."""
    from transformers import AutoConfig

    from melp_ray.text.models import resolve_text_model_path
    import os

    path = resolve_text_model_path(cfg.text_model)
    hf = AutoConfig.from_pretrained(path, local_files_only=os.path.isdir(path), **cfg.text_overrides)
    # + 1: the [BOS] row MELP adds to the vocabulary
    return TextDims(hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, hf.vocab_size + 1)


# ---------------------------------------------------------------- building blocks

def linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def attention(n_q: int, n_kv: int, width: int, context_dim: int | None = None) -> int:
    """Q/K/V/out projections plus the two attention matmuls (QK^T and AV)."""
    context_dim = context_dim or width
    return (linear(n_q, width, width) * 2                # query, out
            + linear(n_kv, context_dim, width) * 2       # key, value
            + 2 * 2 * n_q * n_kv * width)                # scores + weighted sum


def block(n: int, width: int, ffn: int, context: int = 0) -> int:
    """Attention (self, or cross over ``context`` rows of the same width) plus an MLP."""
    return attention(n, context or n, width) + linear(n, width, ffn) + linear(n, ffn, width)


def conv_out_length(length: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (length + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------- model parts

def ecg_frames(cfg: ModelConfig, n_samples: int) -> int:
    length = n_samples
    for _ in range(cfg.conv_layers):
        length = conv_out_length(length, cfg.conv_kernel, cfg.conv_stride)
    return length


def ecg_encoder_flops(cfg: ModelConfig, n_samples: int) -> int:
    flops, length, c_in = 0, n_samples, cfg.ecg_leads
    for _ in range(cfg.conv_layers):
        length = conv_out_length(length, cfg.conv_kernel, cfg.conv_stride)
        flops += 2 * length * cfg.conv_channels * c_in * cfg.conv_kernel
        c_in = cfg.conv_channels
    n, w = length, cfg.ecg_width
    flops += linear(n, cfg.conv_channels, w)                      # feature projection
    pos_len = conv_out_length(n, cfg.pos_conv_kernel, padding=cfg.pos_conv_kernel // 2)
    flops += 2 * pos_len * w * (w // cfg.pos_conv_groups) * cfg.pos_conv_kernel
    flops += cfg.ecg_layers * block(n, w, cfg.ecg_ffn)
    return flops


def pooler_flops(cfg: ModelConfig, n_frames: int, text_width: int) -> dict[str, int]:
    beat = attention(cfg.num_beat_queries, n_frames, cfg.beat_width, cfg.ecg_width)
    caption = attention(cfg.num_caption_queries, n_frames, text_width, cfg.ecg_width)
    return {"beat_pooler": beat, "caption_pooler": caption}


def text_flops(cfg: ModelConfig, dims: TextDims, num_sentences: int,
               length: int) -> dict[str, int]:
    """Backbone layers (frozen prefix and trainable rest) and the report/sentence heads."""
    h = dims.hidden
    per_layer = block(length, h, dims.intermediate)
    frozen = min(cfg.text_frozen_layers, dims.layers)
    heads = (linear(1, h, cfg.embed_dim) + linear(1, cfg.embed_dim, cfg.embed_dim)  # report head
             + 2 * length * num_sentences * h                     # per-sentence sums (einsum)
             + linear(num_sentences, h, cfg.embed_dim))           # sentence projection
    return {"text_frozen": frozen * per_layer,
            "text_trainable": (dims.layers - frozen) * per_layer + heads}


def decoder_flops(cfg: ModelConfig, dims: TextDims, length: int) -> int:
    """Per layer a self-attention block and a cross-attention block, each with its MLP."""
    n, w = length - 2, dims.hidden   # teacher forcing: the text part less one
    mlp = int(w * cfg.decoder_mlp_ratio)
    per_layer = block(n, w, mlp) + block(n, w, mlp, context=cfg.num_caption_queries)
    return cfg.decoder_layers * per_layer + linear(n, w, dims.vocab)   # vocabulary logits


def flops_breakdown(cfg: ModelConfig, n_samples: int, num_sentences: int = 4,
                    dims: TextDims | None = None, text_length: int | None = None
                    ) -> dict[str, int]:
    """Forward FLOPs of one sample, per part. ``n_samples``: ECG samples per lead;
    ``text_length``: text columns the batch runs on (default ``max_text_length``)."""
    dims = dims or text_dims(cfg)
    length = text_length or cfg.max_text_length
    frames = ecg_frames(cfg, n_samples)
    parts = {"ecg_encoder": ecg_encoder_flops(cfg, n_samples)}
    parts.update(pooler_flops(cfg, frames, dims.hidden))
    parts["beat_proj"] = linear(cfg.num_beat_queries, cfg.beat_width, cfg.embed_dim)
    parts.update(text_flops(cfg, dims, num_sentences, length))
    parts["decoder"] = decoder_flops(cfg, dims, length)
    return parts


def forward_flops(cfg: ModelConfig, n_samples: int, num_sentences: int = 4,
                  dims: TextDims | None = None, text_length: int | None = None) -> int:
    return sum(flops_breakdown(cfg, n_samples, num_sentences, dims, text_length).values())


def training_flops(cfg: ModelConfig, n_samples: int, num_sentences: int = 4,
                   dims: TextDims | None = None, text_length: int | None = None) -> int:
    """Forward + backward FLOPs of one sample (3 x forward, less what the frozen prefix skips)."""
    parts = flops_breakdown(cfg, n_samples, num_sentences, dims, text_length)
    frozen = parts["text_frozen"]
    frozen_backward = 0 if cfg.freeze_text_embeddings else frozen   # input grads only
    return 3 * (sum(parts.values()) - frozen) + frozen + frozen_backward


def mean_training_flops(cfg: ModelConfig, n_samples: int, report_tokens: Sequence[int],
                        micro_batch: int, draws: int = 1000, seed: int = 0) -> float:
    """Training FLOPs per sample averaged over random micro-batches of reports with these
    token counts (``attention_mask`` sums): what a shuffled run's text widths cost."""
    rng = np.random.default_rng(seed)
    tokens = np.asarray(report_tokens)
    dims = text_dims(cfg)
    widths = [int(text_columns(torch.from_numpy(_mask_rows(rng.choice(tokens, micro_batch),
                                                           cfg.max_text_length))).numel())
              for _ in range(draws)]
    values, counts = np.unique(widths, return_counts=True)
    return float(sum(c * training_flops(cfg, n_samples, dims=dims, text_length=int(w))
                     for w, c in zip(values, counts)) / draws)


def _mask_rows(tokens: np.ndarray, length: int) -> np.ndarray:
    """Attention masks of report rows with these token counts (the [CLS] at the end)."""
    mask = (np.arange(length)[None, :] < (tokens[:, None] - 1)).astype(np.int64)
    mask[:, -1] = 1
    return mask


def estimate_mfu(flops_per_sample: float, samples_per_s: float, peak_flops: float) -> float:
    """Achieved FLOP/s over the device's peak: (training FLOPs per sample x samples/s) / peak.

    ``samples_per_s`` and ``peak_flops`` must describe the same devices (per GPU, or the
    whole job with peak x number of GPUs).
    """
    if peak_flops <= 0:
        raise ValueError("peak_flops must be positive")
    return flops_per_sample * samples_per_s / peak_flops
