"""The model under evaluation and its embeddings of the plan's records (Ray Data).

``build_model`` loads the checkpoint (or builds its architecture with seeded, untrained
weights for ``--random-init``). ``embed_records`` computes embedding columns with Ray Data
batch inference (``melp_ray.eval.inference``): the records are read with wfdb and min-max
normalised on Ray Data workers (``melp_ray.eval.records.load_batch``) and encoded by an actor pool (one GPU per
actor when the cluster has GPUs). Records that cannot be read keep a row naming the reason;
``drop_rejected`` removes them and records who was rejected and why, so the results can
name them instead of silently dropping them.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from melp_ray.eval.datasets import EvalError, EvalRecord, Plan
from melp_ray.eval.records import load_batch

# ---------------------------------------------------------------- models

def build_model(checkpoint: str, random_init: bool = False, seed: int = 0):
    """The MELP to evaluate; picklable via functools.partial for the Ray actors.

    ``random_init``: the same architecture (the checkpoint's ModelConfig), seeded, no
    trained weights loaded; the baseline that shows what pretraining bought.
    """
    import torch

    from melp_ray.hub.checkpoint import load_model
    from melp_ray.config import model_config_from_dict

    if not random_init:
        return load_model(checkpoint).eval()
    from melp_ray.model import MELP

    kind, model_cfg, _ = checkpoint_info(checkpoint)
    if kind == "exported folder":
        # An export names its text tower relative to the folder; hf.py resolves it.
        from melp_ray.hub.hf import exported_model_config

        cfg = exported_model_config(checkpoint)
    else:
        cfg = model_config_from_dict(model_cfg)
    with torch.random.fork_rng(devices=[]):  # same weights in every actor, global RNG untouched
        torch.manual_seed(seed)
        model = MELP(cfg)
    return model.eval()


# ---------------------------------------------------------------- Ray Data side


# Inference passes (Ray Data pipelines) this process has run: the benchmark reports them so
# "embeddings computed once per dataset and model" is a number in results.json, not a hope.
_inference_passes = 0


def inference_passes() -> int:
    """How many ``embed_records`` passes this process has run."""
    return _inference_passes


def embed_records(plan: Plan, records: list[EvalRecord], outputs: dict[str, tuple[str, str]],
                  model_fn, batch_size: int, actors: int | None) -> dict[str, np.ndarray]:
    """Embedding columns for ``records``, sorted by record_id, with a ``rejected`` column."""
    import ray.data

    global _inference_passes
    _inference_passes += 1

    from melp_ray.eval.inference import collect_columns, embed_in_this_process, extract_embeddings

    if plan.dataset == "shards":   # one read task per shard file, where the shards lie
        from melp_ray.eval.shard_source import shard_dataset

        ds = shard_dataset(records, plan.sample_rate, plan.seconds, plan.crop_seconds,
                           plan.shard_sample_rate)
    else:
        items = [{"record_id": r.record_id, "path": r.path, "report": r.report} for r in records]
        blocks = max(1, min(len(items) // max(batch_size, 1), 64))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(load_batch, batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"dataset": plan.dataset, "sample_rate": plan.sample_rate,
                                       "seconds": plan.seconds, "crop_seconds": plan.crop_seconds})
    columns = [*outputs, "rejected"]
    if actors == 0:
        data = embed_in_this_process(ds, model_fn, outputs, columns, batch_size, "record_id")
    else:
        data = collect_columns(extract_embeddings(ds, model_fn, outputs=outputs,
                                                  batch_size=batch_size, concurrency=actors),
                               columns, sort_by="record_id")
    if len(data["record_id"]) != len(records):
        raise RuntimeError(f"inference returned {len(data['record_id'])} rows for "
                           f"{len(records)} records")
    return data


def drop_rejected(data: dict[str, np.ndarray], accounting: dict) -> dict[str, np.ndarray]:
    """Drop rejected rows, naming them (reason -> ids) in ``accounting``."""
    rejected = np.array([bool(r) for r in data["rejected"]], dtype=bool)
    for rid, why in zip(data["record_id"][rejected], data["rejected"][rejected]):
        reason = str(why).split(":", 1)[0]
        accounting.setdefault("rejected", {}).setdefault(reason, []).append(str(rid))
        accounting.setdefault("rejected_detail", {})[str(rid)] = str(why)
    return {k: v[~rejected] for k, v in data.items() if k != "rejected"}


class EmbeddingTable:
    """Embeddings of a set of records from one inference pass, served to every mode that
    asks for some of them: a benchmark scoring one checkpoint several ways (probe, zero-shot,
    retrieval) starts one actor pool, not one per mode. Called like ``embed_records`` without
    the plan and model arguments: ``table(records, outputs)``."""

    def __init__(self, data: dict[str, np.ndarray]):
        self.data = data
        self.row_of = {str(rid): i for i, rid in enumerate(data["record_id"])}

    @classmethod
    def compute(cls, plan: Plan, records: list[EvalRecord], outputs: dict[str, tuple[str, str]],
                model_fn, batch_size: int, actors: int | None) -> EmbeddingTable:
        unique = list({r.record_id: r for r in records}.values())
        return cls(embed_records(plan, unique, outputs, model_fn, batch_size, actors))

    def __call__(self, records: list[EvalRecord], outputs: dict[str, tuple[str, str]]
                 ) -> dict[str, np.ndarray]:
        missing = [c for c in outputs if c not in self.data]
        absent = [r.record_id for r in records if r.record_id not in self.row_of]
        if missing or absent:
            raise KeyError(f"embedding table lacks columns {missing} / records {absent[:5]}")
        rows = sorted(self.row_of[r.record_id] for r in records)   # record_id order, as embed_records
        return {k: self.data[k][rows] for k in ("record_id", "rejected", *outputs)}


def checkpoint_info(path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, model config dict, data config dict) of a training checkpoint or an export."""
    from melp_ray.hub import checkpoint as ckpt
    from melp_ray.utils import storage

    local = path if storage.is_uri(path) else storage.normalise_storage_path(path)
    if not storage.is_uri(path) and not os.path.exists(local):
        raise EvalError(f"--checkpoint {path} does not exist")
    if not storage.is_uri(path) and ckpt.is_exported_folder(local):
        config = storage.read_json(storage.join(local, "config.json"))
        data = {"sample_rate": config.get("sample_rate"), "seconds": config.get("seconds")}
        return "exported folder", config.get("melp", {}), data
    try:
        config = ckpt.checkpoint_config(path)
    except FileNotFoundError as err:
        raise EvalError(f"--checkpoint: {err}, nor an exported folder (config.json with "
                        "model_type melp_ray)") from None
    return "training checkpoint", config["model"], config.get("data", {})
