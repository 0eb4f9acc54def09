"""Evaluate on prepared shards (``--dataset shards``): a folder or bucket written by
``python -m melp_ray.prepare``, read where it lies (local path, ``s3://``, ``gs://``).

The shards already hold what evaluation needs: the canonical 12-lead signal, the report,
the fold and the labels of each PTB-XL task. Records keep their PTB-XL ``strat_fold``; a
dataset without folds (MIMIC-IV-ECG) gets the same fixed pseudo-folds 1-10 as CPSC2018.
Class names and default prompts of PTB-XL shards come from PTB-XL's ``scp_statements.csv``
(the copy in the bundled sample is the original file), so the source root need not exist
where the evaluation runs.

Each shard file is read once, by one Ray Data task, for the records the plan asks for.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from melp_ray.utils import storage
from melp_ray.eval.datasets import EvalError, EvalRecord, physionet_fold

# The columns listed on the driver: everything but the signal.
_LISTING_COLUMNS = ("record_id", "dataset", "strat_fold", "report")


def check_shard_root(root: str) -> tuple[str, dict[str, Any]]:
    """(root, manifest) of a prepared folder; EvalError naming what is missing."""
    from melp_ray.data.shards import load_manifest

    root = root if storage.is_uri(root) else os.path.abspath(os.path.expanduser(root))
    try:
        manifest = load_manifest(root)
    except FileNotFoundError as err:
        raise EvalError(f"--root: {err}") from None
    except OSError as err:   # an unreachable bucket, a refused credential
        raise EvalError(f"--root {root} cannot be read: {err}") from None
    return root, manifest


def source_dataset(manifest: dict[str, Any]) -> str:
    return str(manifest.get("dataset", "unknown"))


def shard_classes(manifest: dict[str, Any], task: str | None) -> list[str]:
    """The task's classes: PTB-XL's own list (from the bundled scp_statements.csv)."""
    if task is None:
        return []
    if source_dataset(manifest) != "ptb-xl":
        raise EvalError(f"these shards hold {source_dataset(manifest)} records, which carry "
                        "no diagnostic labels: use --mode retrieval or generation")
    from melp_ray.data.ptbxl import class_names
    from melp_ray.data.sources import bundled_root

    return class_names(task, bundled_root())


def ptbxl_statements_root() -> str:
    """Where PTB-XL shards' default prompts are read from (scp_statements.csv)."""
    from melp_ray.data.sources import bundled_root

    return str(bundled_root())


def shard_records(root: str, manifest: dict[str, Any], task: str | None,
                  classes: list[str]) -> list[EvalRecord]:
    """One EvalRecord per shard row (both splits of prepare), ``path`` = its shard file."""
    from melp_ray.data.shards import read_shard_table, shard_paths

    columns = [*_LISTING_COLUMNS, *([f"labels_{task}"] if task else [])]
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for path in shard_paths(root):
        table = read_shard_table(path, columns=columns).to_pydict()
        for row in range(len(table["record_id"])):
            rid, fold = str(table["record_id"][row]), int(table["strat_fold"][row])
            labels = None
            if task:
                labels = np.zeros(len(classes), dtype=np.float32)
                for name in table[f"labels_{task}"][row] or ():
                    if name in index:
                        labels[index[name]] = 1.0
            records.append(EvalRecord(record_id=rid, path=path, report=table["report"][row] or "",
                                      fold=fold if fold >= 1 else physionet_fold(rid),
                                      labels=labels))
    return records


def read_shard_records(batch: dict[str, np.ndarray], sample_rate: int, seconds: float,
                       crop_seconds: float | None, shard_rate: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches over (shard file, wanted ids) rows -> one row per wanted record:
    normalised signal, report and why a record was rejected (a rate the signal cannot be
    brought to, a shorter record), as ``records.load_batch`` gives for WFDB records."""
    from melp_ray.data.records import fit_signal, n_samples_for
    from melp_ray.data.shards import decode_ecg, read_shard_table
    from melp_ray.eval.records import normalised_or_rejected, zero_pad

    n = n_samples_for(sample_rate, seconds)
    keep = seconds if crop_seconds is None else crop_seconds
    out: dict[str, list] = {"record_id": [], "report": [], "ecg": [], "rejected": []}
    for path, wanted in zip(batch["path"], batch["record_ids"]):
        wanted = set(str(w) for w in wanted)
        table = read_shard_table(str(path), columns=["record_id", "report", "ecg"]).to_pydict()
        for rid, report, ecg in zip(table["record_id"], table["report"], table["ecg"]):
            if rid not in wanted:
                continue
            signal, reason = normalised_or_rejected(
                lambda ecg=ecg: zero_pad(fit_signal(decode_ecg(ecg), shard_rate, sample_rate, keep), n),
                n)
            out["ecg"].append(signal)
            out["rejected"].append(reason)
            out["record_id"].append(rid)
            out["report"].append(report or "")
    return {"record_id": np.array(out["record_id"], dtype=object),
            "report": np.array(out["report"], dtype=object),
            "ecg": np.stack(out["ecg"]) if out["ecg"] else np.zeros((0, 12, n), np.float32),
            "rejected": np.array(out["rejected"], dtype=object)}


def shard_dataset(records: list[EvalRecord], sample_rate: int, seconds: float,
                  crop_seconds: float | None, shard_rate: int):
    """A Ray Dataset of the records' signals: one read task per shard file."""
    import ray.data

    by_file: dict[str, list[str]] = {}
    for r in records:
        by_file.setdefault(r.path, []).append(r.record_id)
    items = [{"path": path, "record_ids": ids} for path, ids in sorted(by_file.items())]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(read_shard_records, batch_size=1, batch_format="numpy",
                          fn_kwargs={"sample_rate": sample_rate, "seconds": seconds,
                                     "crop_seconds": crop_seconds, "shard_rate": shard_rate})
