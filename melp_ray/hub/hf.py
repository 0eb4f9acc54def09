"""MELP as a Hugging Face model: an exported folder loads with ``AutoModel.from_pretrained``.

Anywhere, with only torch + transformers (the folder carries its code, ``melp_ray.hub.custom_code``)::

    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported/", trust_remote_code=True)   # MELPHFModel
    ecg_emb = model.encode_ecg(signals)                      # (B, 12, T) preprocessed -> (B, D)
    txt_emb = model.encode_text(["sinus rhythm. normal ecg."])

With melp_ray installed, ``import melp_ray.hub.hf`` registers model_type "melp_ray" with the Auto
classes, so the same call works without ``trust_remote_code`` and uses melp_ray's classes.

A saved folder (``MELPHFModel.save_pretrained``: the one writer, used by ``melp_ray.export``,
``melp_ray.convert`` and ``push_to_hub``)::

    config.json            MELPHFConfig: model_type "melp_ray", auto_map, the ModelConfig under "melp"
    configuration_melp_ray.py, modeling_melp_ray.py   the code (generated from melp_ray's modules)
    model.safetensors      every MELP weight, fp32
    text_model/            the text tower's BERT-style config + tokenizer files
    tokenizer*.json ...    the same tokenizer at the top level (AutoTokenizer.from_pretrained(folder))
    README.md              model card (written by melp_ray.export)

The ModelConfig saved in config.json has ``text_model = "text_model"`` (resolved against
the folder being loaded) and ``text_pretrained = false``: the text tower is rebuilt from
the saved architecture and all its weights come from model.safetensors.
"""
from __future__ import annotations

import os

from transformers import AutoConfig, AutoModel

from melp_ray.hub import custom_code, hf_model
from melp_ray.hub.hf_config import MODEL_TYPE, MELPHFConfig
from melp_ray.hub.hf_model import runtime_model_config

__all__ = ["MODEL_TYPE", "MELPHFConfig", "MELPHFModel", "runtime_model_config",
           "exported_model_config", "register"]


class MELPHFModel(hf_model.MELPHFModel):
    """melp_ray's class: what it saves carries code rendered from melp_ray's modules.

    The shipped copy of ``hf_model.MELPHFModel`` (``modeling_melp_ray.py``) instead lets
    transformers copy its own files, as for any model loaded with ``trust_remote_code``.
    """

    def write_custom_code(self, out: str | os.PathLike) -> dict[str, str]:
        return custom_code.write_code(out)


def exported_model_config(folder: str, config: MELPHFConfig | None = None):
    """The ModelConfig of an exported folder, its text tower resolved inside ``folder``.

    ``MELPHFConfig.from_pretrained`` (unlike ``AutoConfig``) leaves ``name_or_path`` empty,
    so the folder is named here before ``runtime_model_config`` resolves against it.
    """
    config = config if config is not None else MELPHFConfig.from_pretrained(folder)
    config.name_or_path = folder
    return runtime_model_config(config)


def register() -> None:
    """Let AutoConfig/AutoModel resolve model_type "melp_ray" to melp_ray's classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MELPHFConfig, exist_ok=True)
    AutoModel.register(MELPHFConfig, MELPHFModel, exist_ok=True)


register()
