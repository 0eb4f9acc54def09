"""MELP as a Hugging Face ``PreTrainedModel``: load, embed, score zero-shot, generate.

This module is also shipped in every exported folder, concatenated with the model modules
into ``modeling_melp_ray.py`` (``melp_ray.hub.custom_code``), so a folder loads with only torch and
transformers installed. It may import melp_ray's model modules and ``melp_ray.hub.hf_config``
by name (``from melp_ray.model.melp import MELP``), nothing else of melp_ray.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from melp_ray.hub.hf_config import MELPHFConfig
from melp_ray.model.config import ModelConfig
from melp_ray.model.melp import MELP

TEXT_SUBFOLDER = "text_model"


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
                  seconds: float | None = None, leads: Sequence[str] | None = None) -> MELPHFModel:
        """Wrap a trained MELP (no copy) with the config an export folder needs."""
        melp_dict = melp.cfg.to_dict()
        # Bake the text architecture (incl. text_overrides) into the saved text_model/ config.
        melp_dict.update(text_model=TEXT_SUBFOLDER, text_pretrained=False, text_overrides={})
        config = MELPHFConfig(melp=melp_dict, sample_rate=sample_rate, seconds=seconds,
                              text_subfolder=TEXT_SUBFOLDER, leads=leads)
        return cls(config, melp=melp)

    @property
    def tokenizer(self):
        return self.melp.tokenizer

    # ----- inference API -----
    def _as_batch(self, signals) -> torch.Tensor:
        x = signals if torch.is_tensor(signals) else torch.from_numpy(np.asarray(signals))
        x = x.to(device=self.device, dtype=torch.float32)
        return x[None] if x.ndim == 2 else x

    @torch.no_grad()
    def encode_ecg(self, signals, normalize: bool = True) -> torch.Tensor:
        """(B, leads, T) or (leads, T) preprocessed ECGs -> (B, embed_dim) embeddings.

        Preprocessed as in training: leads in ``config.leads`` order, resampled to
        ``config.sample_rate`` Hz, ``config.seconds`` long, min-max scaled to [0, 1] per record.
        """
        return self.melp.encode_ecg(self._as_batch(signals), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | str, normalize: bool = True) -> torch.Tensor:
        """Report strings -> (len(texts), embed_dim), tokenised with the saved tokenizer."""
        if isinstance(texts, str):
            texts = [texts]
        return self.melp.encode_reports(list(texts), normalize=normalize)

    @torch.no_grad()
    def zero_shot_scores(self, signals, class_prompts: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """(B, C) cosine between each ECG and each class, in ``class_prompts`` order.

        A class is the mean of its prompts' normalised embeddings, renormalised (as
        ``python -m melp_ray.evaluate --mode zeroshot`` scores).
        """
        names = list(class_prompts)
        if not names or any(not class_prompts[n] for n in names):
            raise ValueError("every class needs at least one prompt")
        prompts = [list(class_prompts[n]) for n in names]
        flat = self.encode_text([p for group in prompts for p in group])
        bounds = np.cumsum([0] + [len(group) for group in prompts]).tolist()
        classes = torch.stack([flat[a:b].mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:])])
        return self.encode_ecg(signals) @ F.normalize(classes, dim=-1).T

    def generate(self, signals, max_new_tokens: int | None = None) -> list[str]:
        """Greedy reports for (B, leads, T) ECGs, from [BOS] until [SEP] or the length limit."""
        return self.melp.generate(self._as_batch(signals), max_new_tokens=max_new_tokens)

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

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """The one writer of a MELP folder (export, convert, ``push_to_hub``): the custom code
        and ``auto_map``, the text tower's config + tokenizer, then transformers' save of
        config.json and model.safetensors (fp32, tied tensors stored under every name).

        Code and text files come first: with ``push_to_hub=True`` transformers uploads at the
        end of its own save.
        """
        os.makedirs(save_directory, exist_ok=True)
        auto_map = self.write_custom_code(save_directory)
        if auto_map:
            self.config.auto_map = auto_map
        write_text_assets(self.melp, save_directory)
        state = state_dict if state_dict is not None else self.state_dict()
        fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        super().save_pretrained(save_directory, *args, state_dict=safetensors_ready(fp32), **kwargs)

    def write_custom_code(self, out: str | os.PathLike) -> dict[str, str] | None:
        """Write the custom code into ``out``; return its ``auto_map`` (None: nothing written).

        This copy (the one shipped in an exported folder) writes nothing: a model loaded with
        ``trust_remote_code`` is remote code to transformers, which copies its files itself.
        melp_ray's subclass (``melp_ray.hub.hf.MELPHFModel``) renders them from its modules.
        """
        return None


def safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def text_folder(config: MELPHFConfig) -> str:
    """The folder of the text tower: inside the local folder loaded, or fetched from the hub."""
    base = config.name_or_path or ""
    folder = os.path.join(base, config.text_subfolder)
    if os.path.isdir(folder) or os.path.isdir(base):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the MELP text tower folder {folder!r} is missing")
        return folder
    try:  # a hub repository id: fetch just the text tower's files (cached)
        from huggingface_hub import snapshot_download

        repo = snapshot_download(base, allow_patterns=[f"{config.text_subfolder}/*"])
    except Exception as err:
        raise FileNotFoundError(
            f"cannot find the MELP text tower {config.text_subfolder!r} of {base!r} ({err}); "
            f"download the repository first (`hf download REPO --local-dir DIR`) and load DIR"
        ) from err
    return os.path.join(repo, config.text_subfolder)


def runtime_model_config(config: MELPHFConfig) -> ModelConfig:
    """The ModelConfig to build MELP with: text_model resolved against the folder loaded."""
    melp = dict(config.melp)
    if config.text_subfolder:
        melp["text_model"] = os.path.abspath(text_folder(config))
    return ModelConfig.from_dict(melp)


def write_text_assets(melp: MELP, out: str | os.PathLike) -> None:
    """text_model/ (backbone config + tokenizer) and the tokenizer at the top level."""
    out = os.fspath(out)
    text_dir = os.path.join(out, TEXT_SUBFOLDER)
    os.makedirs(text_dir, exist_ok=True)
    melp.text.backbone.config.save_pretrained(text_dir)
    for folder in (text_dir, out):
        melp.tokenizer.save_pretrained(folder)
