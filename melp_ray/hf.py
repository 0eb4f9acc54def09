"""MELP as a Hugging Face model: an exported folder loads with ``AutoModel.from_pretrained``.

Anywhere, with only torch + transformers (the folder carries its code, ``melp_ray.hub_code``)::

    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported/", trust_remote_code=True)   # MELPHFModel
    ecg_emb = model.encode_ecg(signals)                      # (B, 12, T) preprocessed -> (B, D)
    txt_emb = model.encode_text(["sinus rhythm. normal ecg."])

With melp_ray installed, ``import melp_ray.hf`` registers model_type "melp_ray" with the Auto
classes, so the same call works without ``trust_remote_code`` and uses melp_ray's classes.

An exported folder (``save_folder``)::

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

import torch
from transformers import AutoConfig, AutoModel

from melp_ray import hub_code
from melp_ray.hf_config import MODEL_TYPE, MELPHFConfig
from melp_ray.hf_model import MELPHFModel, runtime_model_config, write_text_assets

__all__ = ["MODEL_TYPE", "MELPHFConfig", "MELPHFModel", "runtime_model_config",
           "exported_model_config", "save_folder", "register"]

WEIGHTS_NAME = "model.safetensors"


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give every name its own copy.

    Tied parameters then load twice with the same values into the same Parameter, so the
    tie survives; dropping an alias instead would leave transformers to re-initialise it.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != \
                t.numel() * t.element_size():
            t = t.contiguous().clone()
        else:
            seen.add(key)
        out[name] = t
    return out


def save_folder(model: MELPHFModel, out: str | os.PathLike,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json (with auto_map) + the code + model.safetensors (fp32) + text assets.

    ``state`` defaults to the model's own state dict (names ``melp.<...>``).
    """
    from safetensors.torch import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    model.config.auto_map = hub_code.write_code(out)
    model.config.save_pretrained(out)
    state = state if state is not None else model.state_dict()
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    save_file(_safetensors_ready(tensors), os.path.join(out, WEIGHTS_NAME),
              metadata={"format": "pt"})
    write_text_assets(model.melp, out)


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
