"""The model under evaluation and its embeddings of the plan's records (Ray Data).

``build_model`` loads the checkpoint (or builds its architecture with seeded, untrained
weights for ``--random-init``). ``embed_records`` computes embedding columns with Ray Data
batch inference (``melp_ray.eval.inference``): the records are read with wfdb and min-max
normalised on Ray Data workers (``load_batch``) and encoded by an actor pool (one GPU per
actor when the cluster has GPUs). Records that cannot be read keep a row naming the reason;
``drop_rejected`` removes them and records who was rejected and why, so the results can
name them instead of silently dropping them.
"""
from __future__ import annotations

import numpy as np

from melp_ray.eval.plan import EvalRecord, Plan, checkpoint_info

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

def read_record(dataset: str, path: str, sample_rate: int, seconds: float,
                crop_seconds: float | None = None) -> np.ndarray:
    """One record as float32 (12, sample_rate*seconds) in mV; raises RecordRejected.

    ``crop_seconds``: keep only the first ``crop_seconds`` (at the model's rate) and
    zero-pad them to ``seconds``: the reference's CPSC2018 reading (first 5 s, zeros to
    10 s), so a record of 5-10 s is kept. Crop, then resample, then pad: the padding stays
    exact zeros; the caller normalises the padded record, as the reference does.
    """
    from melp_ray.data.records import (RecordRef, RecordRejected, UNREADABLE, fit_signal,
                                       load_signal, n_samples_for)

    keep = seconds if crop_seconds is None else crop_seconds
    if dataset == "ptb-xl":
        ref = RecordRef(record_id="", subject_id="", dataset=dataset, path=path, report="")
        signal = load_signal(ref, None, sample_rate, keep)
    elif dataset == "manifest":   # path: ROOT::RECORD_ID (data/manifest.py)
        from melp_ray.data.manifest import ref_for_eval_path

        signal = load_signal(*ref_for_eval_path(path), sample_rate, keep)
    elif dataset == "code-15":
        signal = _read_code15(path, sample_rate, keep)
    else:
        from melp_ray.data.physionet import PhysioNetFormatError, load_physionet_signal

        try:
            raw, fs = load_physionet_signal(path)
        except (PhysioNetFormatError, OSError) as err:
            raise RecordRejected(UNREADABLE, str(err)) from None
        signal = fit_signal(raw, fs, sample_rate, keep)
    return zero_pad(signal, n_samples_for(sample_rate, seconds))


def zero_pad(signal: np.ndarray, n_samples: int) -> np.ndarray:
    """(12, T) zero-padded at the end to ``n_samples`` (after a crop or a short exam)."""
    padding = n_samples - signal.shape[1]
    return np.pad(signal, ((0, 0), (0, padding))) if padding > 0 else signal


def normalised_or_rejected(read, n_samples: int) -> tuple[np.ndarray, str]:
    """(min-max normalised ``read()``, "") or, for a rejected record, (zeros, the reason):
    a rejected record keeps its row so one pass encodes the good ones and names the bad."""
    from melp_ray.data.records import RecordRejected
    from melp_ray.data.records import minmax_normalise

    try:
        return minmax_normalise(read()), ""
    except RecordRejected as err:
        return np.zeros((12, n_samples), dtype=np.float32), str(err)


def _read_code15(path: str, sample_rate: int, keep: float) -> np.ndarray:
    """A CODE tracing without its zero padding, resampled; a 7 s exam stays 7 s (the
    caller zero-pads it to the model's length, as for --crop-seconds)."""
    import math

    from melp_ray.data import code15
    from melp_ray.data.records import FLAT_SIGNAL, RecordRejected, UNREADABLE, fit_signal

    try:
        raw = code15.read_tracing(path)
    except (OSError, KeyError, ValueError) as err:
        raise RecordRejected(UNREADABLE, str(err)) from None
    if raw.shape[1] == 0:
        raise RecordRejected(FLAT_SIGNAL, "every sample of every lead is zero")
    # The longest whole number of output samples the real signal covers, at most ``keep``.
    n_out = min(round(keep * sample_rate),
                math.floor(raw.shape[1] * sample_rate / code15.SAMPLE_RATE))
    return fit_signal(raw, code15.SAMPLE_RATE, sample_rate, max(n_out, 1) / sample_rate)


def load_batch(batch: dict[str, np.ndarray], dataset: str, sample_rate: int,
               seconds: float, crop_seconds: float | None = None) -> dict[str, np.ndarray]:
    """Ray Data map_batches: paths -> normalised signals, plus why a record was rejected.

    A rejected record keeps its row (zeros as signal, the reason in ``rejected``) so one
    pass both encodes the good records and names the bad ones; the driver drops it.
    """
    from melp_ray.data.records import n_samples_for

    n = n_samples_for(sample_rate, seconds)
    signals, reasons = [], []
    for path in batch["path"]:
        signal, reason = normalised_or_rejected(
            lambda path=path: read_record(dataset, str(path), sample_rate, seconds, crop_seconds), n)
        signals.append(signal)
        reasons.append(reason)
    out = {k: v for k, v in batch.items() if k != "path"}
    out["ecg"] = np.stack(signals)
    out["rejected"] = np.array(reasons, dtype=object)
    return out


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
