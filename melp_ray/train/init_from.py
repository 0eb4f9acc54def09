"""``train.init_from``: start a pretraining run from the weights of an earlier model.

The source is anything ``melp_ray.hub.checkpoint.load_model`` reads: a training checkpoint, a
run folder, an export folder, or a converted reference folder (``python -m
melp_ray.convert``). Only the weights are taken: step, optimizer and LR schedule start
fresh (a resume, by contrast, continues all of them; a run that has its own checkpoint
resumes from it and ignores ``init_from``).

Before Ray starts, ``check_init_from`` compares the run's model config with the source's:
every field that shapes the weights or their meaning must agree (sizes, the text tower's
architecture and vocabulary). Training behaviour may differ: dropout, gradient scaling,
which text layers are frozen, temperatures, the text length.
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from melp_ray.utils import storage
from melp_ray.config_parsing import ConfigError
from melp_ray.model.config import ModelConfig

# The run may choose these freely: they change how the weights train, not what they are.
TRAINING_BEHAVIOUR_FIELDS = frozenset({
    "preset", "gradient_checkpointing", "dropout", "attention_dropout", "activation_dropout", "dropout_input",
    "feature_grad_mult", "text_frozen_layers", "freeze_text_embeddings", "max_text_length",
    "logit_scale_init", "logit_scale_max", "beat_attention_temperature",
    "beat_similarity_temperature", "beat_logit_scale",
})
# Compared through the text architecture they build instead of by name.
TEXT_SOURCE_FIELDS = frozenset({"text_model", "text_pretrained", "text_overrides"})
TEXT_ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "max_position_embeddings", "type_vocab_size",
                            "model_type")


def _local(path: str) -> str:
    return path if storage.is_uri(path) else storage.normalise_storage_path(path)


def source_model_config(path: str) -> ModelConfig:
    """The ModelConfig of the weights at ``path``, read without loading the weights when
    the folder says it (an export's config.json, a checkpoint's melp_config.json)."""
    from melp_ray.hub import checkpoint
    from melp_ray.config import model_config_from_dict

    from melp_ray.hub.hf import MELPHFConfig, exported_model_config

    path = _local(path)
    if not storage.is_uri(path) and checkpoint.is_exported_folder(path):
        config = MELPHFConfig.from_pretrained(path)
        if not config.melp:   # an export written some other way: build it to know
            return checkpoint.load_model(path).cfg
        return exported_model_config(path, config)   # text_model resolved as loading does
    return model_config_from_dict(checkpoint.checkpoint_config(path)["model"])


def text_architecture(cfg: ModelConfig) -> dict[str, Any]:
    """What the text tower's weights depend on: its config sizes and its vocabulary."""
    from transformers import AutoConfig

    from melp_ray.text.report_ids import load_report_tokenizer
    from melp_ray.text.models import resolve_text_model_path

    path = resolve_text_model_path(cfg.text_model)
    config = AutoConfig.from_pretrained(path, local_files_only=os.path.isdir(path),
                                        **cfg.text_overrides)
    out: dict[str, Any] = {k: getattr(config, k, None) for k in TEXT_ARCHITECTURE_FIELDS}
    tokenizer = load_report_tokenizer(cfg.text_model)
    out["vocabulary_size"] = len(tokenizer)
    out["vocabulary"] = tokenizer.get_vocab()
    return out


def model_config_differences(run: ModelConfig, source: ModelConfig) -> list[str]:
    """``field: run value != source value`` for each weight-defining field that differs."""
    diffs = []
    for f in fields(ModelConfig):
        if f.name in TRAINING_BEHAVIOUR_FIELDS | TEXT_SOURCE_FIELDS:
            continue
        ours, theirs = getattr(run, f.name), getattr(source, f.name)
        if ours != theirs:
            diffs.append(f"model.{f.name}: {ours!r} != {theirs!r}")
    run_text, source_text = text_architecture(run), text_architecture(source)
    for key in (*TEXT_ARCHITECTURE_FIELDS, "vocabulary_size"):
        if run_text[key] != source_text[key]:
            diffs.append(f"text model {key}: {run_text[key]!r} != {source_text[key]!r}")
    if not diffs and run_text["vocabulary"] != source_text["vocabulary"]:
        diffs.append("text model vocabulary: same size, different tokens")
    return diffs


def check_init_from(path: str | None, run: ModelConfig) -> None:
    """Fail before Ray when ``train.init_from`` is missing or holds another architecture."""
    if path is None:
        return
    local = _local(path)
    if not storage.exists(local):
        raise ConfigError(f"train.init_from {path!r} does not exist")
    try:
        source = source_model_config(local)
    except (FileNotFoundError, KeyError, ValueError, OSError) as err:
        raise ConfigError(f"train.init_from {path!r}: not a training checkpoint, run folder or "
                          f"export folder ({err})") from None
    diffs = model_config_differences(run, source)
    if diffs:
        raise ConfigError(f"train.init_from {path!r}: the run's model config differs from the "
                          f"source's (run != source): " + "; ".join(diffs))


def load_initial_weights(model, path: str) -> None:
    """Copy the source's weights into ``model`` (strict: every key, every shape)."""
    from melp_ray.hub.checkpoint import load_model

    source = load_model(_local(path))
    model.load_state_dict(source.state_dict(), strict=True)
