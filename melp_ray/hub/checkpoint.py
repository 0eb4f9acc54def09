"""Training checkpoints -> plain fp32 weights and a ready MELP model, from any ZeRO stage.

A training checkpoint is the folder Ray Train persists for each report (see
``melp_ray.train.recipe``)::

    <ckpt>/latest                 DeepSpeed's pointer to the tag ("deepspeed")
    <ckpt>/deepspeed/             mp_rank_00_model_states.pt (+ *_optim_states.pt for ZeRO 1-3)
    <ckpt>/trainer_state.json     step, epoch, world size, zero stage
    <ckpt>/melp_config.json       the whole PretrainConfig; its "model" entry is the ModelConfig

Every function here takes a local path or a URI (``s3://``, ``gs://``, ``file://``, any
pyarrow filesystem); a URI is copied to a temporary local folder first. A *run* folder
(``<storage_path>/<run.name>``) is accepted too and resolves to its latest checkpoint.

    state = consolidated_state_dict(ckpt)        # {name: fp32 tensor}
    model = load_model_from_checkpoint(ckpt)     # MELP, eval mode, on CPU
    model = load_model(ckpt_or_exported_folder)  # also takes a `python -m melp_ray.export` folder
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from typing import Any
from collections.abc import Iterator

import pyarrow.fs as pafs

from melp_ray.utils import storage

CHECKPOINT_TAG = "deepspeed"          # the sub-folder DeepSpeed writes inside a checkpoint
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "melp_config.json"
CHECKPOINT_PREFIX = "checkpoint_"     # checkpoint folder names (melp_ray.train.session.checkpoint_name)


# ---------------------------------------------------------------- locating checkpoints

def _fs_children(path: str) -> list[pafs.FileInfo]:
    fs, p = storage.filesystem_and_path(path)
    return fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))


def is_training_checkpoint(path: str) -> bool:
    return storage.exists(storage.join(path, RUN_CONFIG)) and \
        storage.exists(storage.join(path, CHECKPOINT_TAG))


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint; for a run folder, its selected checkpoint:
    the best one by ``train.checkpoint_metric`` when the run ranked them (the latest
    checkpoint's trainer state names the best step), else the latest.

    "Latest" = highest trainer step read from each folder's trainer state, not the folder
    name: training names them ``checkpoint_step_NNNNNN`` (one folder a step), runs of
    earlier versions by Ray's timestamp (ties then go to the later name).
    """
    path = path.rstrip("/") if storage.is_uri(path) else storage.normalise_storage_path(path)
    if storage.is_file(path):
        raise NotADirectoryError(f"{path} is a file: expected a run folder or a checkpoint "
                                 f"folder (checkpoint_*/ with {RUN_CONFIG})")
    if is_training_checkpoint(path):
        return path
    candidates = []
    for info in _fs_children(path):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        ckpt = storage.join(path, info.base_name)
        if not is_training_checkpoint(ckpt):
            continue          # a checkpoint Ray was still writing, or one of another recipe
        state = storage.read_json(storage.join(ckpt, TRAINER_STATE)) \
            if storage.exists(storage.join(ckpt, TRAINER_STATE)) else {}
        candidates.append((int(state.get("step", -1)), info.base_name, ckpt, state.get("best_step")))
    if not candidates:
        raise FileNotFoundError(f"{path} is neither a melp_ray training checkpoint (with "
                                f"{RUN_CONFIG} and {CHECKPOINT_TAG}/) nor a run folder holding one")
    latest = max(candidates)
    best = [c for c in candidates if latest[3] is not None and c[0] == latest[3]]
    return max(best)[2] if best else latest[2]


@contextlib.contextmanager
def local_checkpoint(path: str) -> Iterator[str]:
    """A local folder holding the checkpoint at ``path`` (downloaded when it is a URI)."""
    path = resolve_checkpoint(path)
    if not storage.is_uri(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="melp_ckpt_") as tmp:
        storage.copy_folder(path, tmp)
        yield tmp


# ---------------------------------------------------------------- weights

def _module_entry(tag_dir: str) -> dict[str, Any]:
    import torch

    # DeepSpeed's own file: it pickles config objects, so (like DeepSpeed's loader) this
    # needs weights_only=False. Only load checkpoints you trust; exports are safetensors.
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"),
                        map_location="cpu", weights_only=False)
    return states["module"]


