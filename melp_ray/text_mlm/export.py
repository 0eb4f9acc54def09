"""A stage-1 checkpoint -> a Hugging Face folder (config, safetensors, tokenizer).

Stage 2 loads that folder as it is: ``model.text_model=<folder> model.text_pretrained=true``.
The MLM head is saved too, so the folder can also be trained further (``text.init=pretrained``).
"""
from __future__ import annotations

import os
import tempfile

import torch

from melp_ray.utils import storage
from melp_ray.config import from_dict
from melp_ray.text_mlm.config import TextPretrainConfig, tokenizer_source
from melp_ray.text_mlm.recipe import build_mlm_model


def export_hf_model(checkpoint: str, out: str) -> str:
    """Checkpoint (local folder or URI) -> Hugging Face folder: config, safetensors, tokenizer."""
    from melp_ray.hub.checkpoint import checkpoint_config, consolidated_state_dict
    from melp_ray.text_mlm.wordpiece import load_tokenizer_folder

    cfg = from_dict(TextPretrainConfig, checkpoint_config(checkpoint))
    tokenizer = load_tokenizer_folder(tokenizer_source(cfg))
    model = build_mlm_model(cfg, tokenizer, load_weights=False)
    weights = consolidated_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = tied_parameter_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    if storage.is_uri(out):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            storage.copy_folder(tmp, out)
    else:
        out = os.path.expanduser(out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (e.g. the MLM decoder = word embeddings)."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        else:
            first[id(p)] = name
    return tied
