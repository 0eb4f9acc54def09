"""Parquet shards written by ``prepare``: schema, ECG encoding, atomic writes, manifest.

A prepared folder looks like::

    OUT/manifest.json                 what was prepared, from what, with which settings
    OUT/train/part-00000.parquet      rows of SCHEMA
    OUT/val/part-00000.parquet
    OUT/_state/<split>-part-00000.json  per-chunk bookkeeping (kept ids, rejections)

The ``ecg`` column holds the canonical signal, shape (12, n_samples), millivolts, as bytes
in one of three encodings (``prepare --ecg-encoding``); ``decode_ecg`` reads any of them:

- ``float32`` (default): raw float32 little-endian, C order; 4 bytes a sample.
- ``float16``: a header, then float16 samples; 2 bytes a sample.
- ``int16``: a header with one scale per lead (mV per unit, max|x| / 32767 of that lead of
  that record), then int16 samples; 2 bytes a sample, error at most half a unit.

The header is ``COMPACT_MAGIC``, one code byte, then 12 float32 scales (53 bytes). Raw
float32 bytes are a multiple of 48 long and a compact record never is (53 + 24k), so the
two cannot be confused.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from melp_ray.utils import storage
from melp_ray.data.leads import LEADS
from melp_ray.data.records import LABEL_TASKS, RecordRef

MANIFEST_NAME = "manifest.json"
STATE_DIR = "_state"
SPLITS = ("train", "val")
ECG_DTYPE = np.dtype("<f4")
ECG_ENCODINGS = ("float32", "float16", "int16")
COMPACT_MAGIC = b"ECGZ"
_COMPACT = {"float16": (1, np.dtype("<f2")), "int16": (2, np.dtype("<i2"))}
_DTYPE_OF_CODE = {code: dtype for code, dtype in _COMPACT.values()}
_INT16_MAX = 32767

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
def encode_ecg(signal: np.ndarray, encoding: str = "float32") -> bytes:
    """(12, T) array in mV -> the bytes of the ``ecg`` column in ``encoding``."""
    x = np.ascontiguousarray(signal, dtype=np.float32)
    if encoding == "float32":
        return x.astype(ECG_DTYPE, copy=False).tobytes(order="C")
    if encoding not in _COMPACT:
        raise ValueError(f"ecg encoding must be one of {ECG_ENCODINGS}, got {encoding!r}")
    code, dtype = _COMPACT[encoding]
    scales = np.ones(x.shape[0], dtype=ECG_DTYPE)
    if encoding == "int16":
        peak = np.abs(x).max(axis=1)
        scales = np.where(peak > 0, peak / _INT16_MAX, 1.0).astype(ECG_DTYPE)
        data = np.rint(x / scales[:, None]).astype(dtype)
    else:
        data = x.astype(dtype)
    return COMPACT_MAGIC + bytes([code]) + scales.tobytes() + data.tobytes(order="C")


def decode_ecg(data: bytes, n_leads: int = len(LEADS)) -> np.ndarray:
    """Bytes of the ``ecg`` column (any encoding) -> writable float32 array (n_leads, T)."""
    raw_multiple = ECG_DTYPE.itemsize * n_leads
    if data[:4] == COMPACT_MAGIC and len(data) % raw_multiple:
        return _decode_compact(data, n_leads)
    flat = np.frombuffer(data, dtype=ECG_DTYPE)
    if len(data) % raw_multiple:
        raise ValueError(f"{len(data)} bytes are neither {n_leads} leads of float32 nor a "
                         f"compact ({'/'.join(_COMPACT)}) record")
    return flat.reshape(n_leads, -1).astype(np.float32, copy=True)


def decode_ecg_column(values, n_leads: int = len(LEADS)) -> np.ndarray:
    """Many ``ecg`` values of one length -> one (n, n_leads, T) float32 array, equal to
    stacking ``decode_ecg`` of each; ``values``: a pyarrow binary (chunked) array or bytes.

    Why: the stream decodes a batch at a time, and each value is written straight into
    the one output (``decode_ecg`` + ``np.stack`` allocated and copied every record twice,
    and Python ``bytes`` out of Arrow are a third copy); fresh large allocations cost page
    faults on every batch.
    """
    views = _value_views(values)
    if not views:
        return np.zeros((0, n_leads, 0), np.float32)
    raw_multiple = ECG_DTYPE.itemsize * n_leads
    out = None
    for i, view in enumerate(views):
        compact = bytes(view[:4]) == COMPACT_MAGIC and len(view) % raw_multiple
        n_samples = _compact_samples(view, n_leads) if compact else len(view) // raw_multiple
        if out is None:
            out = np.empty((len(views), n_leads, n_samples), np.float32)
        if n_samples != out.shape[-1]:
            raise ValueError(f"ecg values of different lengths in one batch: {n_samples} and "
                             f"{out.shape[-1]} samples per lead")
        if compact:
            _decode_compact(view, n_leads, out=out[i])
        else:
            out[i] = decode_view(view, n_leads)
    return out


def decode_view(view, n_leads: int) -> np.ndarray:
    """Raw float32 bytes -> a read-only (n_leads, T) view of them (no copy)."""
    if len(view) % (ECG_DTYPE.itemsize * n_leads):
        raise ValueError(f"{len(view)} bytes are neither {n_leads} leads of float32 nor a "
                         f"compact ({'/'.join(_COMPACT)}) record")
    return np.frombuffer(view, dtype=ECG_DTYPE).reshape(n_leads, -1)


def _value_views(values) -> list:
    """Zero-copy memoryviews of the values of a binary column (Arrow or a sequence of bytes)."""
    if isinstance(values, pa.ChunkedArray):
        return [v for chunk in values.chunks for v in _value_views(chunk)]
    if isinstance(values, pa.Array):
        if values.null_count:
            raise ValueError("the ecg column holds nulls")
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32 if pa.types.is_binary(values.type)
                                else np.int64)[values.offset: values.offset + len(values) + 1]
        data = memoryview(values.buffers()[2])
        return [data[offsets[i]: offsets[i + 1]] for i in range(len(values))]
    return [memoryview(v) for v in values]


def _compact_samples(view, n_leads: int) -> int:
    header = len(COMPACT_MAGIC) + 1 + ECG_DTYPE.itemsize * n_leads
    dtype = _DTYPE_OF_CODE.get(view[4])
    if dtype is None:
        raise ValueError(f"unknown compact ECG code {view[4]}")
    return (len(view) - header) // dtype.itemsize // n_leads


def _decode_compact(data: bytes, n_leads: int, out: np.ndarray | None = None) -> np.ndarray:
    dtype = _DTYPE_OF_CODE.get(data[4])
    if dtype is None:
        raise ValueError(f"unknown compact ECG code {data[4]}")
    header = len(COMPACT_MAGIC) + 1 + ECG_DTYPE.itemsize * n_leads
    scales = np.frombuffer(data[len(COMPACT_MAGIC) + 1:header], dtype=ECG_DTYPE)
    flat = np.frombuffer(data[header:], dtype=dtype)
    if flat.size % n_leads:
        raise ValueError(f"{flat.size} samples cannot be split into {n_leads} leads")
    if out is None:
        return flat.reshape(n_leads, -1).astype(np.float32) * scales[:, None]
    # int16/float16 x float32 computes in float32: the same values as astype, then multiply
    return np.multiply(flat.reshape(n_leads, -1), scales[:, None], out=out)


def shard_row(ref: RecordRef, split: str, signal: np.ndarray,
              encoding: str = "float32") -> dict[str, Any]:
    """One row of SCHEMA."""
    row = {
        "record_id": ref.record_id,
        "subject_id": ref.subject_id,
        "dataset": ref.dataset,
        "split": split,
        "strat_fold": int(ref.strat_fold),
        "report": ref.report,
        "ecg": encode_ecg(signal, encoding),
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
