"""The official MELP weights (GitHub HKU-MedAI/MELP) mapped onto our ``MELP``, tensor by tensor.

The weights are read, from a Lightning checkpoint (``lightning``: the full model) or the
``MELP_Encoder`` folder (``encoder``: the ECG side), by ``melp_ray.hub.reference_files`` into
reference-named fp32 tensors; this module maps those names and shapes onto ours. The
mapping is strict: every reference tensor is either mapped or on an explicit list of parts
MELP's forward never uses (the wav2vec2 quantizer and pretraining heads, ECG-FM's own
temperature and BatchNorm, heart_bert's MLM head), every one of our tensors is filled (for
``encoder``: every ECG-side tensor), and every shape is checked. Layout differences handled
here:

- the first conv's input channels: the reference keeps MIMIC's lead order (aVF before aVL),
  we use ``melp_ray.data.leads.LEADS``; columns are permuted so canonical-order input to our
  model equals MIMIC-order input to the reference;
- the wav2vec2 GroupNorm sits at index 2 of the reference's first conv block (after a
  Dropout), at index 1 of ours;
- the positional conv's weight norm: ``parametrizations.weight.original0/1`` (torch's
  parametrization, what the reference code uses) or legacy ``weight_g/weight_v`` -> ours;
- ``proj_contrast`` and ``text_projection`` are ``x @ W`` parameters: transposed into our
  ``nn.Linear`` weights; ``logit_scale`` has shape [] there, [1] here;
- the text embedding table: the reference appends [BOS] to heart_bert's vocabulary (its
  last row), exactly as ``melp_ray.text.report_ids.load_report_tokenizer`` does.

Sizes come from the tensor shapes; what shapes cannot tell (attention head counts, conv
stride) comes from the reference's values (ECG heads = width / 64 as in its small/base/large
sizes, 8 pooler and decoder heads, conv stride = kernel as in its "[(256, 2, 2)] * 4"),
from the encoder folder's config.json (``encoder_attention_heads``, ``attn_pooler_heads``),
or from explicit overrides.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from melp_ray.data.leads import LEADS, lead_indices
from melp_ray.model.config import PRESETS, ModelConfig, model_config_from_preset
from melp_ray.hub.reference_files import (ANCHOR, BACKBONE, TEXT_EMBEDDINGS, ConversionError,
                                      ReferenceWeights)

# MIMIC-IV-ECG's lead order, which the reference trains on (aVF before aVL).
REFERENCE_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL",
                                    "V1", "V2", "V3", "V4", "V5", "V6")

FIRST_CONV = "ecg_encoder.feature_extractor.conv_layers.0.0.weight"   # ours

# Our top-level modules that the encoder-only folder fills.
ECG_PARTS = ("ecg_encoder", "beat_pooler", "beat_norm", "beat_proj", "caption_pooler",
             "caption_norm")

# Reference tensors MELP's forward never reads: wav2vec2's masking and quantised-target
# heads (ECG-FM pretraining), ECG-FM's CMSC temperature and Barlow-Twins BatchNorm,
# heart_bert's MLM head, and position/token-type id buffers of older transformers.
UNUSED_REFERENCE = (
    BACKBONE + "mask_emb", BACKBONE + "quantizer.", BACKBONE + "input_quantizer.",
    BACKBONE + "project_q.", BACKBONE + "project_inp.", BACKBONE + "final_proj.",
    BACKBONE + "target_glu.", "ecg_encoder.logit_scale", "ecg_encoder.bn.",
    "lm_model.cls.", "lm_model.bert.embeddings.position_ids",
    "lm_model.bert.embeddings.token_type_ids",
)

# (our prefix, reference prefix); the first match wins, so specific rules come first.
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("ecg_encoder.feature_extractor.conv_layers.0.1.", BACKBONE + "feature_extractor.conv_layers.0.2."),
    ("ecg_encoder.feature_extractor.", BACKBONE + "feature_extractor."),
    ("ecg_encoder.layer_norm.", BACKBONE + "layer_norm."),
    ("ecg_encoder.post_extract_proj.", BACKBONE + "post_extract_proj."),
    ("ecg_encoder.pos_conv.bias", BACKBONE + "conv_pos.pos_conv.0.bias"),
    ("ecg_encoder.encoder_layer_norm.", BACKBONE + "encoder.layer_norm."),
    ("ecg_encoder.layers.", BACKBONE + "encoder.layers."),
    ("beat_pooler.", "ecg_encoder.attn_pool_contrast."),
    ("beat_norm.", "ecg_encoder.ln_contrast."),
    ("beat_proj.weight", "ecg_encoder.proj_contrast"),
    ("caption_pooler.", "ecg_encoder.attn_pool_caption."),
    ("caption_norm.", "ecg_encoder.ln_caption."),
    ("text.backbone.", "lm_model.bert."),
    ("text.report_head.", "proj_t."),
    ("text.sentence_proj.", "sent_proj."),
    ("decoder.text_projection.weight", "text_decoder.text_projection"),
    ("decoder.", "text_decoder."),
    ("logit_scale", "logit_scale"),
)

# Weight norm of the positional conv: torch's parametrization (the reference) or legacy names.
POS_CONV = BACKBONE + "conv_pos.pos_conv.0."
WEIGHT_NORM_NAMES = {
    "ecg_encoder.pos_conv.weight_g": (POS_CONV + "parametrizations.weight.original0",
                                      POS_CONV + "weight_g"),
    "ecg_encoder.pos_conv.weight_v": (POS_CONV + "parametrizations.weight.original1",
                                      POS_CONV + "weight_v"),
}
TRANSPOSED = ("beat_proj.weight", "decoder.text_projection.weight")

# Sizes the reference fixes in code and shapes cannot reveal.
REFERENCE_POOLER_HEADS = 8
REFERENCE_DECODER_HEADS = 8
REFERENCE_HEAD_WIDTH = 64          # ECG heads: 768 -> 12 (small, base), 1024 -> 16 (large)


# ---------------------------------------------------------------- leads

def lead_permutation() -> list[int]:
    """For each of our input channels (LEADS order), the reference channel it comes from."""
    return lead_indices(REFERENCE_LEADS)


# ---------------------------------------------------------------- sizes

def _indices(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many numbered blocks ``pattern`` (a regex with one group) matches."""
    found = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _tensor(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"reference key {name!r} is missing")
    return state[name]


