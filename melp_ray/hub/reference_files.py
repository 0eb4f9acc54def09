"""Reading the official MELP weights (GitHub HKU-MedAI/MELP): reference-named fp32 tensors.

Kept apart from ``melp_ray.hub.reference_weights``, which maps these names and shapes onto our
``MELP``, so that the file formats, the safe loading and the key prefixes sit in one place.
Two published forms are read:

- ``lightning``: the full model, a Lightning ``.ckpt`` whose ``"state_dict"`` holds the
  reference ``MELPModel``'s parameters, named as that LightningModule names its submodules:
  ``ecg_encoder.*`` (the ECG-FM wrapper, below), ``lm_model.bert.*`` (heart_bert, loaded as
  a causal ``BertLMHeadModel``), ``proj_t.*`` (report head), ``sent_proj.*``,
  ``text_decoder.*`` (open_clip ``MultimodalTransformer``) and ``logit_scale``.
- ``encoder``: the ``fuyingw/MELP_Encoder`` folder (``model.safetensors`` + ``config.json``).
  ASSUMPTION (the folder's custom code is not available offline): its tensors are the
  reference's ECG encoder wrapper (``ECGFMModel``) with that module's own names, i.e. the
  ``ecg_encoder.*`` part of the full model without its leading ``ecg_encoder.``:
  ``ecg_encoder.feature_extractor...`` (the fairseq-signals Wav2Vec2-CMSC backbone),
  ``attn_pool_contrast``, ``ln_contrast``, ``proj_contrast``, ``attn_pool_caption``,
  ``ln_caption``. Any common prefix in front of these names (e.g. ``model.``) is stripped,
  so a wrapper class around ``ECGFMModel`` reads the same way.

Both are located by an anchor key (the first conv of the ECG backbone); whatever precedes
it is a prefix stripped from every key.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

BACKBONE = "ecg_encoder.ecg_encoder."   # the Wav2Vec2-CMSC model inside the ECG-FM wrapper
ANCHOR = BACKBONE + "feature_extractor.conv_layers.0.0.weight"
TEXT_EMBEDDINGS = "lm_model.bert.embeddings.word_embeddings.weight"


class ConversionError(ValueError):
    """Reference weights that cannot be read or mapped: the message names the key or file."""


@dataclass
class ReferenceWeights:
    kind: str                       # "lightning" | "encoder"
    source: str
    state: dict[str, torch.Tensor]  # full-model reference names, fp32, prefix stripped
    config: dict[str, Any] = field(default_factory=dict)   # the encoder folder's config.json
    prefix: str = ""                # what was stripped from the file's keys


def _numpy_globals() -> list:
    """The numpy objects a Lightning checkpoint's ``hyper_parameters`` pickle (a numpy scalar
    such as the reference's ``init_logit_scale = np.log(1 / 0.07)``, and its dtype), under
    the names numpy 1 *and* numpy 2 give them: a checkpoint written under numpy 1 names
    ``numpy.core.multiarray.scalar``, numpy 2 moved it to ``numpy._core``."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [np.dtype, *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64,
                                                       np.int32, np.int64, np.bool_)}]
    return [*dtypes, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


def _torch_load_safely(path: str) -> Any:
    """``torch.load(weights_only=True)`` with exactly the numpy scalar and dtype globals of
    Lightning checkpoints allowed (``_numpy_globals``), nothing else."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        # torch's message is long; its "Unsupported global: GLOBAL x.y" line names the object.
        reason = next((ln.strip() for ln in lines if "Unsupported global" in ln),
                      lines[0] if lines else type(err).__name__)
        raise ConversionError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({reason}); if you "
            f"trust the file, save its state dict alone: torch.save(torch.load(path, "
            f"weights_only=False)['state_dict'], 'state_dict.pt')") from None


def _strip_prefix(state: dict[str, torch.Tensor], anchor: str, source: str
                  ) -> tuple[dict[str, torch.Tensor], str]:
    hits = [k for k in state if k.endswith(anchor)]
    if len(hits) != 1:
        raise ConversionError(f"{source}: expected exactly one key ending in {anchor!r} (the "
                              f"reference ECG backbone's first conv), found {len(hits)}")
    prefix = hits[0][: -len(anchor)]
    outside = sorted(k for k in state if not k.startswith(prefix))
    if outside:
        raise ConversionError(f"{source}: key {outside[0]!r} lacks the prefix {prefix!r} of the "
                              f"other reference keys")
    return {k[len(prefix):]: v for k, v in state.items()}, prefix


def _as_fp32(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not torch.is_tensor(value):
            raise ConversionError(f"{source}: entry {name!r} is not a tensor")
        out[name] = value.float() if value.is_floating_point() else value
    return out


def read_lightning_checkpoint(path: str) -> ReferenceWeights:
    """The full reference model from a Lightning ``.ckpt`` (or a bare state-dict file)."""
    loaded = _torch_load_safely(path)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: no state dict (expected a Lightning checkpoint with "
                              f"a 'state_dict' entry)")
    state, prefix = _strip_prefix(_as_fp32(state, path), ANCHOR, path)
    if TEXT_EMBEDDINGS not in state:
        raise ConversionError(f"{path}: no {TEXT_EMBEDDINGS!r}: not a full MELP checkpoint "
                              f"(an ECG-encoder-only file goes in a MELP_Encoder folder)")
    return ReferenceWeights("lightning", path, state, prefix=prefix)


def read_encoder_folder(path: str) -> ReferenceWeights:
    """The ``MELP_Encoder`` folder: ECG-FM wrapper tensors, named as in the full model."""
    import json

    from safetensors.torch import load_file

    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise ConversionError(f"{path}: no model.safetensors (expected the MELP_Encoder folder)")
    config_file = os.path.join(path, "config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
    wrapper_anchor = ANCHOR[len("ecg_encoder."):]
    state, prefix = _strip_prefix(_as_fp32(load_file(weights), weights), wrapper_anchor, weights)
    state = {"ecg_encoder." + k: v for k, v in state.items()}
    return ReferenceWeights("encoder", path, state, config=config, prefix=prefix)


def read_reference(path: str) -> ReferenceWeights:
    """A Lightning checkpoint file or a MELP_Encoder folder, whichever ``path`` is."""
    if os.path.isdir(path):
        return read_encoder_folder(path)
    if os.path.isfile(path):
        return read_lightning_checkpoint(path)
    raise ConversionError(f"--reference {path}: no such file or folder")
