"""The official MELP weights -> a melp_ray export folder (``python -m melp_ray.convert``).

The reference is the reference's Lightning checkpoint (the full model) or the
``fuyingw/MELP_Encoder`` folder (ECG encoder and poolers only). --text-model is a local
folder with a BERT config and tokenizer (heart_bert's: ``hf download fuyingw/heart_bert
--local-dir heart_bert``): for a full checkpoint its tokenizer must be the one the
reference trained with (the [BOS] row is checked), and the text tower's sizes come from
the checkpoint's tensors; for the encoder folder the text tower, decoder and temperature
are not in the file: they keep our initialisation (the text tower's pretrained weights
when the folder holds them). Reading the files: ``melp_ray.hub.reference_files``; key names
and layout: ``melp_ray.hub.reference_weights``.

The output is an export folder (``melp_ray.hub.hf``) that ``python -m melp_ray.evaluate
--checkpoint OUT`` and ``train.init_from=OUT`` read, plus ``conversion.json``: the source,
its kind, the keys mapped, which parts came from the reference, the lead permutation.
Errors exit with code 2 and a one-line message naming the key or file at fault.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from melp_ray.data.leads import LEADS
from melp_ray.hub.reference_files import ConversionError, ReferenceWeights, read_reference
from melp_ray.hub.reference_weights import (REFERENCE_LEADS, caption_width, check_vocabulary,
                                        is_unused_reference_key, lead_permutation, map_state,
                                        matching_preset, model_config_for)

CONVERSION_FILE = "conversion.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def text_model_config(folder: str):
    """The BERT config of ``--text-model`` (a local folder: the hub is not assumed)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConversionError(f"--text-model {folder}: no config.json (a local folder with a "
                              f"BERT config and tokenizer is needed)")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def has_text_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES)


def build_model(ref: ReferenceWeights, text_model: str, overrides: dict[str, Any], seed: int):
    """Our MELP sized for ``ref``, every reference tensor loaded strictly; plus the list of
    our keys that came from the reference and the vocabulary facts."""
    from melp_ray.model import MELP
    from melp_ray.text.report_ids import load_report_tokenizer

    text_config = text_model_config(text_model)
    pretrained = ref.kind == "encoder" and has_text_weights(text_model)
    if ref.kind == "encoder" and text_config.hidden_size != caption_width(ref):
        raise ConversionError(f"--text-model {text_model}: hidden size {text_config.hidden_size} "
                              f"!= the reference caption pooler's width {caption_width(ref)} "
                              f"(the decoder reads that memory at the text width)")
    cfg = model_config_for(ref, os.path.abspath(text_model), pretrained,
                           text_config.num_hidden_layers, text_config.max_position_embeddings,
                           **overrides)
    vocabulary = check_vocabulary(ref, load_report_tokenizer(cfg.text_model))
    torch.manual_seed(seed)              # what the encoder-only source leaves to our init
    with torch.device("cpu"):
        model = MELP(cfg)
    state, filled = map_state(ref, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval(), filled, vocabulary


def parts_from_reference(model, filled: list[str]) -> dict[str, bool]:
    """Top-level module -> whether every one of its tensors came from the reference."""
    tops: dict[str, list[bool]] = {}
    chosen = set(filled)
    for name in model.state_dict():
        tops.setdefault(name.split(".", 1)[0], []).append(name in chosen)
    return {top: all(flags) for top, flags in tops.items()}


def conversion_record(ref: ReferenceWeights, model, filled: list[str],
                      vocabulary: dict[str, int], text_model: str) -> dict[str, Any]:
    parts = parts_from_reference(model, filled)
    return {
        "source": os.path.abspath(ref.source),
        "kind": ref.kind,
        "stripped_prefix": ref.prefix,
        "keys_mapped": len(filled),
        "reference_keys": len(ref.state),
        "unused_reference_keys": sorted(k for k in ref.state if is_unused_reference_key(k)),
        "parts_from_reference": sorted(p for p, full in parts.items() if full),
        "parts_from_our_init": sorted(p for p, full in parts.items() if not full),
        "text_model": os.path.abspath(text_model),
        "text_pretrained": model.cfg.text_pretrained,
        "matches_preset": matching_preset(model.cfg),
        "lead_permutation": {"reference_order": list(REFERENCE_LEADS), "our_order": list(LEADS),
                             "our_channel_from_reference_channel": lead_permutation()},
        "vocabulary": vocabulary,
        "model": model.cfg.to_dict(),
    }


def convert(reference: str, out: str, text_model: str, sample_rate: int = 500,
            seconds: float = 10.0, overrides: dict[str, Any] | None = None,
            seed: int = 0) -> dict[str, Any]:
    """Write the export folder + conversion.json; returns the conversion record."""
    from melp_ray.hub.hf import MELPHFModel

    ref = read_reference(reference)
    model, filled, vocabulary = build_model(ref, text_model, overrides or {}, seed)
    record = conversion_record(ref, model, filled, vocabulary, text_model)
    MELPHFModel.from_melp(model, sample_rate=sample_rate, seconds=seconds).save_pretrained(out)
    with open(os.path.join(out, CONVERSION_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set ecg_heads=12``: ModelConfig fields the tensors cannot tell (head counts)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConversionError(f"--set {item!r}: expected field=value")
        out[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    return out
