"""Ray Data pipelines that feed the training workers (and the benchmarks' ingest).

Two sources, one output format (see docs/architecture.md, "Batches a training worker receives"):

- prepared Parquet shards (``python -m melp_ray.prepare``): read -> decode -> normalise -> tokenise
- a raw WFDB root (PTB-XL or MIMIC-IV-ECG layout): read with wfdb -> validate -> normalise -> tokenise

One dataset per rank, each a fixed slice of the split (``melp_ray.data.rows`` says which
rows, and why not ``streaming_split``). Reports are tokenised here, on the data workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from melp_ray.config import PretrainConfig
from melp_ray.data.leads import LEADS
from melp_ray.data.shards import load_manifest
from melp_ray.data.sources import detect_layout
from melp_ray.data.ptbxl import SUPERCLASSES
from melp_ray.data.records import minmax_normalise, minmax_normalise_, resample
from melp_ray.data.rows import (RowSlice, deal_rows, drop_folds, list_splits, read_row_range, resolve_root,
                                shard_rows, split_shard_files)
from melp_ray.text.report_ids import ReportEncoder, report_encoder

logger = logging.getLogger(__name__)

MODEL_COLUMNS = ("ecg", "input_ids", "attention_mask", "sentence_ids")
# Decoded ECG bytes one Ray Data read task produces (~2,200 rows at 500 Hz). Ray Data
# notices a finished task only in its next scheduling round, which waits up to 0.1 s for the
# other running tasks, and the next task then starts on that CPU ~0.1-0.25 s after the last
# one ended: the fewer tasks, the less of a pass is lost to these gaps (see bench/README.md,
# "ingest at 500 Hz").
READ_TASK_BYTES = 512 * 2**20
# A read task's output blocks: at most this many rows and bytes of signal (Ray Data's
# default block size) each, see ``rows_per_yield``.
MAX_ROWS_PER_YIELD = 512
BLOCK_BYTES = 128 * 2**20
# Rows normalised at once: normalising makes four passes over the signal, and ~15 MB of
# 500 Hz rows stay in the CPU cache between them where a 120 MB block does not (one
# process decoding 512-row batches: ~2,200 rows/s whole, ~2,350 in runs of 64).
NORMALISE_ROWS = 64


@dataclass(frozen=True)
class StreamSpec:
    """What every pipeline needs to turn source rows into model batches."""

    sample_rate: int
    seconds: float
    text_model: str
    max_text_length: int
    with_labels: bool = True
    # Prepared shards stored at another rate (same duration): resampled to ``sample_rate``
    # as they are read, so shards of any ``prepare --sample-rate`` serve any config.
    shard_rate: int | None = None
    # Built here, on the driver, and shipped with the spec: the data workers tokenise with
    # it and so never import transformers or torch.
    encode_reports: ReportEncoder = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "encode_reports", report_encoder(self.text_model, self.max_text_length))

    @property
    def n_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))


# ---------------------------------------------------------------- row transforms


def superclass_multihot(labels: Sequence[Sequence[str]]) -> np.ndarray:
    out = np.zeros((len(labels), len(SUPERCLASSES)), dtype=np.float32)
    for row, names in enumerate(labels):
        for name in names if names is not None else ():
            if name in SUPERCLASSES:
                out[row, SUPERCLASSES.index(name)] = 1.0
    return out


def finish_batch(ecg: np.ndarray, reports: Sequence[str], labels_super, spec: StreamSpec) -> dict:
    """Normalised signals + tokenised reports (+ multi-hot labels): the worker-side batch."""
    return _finish(minmax_normalise(ecg), reports, labels_super, spec)


def _finish(normalised: np.ndarray, reports: Sequence[str], labels_super, spec: StreamSpec) -> dict:
    batch = {"ecg": normalised, **spec.encode_reports([str(r) for r in reports])}
    if spec.with_labels:
        batch["labels_super"] = superclass_multihot(labels_super)
    return batch


def decode_shard_batch(batch: pa.Table | dict[str, Any], spec: StreamSpec,
                       exclude_folds: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """A batch of shard rows (an Arrow table as Ray Data hands it, or a dict of columns)
    -> the worker-side batch of ``finish_batch``, bit for bit.

    Arrow in: the ECG bytes are read where Arrow holds them and decoded straight into one
    float32 array that is then normalised in place (no Python ``bytes`` per record, no
    per-record arrays, no stack): see bench/README.md "ingest at 500 Hz".
    """
    from melp_ray.data.shards import decode_ecg_column

    table = batch if isinstance(batch, pa.Table) else pa.table(
        {k: pa.array(list(v)) for k, v in batch.items()})
    table = drop_held_out(table, exclude_folds)   # before anything is decoded
    ecg = decode_ecg_column(table["ecg"])
    if table.num_rows == 0:
        ecg = np.zeros((0, 12, spec.n_samples), np.float32)
    if spec.shard_rate and spec.shard_rate != spec.sample_rate \
            and ecg.shape[-1] == int(round(spec.shard_rate * spec.seconds)):
        ecg = resample(ecg, spec.shard_rate, spec.sample_rate)   # a fresh float32 array
    if ecg.shape[-1] != spec.n_samples:
        raise ValueError(f"shards hold {ecg.shape[-1]} samples per lead, the config asks for "
                         f"{spec.n_samples}; re-run prepare with the same rate/duration")
    labels = table["labels_super"].to_pylist() if spec.with_labels else None
    for at in range(0, len(ecg), NORMALISE_ROWS):   # a cache-sized run of rows at a time
        minmax_normalise_(ecg[at:at + NORMALISE_ROWS])
    return _finish(ecg, table["report"].to_pylist(), labels, spec)


def drop_held_out(table: pa.Table, exclude_folds: Sequence[int]) -> pa.Table:
    """The shard rows whose ``strat_fold`` is not in ``exclude_folds``."""
    if not exclude_folds:
        return table
    held_out = pc.is_in(table["strat_fold"], value_set=pa.array(list(exclude_folds), pa.int32()))
    return table.filter(pc.invert(held_out))


def read_wfdb_batch(batch: dict[str, Any], spec: StreamSpec, root: str) -> dict[str, np.ndarray]:
    """Read each record with wfdb; rejected records are logged by name and left out."""
    from melp_ray.data.records import RecordRef, load_signal
    from melp_ray.data.rejections import RecordRejected

    signals, reports, labels = [], [], []
    for row in _rows(batch):
        ref = RecordRef.from_row(row)
        try:
            signals.append(load_signal(ref, root, spec.sample_rate, spec.seconds))
        except RecordRejected as err:
            logger.warning("rejected record %s (%s): %s", ref.record_id, err.reason, err.detail)
            continue
        reports.append(ref.report)
        labels.append(ref.labels.get("super", []))
    if not signals:
        shape = (0, 12, spec.n_samples)
        return finish_batch(np.zeros(shape, np.float32), [], [], spec)
    return finish_batch(np.stack(signals), reports, labels, spec)


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------- dataset builders

def wfdb_dataset(refs: Sequence[Any], root: str, spec: StreamSpec):
    """Raw WFDB records (``RecordRef``s) -> model-ready rows, reading on Ray Data workers."""
    import ray.data

    rows = [ref.to_row() for ref in refs]
    # Small blocks so reading spreads over the cluster's CPUs.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 16, 256)))
    return in_order(ds.map_batches(read_wfdb_batch, fn_kwargs={"spec": spec, "root": root},
                                   batch_format="numpy", batch_size=32))


def in_order(ds):
    """Rows come out in source order whoever iterates (exact resume depends on it)."""
    ds.context.execution_options.preserve_order = True
    return ds


def rank_datasets(root: str | None, split: str, world_size: int, spec: StreamSpec, *,
                  counts: dict[str, int] | None = None, **kwargs) -> list:
    """One dataset per rank for one ``split`` ("train" | "val"): see ``split_datasets``."""
    by_split = split_datasets(root, world_size, spec, splits=(split,),
                              counts=None if counts is None else {split: counts}, **kwargs)
    return by_split[split]


def split_datasets(root: str | None, world_size: int, spec: StreamSpec, *,
                   splits: Sequence[str] = ("train", "val"), dataset: str = "auto",
                   val_fraction: float = 0.1, seed: int = 0, limit: int | None = None,
                   exclude_folds: Sequence[int] = (),
                   counts: dict[str, dict[str, int]] | None = None) -> dict[str, list]:
    """{split: one dataset per rank}, from shards or a raw root (listed once for all splits).

    Records whose PTB-XL ``strat_fold`` is in ``exclude_folds`` never enter a split (a fold
    held out for evaluation). ``counts``, when given, receives per split ``records`` (what
    the split will stream, before signal-level rejections) and ``held_out`` (left out for
    their fold).
    """
    from melp_ray.data.sources import detect_layout

    root = resolve_root(root)
    layout = detect_layout(root) if dataset == "auto" else dataset
    listed = None if layout == "shards" else list_splits(layout, root, val_fraction, seed, limit,
                                                         spec.sample_rate)
    out = {}
    for split in splits:
        split_counts = {} if counts is None else counts.setdefault(split, {})
        if listed is None:
            out[split] = _shard_rank_datasets(root, split, world_size, spec, limit, exclude_folds,
                                              split_counts)
            continue
        refs, held_out = drop_folds(listed[split], exclude_folds)
        split_counts.update(records=len(refs), held_out=len(held_out))
        if len(refs) < world_size:
            raise ValueError(f"{root}: only {len(refs)} {split} record(s) for {world_size} workers"
                             + (f" ({len(held_out)} of folds {sorted(set(exclude_folds))} held out)"
                                if held_out else ""))
        out[split] = [wfdb_dataset(refs[r::world_size], root, spec) for r in range(world_size)]
    return out


def _shard_rank_datasets(root: str, split: str, world_size: int, spec: StreamSpec,
                         limit: int | None, exclude_folds: Sequence[int],
                         counts: dict[str, int]) -> list:
    files = split_shard_files(root, split, world_size, limit)
    rows = shard_rows(files, exclude_folds)
    counts.update(records=sum(len(r.kept) for r in rows),
                  held_out=sum(r.rows - len(r.kept) for r in rows))
    return [slices_dataset(deal_rows(rows, world_size, r), spec, exclude_folds)
            for r in range(world_size)]


def slices_dataset(slices: Sequence[RowSlice], spec: StreamSpec, exclude_folds: Sequence[int] = ()):
    """Row slices of shard files (local paths or URIs) -> model-ready rows, in slice order.
    A rank with no rows gets an empty dataset of the same pipeline."""
    import ray.data

    items = [{"path": s.path, "start": s.start, "stop": s.stop} for s in slices]
    if not items:   # an empty slice: the same pipeline, no rows
        items = [{"path": "", "start": 0, "stop": 0}]
    # One read task per run of consecutive slices holding ~READ_TASK_BYTES of signal.
    ds = ray.data.from_items(items, override_num_blocks=read_tasks(slices, spec))
    rows = rows_per_yield(spec)
    kwargs = {"spec": spec, "exclude_folds": tuple(int(f) for f in exclude_folds), "rows": rows}
    ds = ds.map_batches(read_slices, fn_kwargs=kwargs, batch_format="numpy", batch_size=1)
    # Each decoded batch leaves the task as one block of its own: Ray Data closes a block
    # once its bytes pass the target (a bigger target joins batches with a copy, then cuts
    # the joined block at a row count that splits micro-batches).
    ds.context.target_max_block_size = rows * signal_bytes(spec)
    return in_order(ds)


def read_tasks(slices: Sequence[RowSlice], spec: StreamSpec) -> int:
    """How many Ray Data tasks read ``slices``: one per ~READ_TASK_BYTES of decoded rows,
    at least one, at most one per slice."""
    rows = sum(s.stop - s.start for s in slices)
    rows_per_task = max(1, READ_TASK_BYTES // signal_bytes(spec))
    return max(1, min(len(slices), -(-rows // rows_per_task)))


def rows_per_yield(spec: StreamSpec) -> int:
    """Rows a read task decodes and hands on as one block: the largest power of two (at
    most MAX_ROWS_PER_YIELD) whose signals fit in BLOCK_BYTES.

    Why a power of two: a pass's micro-batches of 64 (or 32, 128, ...) are then whole
    slices of the blocks, and Ray's batcher hands them on without copying rows of two
    blocks into one batch.
    """
    fit = max(1, BLOCK_BYTES // signal_bytes(spec))
    return min(MAX_ROWS_PER_YIELD, 1 << (fit.bit_length() - 1))


def signal_bytes(spec: StreamSpec) -> int:
    """Bytes of one decoded row's float32 signal."""
    return len(LEADS) * spec.n_samples * 4