def _local_consolidated(ckpt: str) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(ckpt, CHECKPOINT_TAG)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"no DeepSpeed tag folder {tag_dir}")
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        # ZeRO 1-3: the fp32 master weights live (partitioned) in the optimizer shards;
        # DeepSpeed merges them, plus frozen params and buffers from the model states.
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=CHECKPOINT_TAG)
    else:
        # ZeRO 0 writes no optimizer shards: the full module sits in mp_rank_00. With bf16
        # training these are the bf16 weights (there is no fp32 master copy to recover).
        state = _module_entry(tag_dir)
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def consolidated_state_dict(ckpt_dir: str) -> dict[str, Any]:
    """{parameter/buffer name: tensor}, floating tensors in fp32, from any ZeRO stage 0-3.

    Keys are those of ``MELP.state_dict()``; ``ckpt_dir`` may be a URI or a run folder.
    """
    with local_checkpoint(ckpt_dir) as local:
        return _local_consolidated(local)


def checkpoint_config(ckpt_dir: str) -> dict[str, Any]:
    """The training config (a dict) saved beside the weights."""
    return storage.read_json(storage.join(resolve_checkpoint(ckpt_dir), RUN_CONFIG))


def model_from_state_dict(model_cfg, state: dict[str, Any]):
    """MELP(model_cfg) with exactly ``state`` loaded (strict), in eval mode."""
    import torch
    from melp_ray.model import MELP

    with torch.device("cpu"):
        model = MELP(model_cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model_from_checkpoint(path: str):
    """The MELP of a training checkpoint (or the latest one of a run folder), fp32, eval mode."""
    from melp_ray.config import model_config_from_dict

    with local_checkpoint(path) as local:
        with open(os.path.join(local, RUN_CONFIG)) as f:
            model_cfg = model_config_from_dict(json.load(f)["model"])
        state = _local_consolidated(local)
    return model_from_state_dict(model_cfg, state)


def is_exported_folder(path: str) -> bool:
    """A folder written by ``python -m melp_ray.export`` (config.json with model_type melp_ray)."""
    from melp_ray.hub.hf_config import MODEL_TYPE

    config = storage.join(path, "config.json")
    if not storage.exists(config):
        return False
    return storage.read_json(config).get("model_type") == MODEL_TYPE


def load_model(path: str):
    """A MELP from a training checkpoint, a run folder, or an exported Hugging Face folder.

    The one entry point for evaluation: whatever was given, the result is a ``MELP`` with
    ``encode_ecg``, ``encode_reports`` and ``tokenizer``, on CPU, in eval mode.
    """
    if not storage.is_uri(path) and is_exported_folder(storage.normalise_storage_path(path)):
        from melp_ray.hub.hf import MELPHFModel

        return MELPHFModel.from_pretrained(storage.normalise_storage_path(path)).melp.eval()
    return load_model_from_checkpoint(path)


# ---------------------------------------------------------------- resizing (elastic runs)

UNIVERSAL_TAG = CHECKPOINT_TAG + "_universal"


def has_partitioned_optimizer(ckpt: str) -> bool:
    """Whether a local checkpoint's optimizer state is split per rank (ZeRO 1-3, or bf16 at
    stage 0): what cannot be loaded as it is by another number of ranks."""
    return bool(glob.glob(os.path.join(ckpt, CHECKPOINT_TAG, "*optim_states.pt")))


def universal_checkpoint(ckpt: str, out: str) -> str:
    """DeepSpeed's universal checkpoint of the local checkpoint ``ckpt``, written to
    ``out/UNIVERSAL_TAG`` (returns ``out``): every parameter's fp32 weights and optimizer
    moments whole, one file each, which any number of ranks loads with
    ``"checkpoint": {"load_universal": true}`` (each rank slicing out its partition)."""
    import argparse
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=os.path.join(ckpt, CHECKPOINT_TAG),
                              output_folder=os.path.join(out, UNIVERSAL_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    quiet = io.StringIO()       # it prints every parameter it merges, and progress bars
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal(args)
    return out


# ---------------------------------------------------------------- live engines

def gathered_state_dict(module) -> dict[str, Any]:
    """Full fp32 copy of a live (possibly ZeRO-3 partitioned) module's state dict.

    A collective under ZeRO-3: every rank must call it. Independent of the checkpoint
    files, so it can check what ``consolidated_state_dict`` rebuilds from them.
    """
    import deepspeed

    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if partitioned \
        else contextlib.nullcontext()
    with gather:
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}


def checkpoint_step(path: str) -> int | None:
    """The optimizer step a checkpoint was taken at (None when unknown)."""
    state_file = storage.join(resolve_checkpoint(path), TRAINER_STATE)
    return storage.read_json(state_file).get("step") if storage.exists(state_file) else None


def run_folder_of(checkpoint: str) -> str | None:
    """The run folder a Ray Train checkpoint sits in (its parent), if it looks like one."""
    ckpt = resolve_checkpoint(checkpoint)
    name = re.split(r"[/\\]", ckpt.rstrip("/"))[-1]
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    return ckpt.rstrip("/")[: -len(name) - 1]