def ecg_sizes(ref: ReferenceWeights) -> dict[str, Any]:
    """ModelConfig fields of the ECG side, read from the tensor shapes."""
    s = ref.state
    conv0 = _tensor(s, ANCHOR)                                   # (C, leads, kernel)
    channels, leads, kernel = conv0.shape
    if leads != len(LEADS):
        raise ConversionError(f"reference key {ANCHOR!r} has {leads} input leads, expected 12")
    proj = s.get(BACKBONE + "post_extract_proj.weight")
    width = proj.shape[0] if proj is not None else channels
    pos_v = _tensor(s, _find(ref, "ecg_encoder.pos_conv.weight_v")
                    or expected_name("ecg_encoder.pos_conv.weight_v"))  # (width, width/groups, K)
    beat_queries, beat_width = _tensor(s, "ecg_encoder.attn_pool_contrast.query").shape
    caption_queries, _ = _tensor(s, "ecg_encoder.attn_pool_caption.query").shape
    heads = ref.config.get("encoder_attention_heads", max(width // REFERENCE_HEAD_WIDTH, 1))
    return dict(
        ecg_leads=leads, conv_channels=channels, conv_kernel=kernel,
        conv_stride=kernel,   # the reference's "[(256, 2, 2)] * 4": stride = kernel
        conv_layers=_indices(s, re.escape(BACKBONE) + r"feature_extractor\.conv_layers\.(\d+)\.0\.weight"),
        ecg_width=width, pos_conv_kernel=pos_v.shape[2], pos_conv_groups=width // pos_v.shape[1],
        ecg_layers=_indices(s, re.escape(BACKBONE) + r"encoder\.layers\.(\d+)\..*"),
        ecg_ffn=_tensor(s, BACKBONE + "encoder.layers.0.fc1.weight").shape[0],
        ecg_heads=int(heads),
        num_beat_queries=beat_queries, beat_width=beat_width,
        embed_dim=_tensor(s, "ecg_encoder.proj_contrast").shape[1],
        num_caption_queries=caption_queries,
        pooler_heads=int(ref.config.get("attn_pooler_heads", REFERENCE_POOLER_HEADS)),
    )


def caption_width(ref: ReferenceWeights) -> int:
    return _tensor(ref.state, "ecg_encoder.attn_pool_caption.query").shape[1]


def text_sizes(ref: ReferenceWeights) -> dict[str, int]:
    """BERT config fields of the reference text tower, read from the tensor shapes."""
    s = ref.state
    rows, hidden = _tensor(s, TEXT_EMBEDDINGS).shape
    return dict(
        hidden_size=hidden,
        num_hidden_layers=_indices(s, r"lm_model\.bert\.encoder\.layer\.(\d+)\..*"),
        intermediate_size=_tensor(s, "lm_model.bert.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=_tensor(s, "lm_model.bert.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=_tensor(s, "lm_model.bert.embeddings.token_type_embeddings.weight").shape[0],
        embedding_rows=rows,
    )


def decoder_sizes(ref: ReferenceWeights) -> dict[str, Any]:
    s = ref.state
    width = _tensor(s, "text_decoder.ln_final.weight").shape[0]
    return dict(
        decoder_layers=_indices(s, r"text_decoder\.resblocks\.(\d+)\..*"),
        decoder_heads=REFERENCE_DECODER_HEADS,
        decoder_mlp_ratio=_tensor(s, "text_decoder.resblocks.0.mlp.c_fc.weight").shape[0] / width,
    )


def matching_preset(cfg: ModelConfig) -> str | None:
    """The preset whose ECG-side sizes these are (None: a size of its own)."""
    keys = ("conv_layers", "conv_channels", "ecg_width", "ecg_layers", "ecg_heads", "ecg_ffn",
            "num_beat_queries", "beat_width", "num_caption_queries", "embed_dim")
    for name in PRESETS:
        preset = model_config_from_preset(name)
        if all(getattr(preset, k) == getattr(cfg, k) for k in keys):
            return name
    return None


def model_config_for(ref: ReferenceWeights, text_model: str, text_pretrained: bool,
                     text_layers: int, text_positions: int, **overrides: Any) -> ModelConfig:
    """Our ModelConfig for the reference weights: the paper preset (the reference's training
    values) with every size taken from the tensors, the text tower from ``text_model``
    (``text_layers``/``text_positions``: its depth and positions, for an encoder-only source
    whose text tower is not in the file)."""
    fields_: dict[str, Any] = ecg_sizes(ref)
    text_overrides: dict[str, Any] = {}
    if ref.kind == "lightning":
        text = text_sizes(ref)
        text_overrides = {k: v for k, v in text.items() if k != "embedding_rows"}
        fields_.update(decoder_sizes(ref))
        text_layers, text_positions = text["num_hidden_layers"], text["max_position_embeddings"]
    frozen = text_layers // 2                        # the reference: 6 of heart_bert's 12
    max_length = min(ModelConfig.max_text_length, text_positions)
    fields_.update(text_model=text_model, text_pretrained=text_pretrained,
                   text_overrides=text_overrides, text_frozen_layers=frozen,
                   max_text_length=max_length)
    fields_.update(overrides)
    return model_config_from_preset("paper", **fields_)


# ---------------------------------------------------------------- mapping

def reference_name(ours: str) -> str:
    for our_prefix, ref_prefix in PREFIX_RULES:
        if ours.startswith(our_prefix):
            return ref_prefix + ours[len(our_prefix):]
    raise ConversionError(f"no reference name is known for our key {ours!r}")


def expected_name(ours: str) -> str:
    """The reference key our tensor ``ours`` comes from (weight norm: the parametrization's)."""
    return WEIGHT_NORM_NAMES[ours][0] if ours in WEIGHT_NORM_NAMES else reference_name(ours)


def _find(ref: ReferenceWeights, ours: str) -> str | None:
    """The reference key holding our tensor ``ours``, or None when the file lacks it."""
    candidates = WEIGHT_NORM_NAMES.get(ours) or (reference_name(ours),)
    return next((c for c in candidates if c in ref.state), None)


def _converted(ours: str, tensor: torch.Tensor) -> torch.Tensor:
    if ours in TRANSPOSED:
        return tensor.t().contiguous()
    if ours == FIRST_CONV:
        return tensor[:, lead_permutation()].contiguous()
    if ours == "logit_scale":
        return tensor.reshape(1)
    return tensor


def is_unused_reference_key(name: str) -> bool:
    return name.startswith(UNUSED_REFERENCE)


def map_state(ref: ReferenceWeights, target: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict with every tensor the reference holds put in place (shapes checked).

    ``target`` is our freshly built model's state dict. Returns the new state dict and the
    sorted list of our keys that came from the reference. Raises ConversionError for a
    reference key left over, an expected key missing, or a shape that differs.
    """
    out = dict(target)
    used: set[str] = set()
    filled: list[str] = []
    for ours, own in target.items():
        source = _find(ref, ours)
        if source is None:
            if ref.kind == "lightning" or ours.split(".", 1)[0] in ECG_PARTS:
                raise ConversionError(f"our key {ours!r} has no reference tensor: "
                                      f"{expected_name(ours)!r} is missing from {ref.source}")
            continue
        tensor = _converted(ours, ref.state[source])
        if tensor.shape != own.shape:
            raise ConversionError(f"shape mismatch: reference {source!r} {tuple(ref.state[source].shape)} "
                                  f"-> our {ours!r} needs {tuple(own.shape)}")
        out[ours] = tensor.to(own.dtype)
        used.add(source)
        filled.append(ours)
    leftover = sorted(k for k in ref.state if k not in used and not is_unused_reference_key(k))
    if leftover:
        more = f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""
        raise ConversionError(f"reference key {leftover[0]!r}{more} maps to nothing in our model")
    return out, sorted(filled)


def check_vocabulary(ref: ReferenceWeights, tokenizer) -> dict[str, int]:
    """The reference appends [BOS] as the last embedding row; ours must sit in the same row."""
    if ref.kind != "lightning":
        return {}
    rows = ref.state[TEXT_EMBEDDINGS].shape[0]
    bos = tokenizer.bos_token_id
    if len(tokenizer) != rows or bos != rows - 1:
        raise ConversionError(
            f"vocabulary mismatch: {TEXT_EMBEDDINGS!r} has {rows} rows (heart_bert's vocabulary "
            f"+ [BOS] as the last row); the --text-model tokenizer with [BOS] has "
            f"{len(tokenizer)} tokens and [BOS] at id {bos}: pass heart_bert's tokenizer")
    return {"embedding_rows": rows, "bos_row": bos}
