"""Parquet shards written by ``prepare``: schema, ECG encoding, atomic writes, manifest.

A prepared folder looks like::

    OUT/manifest.json                 what was prepared, from what, with which settings
    OUT/train/part-00000.parquet      rows of SCHEMA
    OUT/val/part-00000.parquet
    OUT/_state/<split>-part-00000.json  per-chunk bookkeeping (kept ids, rejections)

The ``ecg`` column holds the canonical signal as raw bytes: float32 little-endian,
C order, shape (12, n_samples), millivolts; ``decode_ecg`` turns it back into an array.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from melp_ray import storage
from melp_ray.data.leads import LEADS
from melp_ray.data.records import LABEL_TASKS, RecordRef

MANIFEST_NAME = "manifest.json"
STATE_DIR = "_state"
SPLITS = ("train", "val")
ECG_DTYPE = np.dtype("<f4")

SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("subject_id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("strat_fold", pa.int32()),
    ("report", pa.string()),
    ("ecg", pa.binary()),
    *[(f"labels_{task}", pa.list_(pa.string())) for task in LABEL_TASKS],
])


# ---------------------------------------------------------------- ECG bytes
def encode_ecg(signal: np.ndarray) -> bytes:
    """(12, T) array -> float32 little-endian C-order bytes."""
    return np.ascontiguousarray(signal, dtype=ECG_DTYPE).tobytes(order="C")


def decode_ecg(data: bytes, n_leads: int = len(LEADS)) -> np.ndarray:
    """Bytes of the ``ecg`` column -> writable float32 array of shape (n_leads, T)."""
    flat = np.frombuffer(data, dtype=ECG_DTYPE)
    if flat.size % n_leads:
        raise ValueError(f"{flat.size} floats cannot be split into {n_leads} leads")
    return flat.reshape(n_leads, -1).astype(np.float32, copy=True)


def shard_row(ref: RecordRef, split: str, signal: np.ndarray) -> dict[str, Any]:
    """One row of SCHEMA."""
    row = {
        "record_id": ref.record_id,
        "subject_id": ref.subject_id,
        "dataset": ref.dataset,
        "split": split,
        "strat_fold": int(ref.strat_fold),
        "report": ref.report,
        "ecg": encode_ecg(signal),
    }
    for task in LABEL_TASKS:
        row[f"labels_{task}"] = list(ref.labels.get(task, []))
    return row


# ---------------------------------------------------------------- paths
def shard_relpath(split: str, index: int) -> str:
    """"<split>/part-<NNNNN>.parquet", relative to the output folder."""
    return f"{split}/part-{index:05d}.parquet"


def state_relpath(split: str, index: int) -> str:
    return f"{STATE_DIR}/{split}-part-{index:05d}.json"


# ---------------------------------------------------------------- atomic writes
def write_shard(rows: list[dict[str, Any]], path: str | os.PathLike) -> int:
    """Write rows of SCHEMA to one Parquet file (local path or URI), atomically: a temp
    file beside it, then a move; returns the row count."""
    fs, fs_path = storage.filesystem_and_path(path)
    fs.create_dir(os.path.dirname(fs_path), recursive=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = storage.temp_path(fs_path)
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, fs_path)
    return table.num_rows


def remove_temp_files(out: str | os.PathLike) -> list[str]:
    """Delete temp files a killed run left behind (``*.tmp-<pid>``); returns their paths."""
    removed = []
    for path in storage.list_files(os.fspath(out)):
        if ".tmp-" in path.rpartition("/")[2].partition("?")[0]:
            storage.delete_file(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- reading
def read_shard_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """One shard (local path or URI) as a table of SCHEMA, or of ``columns`` only."""
    fs, fs_path = storage.filesystem_and_path(path)
    return pq.read_table(fs_path, columns=columns, schema=SCHEMA, filesystem=fs)


def read_shard_rows(path: str | os.PathLike, decode: bool = True) -> list[dict[str, Any]]:
    """All rows of one shard as dicts; with ``decode`` the ``ecg`` value is a (12, T) array."""
    rows = read_shard_table(path).to_pylist()
    if decode:
        for row in rows:
            row["ecg"] = decode_ecg(row["ecg"])
    return rows


def load_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder (FileNotFoundError with a hint when absent)."""
    path = storage.join(os.fspath(out), MANIFEST_NAME)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} not found: is {out} a folder written by `python -m melp_ray.prepare`?")
    return storage.read_json(path)


def shard_paths(out: str | os.PathLike, split: str | None = None) -> list[str]:
    """Paths (URIs under a URI) of the manifest's shards (of one split, or all), in manifest order."""
    manifest = load_manifest(out)
    return [storage.join(os.fspath(out), shard["path"]) for shard in manifest["shards"]
            if split is None or shard["split"] == split]


def schema_description() -> dict[str, str]:
    """{column: arrow type} for the manifest."""
    return {name: str(SCHEMA.field(name).type) for name in SCHEMA.names}


def iter_rows(paths: Iterable[str | os.PathLike]) -> Iterable[dict[str, Any]]:
    for path in paths:
        yield from read_shard_rows(path)
