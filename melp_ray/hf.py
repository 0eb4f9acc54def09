"""MELP as a Hugging Face model: ``AutoModel.from_pretrained(folder)`` on an exported folder.

    import melp_ray.hf                       # registers model_type "melp" with AutoConfig/AutoModel
    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported/")          # -> MELPHFModel
    ecg_emb = model.encode_ecg(signals)                      # (B, 12, T) preprocessed -> (B, D)
    txt_emb = model.encode_text(["sinus rhythm. normal ecg."])

(``import melp_ray`` imports this module, so plain ``import melp_ray`` is enough.)

An exported folder is self-contained, no hub access needed::

    config.json          MELPHFConfig: model_type "melp", the ModelConfig under "melp"
    model.safetensors    every MELP weight, fp32
    text_model/          the text tower's BERT-style config + tokenizer files
    tokenizer*.json ...  the same tokenizer at the top level (AutoTokenizer.from_pretrained(folder))
    README.md            model card (written by melp_ray.export)

The ModelConfig saved in config.json has ``text_model = "text_model"`` (resolved against
the folder being loaded) and ``text_pretrained = false``: the text tower is rebuilt from
the saved architecture and all its weights come from model.safetensors.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

from melp_ray.model import MELP
from melp_ray.config import model_config_from_dict

MODEL_TYPE = "melp"
TEXT_SUBFOLDER = "text_model"
WEIGHTS_NAME = "model.safetensors"


class MELPHFConfig(PreTrainedConfig):
    """Holds the MELP ModelConfig (as a dict) plus what an input must look like."""

    model_type = MODEL_TYPE

    def __init__(self, melp: dict[str, Any] | None = None, sample_rate: int | None = None,
                 seconds: float | None = None, text_subfolder: str | None = None, **kwargs):
        self.melp = dict(melp or {})          # ModelConfig.to_dict()
        self.sample_rate = sample_rate        # Hz the ECG encoder was trained on
        self.seconds = seconds                # length of a training record
        self.text_subfolder = text_subfolder  # text tower lives here, relative to the folder
        super().__init__(**kwargs)


class MELPHFModel(PreTrainedModel):
    """A thin wrapper: the MELP module is ``self.melp``; weights are named ``melp.<...>``."""

    config_class = MELPHFConfig
    base_model_prefix = "melp"
    main_input_name = "ecg"

    def __init__(self, config: MELPHFConfig, melp: MELP | None = None):
        super().__init__(config)
        self.melp = melp if melp is not None else MELP(runtime_model_config(config))
        self.post_init()   # transformers bookkeeping only (tied keys etc.); touches no weight

    def _init_weights(self, module):
        # MELP initialises itself; every weight is then overwritten from model.safetensors.
        pass

    @classmethod
    def from_melp(cls, melp: MELP, sample_rate: int | None = None,
                  seconds: float | None = None) -> MELPHFModel:
        """Wrap a trained MELP (no copy) with the config an export folder needs."""
        melp_dict = melp.cfg.to_dict()
        # Bake the text architecture (incl. text_overrides) into the saved text_model/ config.
        melp_dict.update(text_model=TEXT_SUBFOLDER, text_pretrained=False, text_overrides={})
        config = MELPHFConfig(melp=melp_dict, sample_rate=sample_rate, seconds=seconds,
                              text_subfolder=TEXT_SUBFOLDER)
        return cls(config, melp=melp)

    # ----- inference API -----
    @property
    def tokenizer(self):
        return self.melp.tokenizer

    @torch.no_grad()
    def encode_ecg(self, signals, normalize: bool = True) -> torch.Tensor:
        """(B, leads, T) or (leads, T) preprocessed ECGs -> (B, embed_dim) embeddings.

        Preprocessed as in training: leads in ``melp_ray.data.leads.LEADS`` order, resampled
        to ``config.sample_rate`` Hz, ``config.seconds`` long, min-max scaled to [0, 1] per
        record (``melp_ray.data.stream.minmax_normalise``).
        """
        x = torch.as_tensor(np.asarray(signals) if not torch.is_tensor(signals) else signals,
                            dtype=torch.float32)
        if x.ndim == 2:
            x = x[None]
        return self.melp.encode_ecg(x.to(self.device), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | str, normalize: bool = True) -> torch.Tensor:
        """Report strings -> (len(texts), embed_dim), tokenised with the saved tokenizer."""
        if isinstance(texts, str):
            texts = [texts]
        return self.melp.encode_reports(list(texts), normalize=normalize)

    def forward(self, ecg: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Embeddings of whichever side is given: {"ecg_emb": ..., "text_emb": ...}."""
        out = {}
        if ecg is not None:
            out["ecg_emb"] = self.melp.encode_ecg(ecg)
        if input_ids is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            out["text_emb"] = self.melp.encode_text(input_ids, mask)
        return out

    # ----- saving -----
    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus the text tower's config and tokenizer (self-contained folder)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_text_assets(self.melp, save_directory)


def runtime_model_config(config: MELPHFConfig):
    """The ModelConfig to build MELP with: text_model resolved against the folder loaded."""
    melp = dict(config.melp)
    if config.text_subfolder:
        base = config.name_or_path or ""
        folder = os.path.join(base, config.text_subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"the MELP text tower folder {folder!r} is missing: load an exported folder from "
                f"a local path (download a hub repo first, e.g. `hf download REPO --local-dir DIR`)")
        melp["text_model"] = os.path.abspath(folder)
    return model_config_from_dict(melp)


# ---------------------------------------------------------------- writing a folder

def write_text_assets(melp: MELP, out: str | os.PathLike) -> None:
    """text_model/ (backbone config + tokenizer) and the tokenizer at the top level."""
    out = os.fspath(out)
    text_dir = os.path.join(out, TEXT_SUBFOLDER)
    os.makedirs(text_dir, exist_ok=True)
    backbone_config = melp.text.backbone.config
    backbone_config.save_pretrained(text_dir)
    for folder in (text_dir, out):
        melp.tokenizer.save_pretrained(folder)


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
    """config.json + model.safetensors (fp32, shared tensors de-aliased) + text assets.

    ``state`` defaults to the model's own state dict (names ``melp.<...>``).
    """
    from safetensors.torch import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    model.config.save_pretrained(out)
    state = state if state is not None else model.state_dict()
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    save_file(_safetensors_ready(tensors), os.path.join(out, WEIGHTS_NAME),
              metadata={"format": "pt"})
    write_text_assets(model.melp, out)


# ---------------------------------------------------------------- registration

def register() -> None:
    """Let AutoConfig/AutoModel resolve model_type "melp" (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MELPHFConfig, exist_ok=True)
    AutoModel.register(MELPHFConfig, MELPHFModel, exist_ok=True)


register()