def read_slices(batch: dict[str, np.ndarray], spec: StreamSpec,
                exclude_folds: Sequence[int] = (), rows: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Read each slice (only the row groups that hold it) and decode the rows ``rows`` at a
    time, across slice ends: every batch but the task's last holds exactly ``rows`` rows."""
    columns = ["ecg", "report", "strat_fold"] + (["labels_super"] if spec.with_labels else [])
    pending = None   # rows read but not yet decoded: fewer than ``rows``
    for path, start, stop in zip(batch["path"], batch["start"], batch["stop"]):
        if start >= stop:
            continue
        table = drop_held_out(read_row_range(str(path), int(start), int(stop), columns),
                              exclude_folds)
        pending = table if pending is None else pa.concat_tables([pending, table])
        whole = pending.num_rows - pending.num_rows % rows
        for at in range(0, whole, rows):
            yield decode_shard_batch(pending.slice(at, rows), spec)
        pending = pending.slice(whole)
    if pending is not None and pending.num_rows:
        yield decode_shard_batch(pending, spec)


def stream_spec(cfg: PretrainConfig) -> StreamSpec:
    """What the data pipelines must produce for this model (from shards of another rate:
    resampled on reading)."""
    return StreamSpec(sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                      text_model=cfg.model.text_model, max_text_length=cfg.model.max_text_length,
                      shard_rate=shard_rate(cfg.data))


def shard_rate(data_cfg) -> int | None:
    """The rate prepared shards are stored at (their manifest), None for a raw root."""
    root = resolve_root(data_cfg.root)
    if data_cfg.dataset not in ("auto", "shards") or detect_layout(root) != "shards":
        return None
    rate = load_manifest(root).get("sample_rate")
    return None if rate is None else int(rate)
