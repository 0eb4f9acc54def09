"""Ray Data pipelines that feed training and evaluation workers.

Two sources, one output format (see docs/architecture.md, "Batches a training worker receives"):

- prepared Parquet shards (``python -m melp_ray.prepare``): read -> decode -> normalise -> tokenise
- a raw WFDB root (PTB-XL or MIMIC-IV-ECG layout): read with wfdb -> validate -> normalise -> tokenise

Why one dataset per training rank instead of ``streaming_split``: Ray's streaming split hands
blocks to whichever worker asks first, so which sample lands on which rank changes from run
to run. Training must be exactly resumable and give the same global batch for any worker
count, so each rank gets a fixed, deterministic slice: every ``world``-th record of a raw
root (free: only metadata is sliced), or one contiguous run of the rows of prepared shards
(``deal_rows``: row ranges of files, read by row group, so any number of shard files serves
any number of ranks). Reports are tokenised here, on the data workers.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from melp_ray.utils import storage
from melp_ray.data.ptbxl import SUPERCLASSES
from melp_ray.data.records import resample
from melp_ray.text.report_ids import encode_reports, load_report_tokenizer

logger = logging.getLogger(__name__)

MODEL_COLUMNS = ("ecg", "input_ids", "attention_mask", "sentence_ids")


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

    @property
    def n_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))


# ---------------------------------------------------------------- row transforms

def minmax_normalise(ecg: np.ndarray) -> np.ndarray:
    """Per-record min-max scaling to [0, 1] over all leads (the reference MELP scaling)."""
    lo = ecg.min(axis=(-2, -1), keepdims=True)
    hi = ecg.max(axis=(-2, -1), keepdims=True)
    return ((ecg - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)


def minmax_normalise_(ecg: np.ndarray) -> np.ndarray:
    """``minmax_normalise`` in place on a float32 array the caller owns: the same values
    (the same float32 operations), without two fresh batch-sized arrays per batch."""
    lo = ecg.min(axis=(-2, -1), keepdims=True)
    hi = ecg.max(axis=(-2, -1), keepdims=True)
    np.subtract(ecg, lo, out=ecg)
    np.divide(ecg, np.maximum(hi - lo, 1e-6), out=ecg)
    return ecg


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
    tokenizer = load_report_tokenizer(spec.text_model)
    batch = {"ecg": normalised,
             **encode_reports(tokenizer, [str(r) for r in reports], spec.max_text_length)}
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
    if exclude_folds:   # held-out folds: dropped before anything is decoded
        table = table.filter(pc.invert(pc.is_in(table["strat_fold"],
                                                value_set=pa.array(list(exclude_folds), pa.int32()))))
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
    return _finish(minmax_normalise_(ecg), table["report"].to_pylist(), labels, spec)


def read_wfdb_batch(batch: dict[str, Any], spec: StreamSpec, root: str) -> dict[str, np.ndarray]:
    """Read each record with wfdb; rejected records are logged by name and left out."""
    from melp_ray.data.records import RecordRef, RecordRejected, load_signal

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

def shards_dataset(files: Sequence[str], spec: StreamSpec, filesystem=None,
                   exclude_folds: Sequence[int] = ()):
    """Parquet shard files (local paths or URIs) -> model-ready rows (rows of ``exclude_folds`` left out)."""
    columns = ["ecg", "report"] + (["labels_super"] if spec.with_labels else [])
    if exclude_folds:
        columns.append("strat_fold")
    if filesystem is None:   # shards behind a URI: one pyarrow filesystem, paths on it
        filesystem, files = storage.filesystem_and_paths(list(files))
    # One block per file: left to itself Ray Data splits each read into ~200 blocks of a
    # few rows (its default parallelism), and the per-block cost then dominated 500 Hz
    # ingest (2.7x fewer rows/s measured, bench/README.md "ingest at 500 Hz").
    ds = read_parquet_v1(list(files), columns=columns, filesystem=filesystem, shuffle=None,
                         override_num_blocks=len(files))
    kwargs = {"spec": spec, "exclude_folds": tuple(int(f) for f in exclude_folds)}
    # batch_size=None: the transform takes each read block whole, so Ray Data fuses it
    # into the read task (no object-store round trip of the undecoded block); rows are
    # transformed one by one, so the grouping does not change a value.
    return in_order(ds.map_batches(decode_shard_batch, fn_kwargs=kwargs,
                                   batch_format="pyarrow", batch_size=None))


def read_parquet_v1(files: list[str], **kwargs):
    """``ray.data.read_parquet`` through Ray Data's V1 Parquet datasource.

    Why not the default V2 one (Ray 2.60): it lists files by starting a pool of
    ``FooterReader`` actors, i.e. new worker processes, on *every* execution of the
    dataset, so every epoch of every rank paid 2-3.6 s before its first batch (measured on
    the 1.3k-row PTB-XL shards; 0.3 s with V1, see bench/README.md "ingest"). Our shards
    are a known, explicit file list, so there is nothing for footer-based listing to find.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, **kwargs)
    finally:
        context.use_datasource_v2 = previous


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


def resolve_root(root: str | None) -> str:
    from melp_ray.data.sources import bundled_root

    return str(bundled_root()) if root is None else str(root)


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


def split_shard_files(root: str, split: str, world_size: int, limit: int | None = None) -> list[str]:
    """The shard files of a split that training reads (``limit``: one per worker, at most
    as many as there are). Any number of files serves any number of workers (``deal_rows``)."""
    files = shard_files(root, split)
    if limit is not None:
        files = files[: max(world_size, 1)]
    return files


@dataclass(frozen=True)
class ShardRows:
    """One shard file: its row count and the positions of the rows training keeps (all of
    them unless folds are held out)."""

    path: str
    rows: int
    kept: tuple[int, ...]


@dataclass(frozen=True)
class RowSlice:
    """Rows [start, stop) of one shard file (held-out folds inside it are still dropped)."""

    path: str
    start: int
    stop: int


def shard_rows(files: Sequence[str], exclude_folds: Sequence[int] = ()) -> list[ShardRows]:
    """The kept rows of each file: from the Parquet footers, or, with folds held out, from
    the ``strat_fold`` column alone."""
    from melp_ray.data.shards import read_shard_table

    out = []
    for path in files:
        if exclude_folds:
            folds = read_shard_table(path, columns=["strat_fold"])["strat_fold"].to_numpy()
            kept = np.flatnonzero(~np.isin(folds, list(exclude_folds)))
            out.append(ShardRows(path, len(folds), tuple(int(i) for i in kept)))
        else:
            n = parquet_rows(path)
            out.append(ShardRows(path, n, tuple(range(n))))
    return out


def parquet_rows(path: str) -> int:
    fs, fs_path = storage.filesystem_and_path(path)
    with fs.open_input_file(fs_path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def deal_rows(files: Sequence[ShardRows], world_size: int, rank: int, epoch: int | None = None,
              seed: int = 0) -> list[RowSlice]:
    """The row slices ``rank`` reads: the kept rows of all files, end to end, cut into
    ``world_size`` contiguous runs whose lengths differ by at most one; ``rank`` reads run
    ``rank``. So every kept record is read exactly once per epoch whatever the numbers of
    files and workers (fewer files than workers: a file is shared by several ranks).

    With an ``epoch``, the files are first put in an order seeded by (seed, epoch): which
    rank reads which records changes from epoch to epoch, and the same (seed, epoch) always
    gives the same slices (exact resume).
    """
    order = list(files)
    if epoch is not None:
        random.Random(f"{seed}:{epoch}").shuffle(order)   # str seed: stable across processes
    total = sum(len(f.kept) for f in order)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    slices, offset = [], 0
    for f in order:
        a, b = max(lo - offset, 0), min(hi - offset, len(f.kept))
        if a < b:   # kept rows a..b-1 of this file: raw rows kept[a] .. kept[b-1]
            slices.append(RowSlice(f.path, f.kept[a], f.kept[b - 1] + 1))
        offset += len(f.kept)
    return slices


def slices_dataset(slices: Sequence[RowSlice], spec: StreamSpec, exclude_folds: Sequence[int] = ()):
    """Row slices of shard files (local paths or URIs) -> model-ready rows, in slice order.
    A rank with no rows gets an empty dataset of the same pipeline."""
    import ray.data

    items = [{"path": s.path, "start": s.start, "stop": s.stop} for s in slices]
    if not items:   # an empty slice: the same pipeline, no rows
        items = [{"path": "", "start": 0, "stop": 0}]
    ds = ray.data.from_items(items, override_num_blocks=len(items))   # a read task per slice
    kwargs = {"spec": spec, "exclude_folds": tuple(int(f) for f in exclude_folds)}
    return in_order(ds.map_batches(read_slices, fn_kwargs=kwargs, batch_format="numpy",
                                   batch_size=1))


def read_slices(batch: dict[str, np.ndarray], spec: StreamSpec,
                exclude_folds: Sequence[int] = ()) -> Iterator[dict[str, np.ndarray]]:
    """Read each slice (only the row groups that hold it), decoded 64 rows at a time."""
    columns = ["ecg", "report", "strat_fold"] + (["labels_super"] if spec.with_labels else [])
    for path, start, stop in zip(batch["path"], batch["start"], batch["stop"]):
        if start >= stop:
            continue
        table = read_row_range(str(path), int(start), int(stop), columns)
        for at in range(0, table.num_rows, 64):
            yield decode_shard_batch(table.slice(at, 64), spec, exclude_folds)


def read_row_range(path: str, start: int, stop: int, columns: list[str]):
    """Rows [start, stop) of one Parquet file, reading only the row groups that hold them."""
    fs, fs_path = storage.filesystem_and_path(path)
    with fs.open_input_file(fs_path) as f:
        parquet = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for i in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def drop_folds(refs: Sequence[Any], exclude_folds: Sequence[int]) -> tuple[list, list]:
    """(kept, held out): the RecordRefs outside / inside ``exclude_folds``."""
    folds = set(exclude_folds)
    kept = [r for r in refs if r.strat_fold not in folds]
    held = [r for r in refs if r.strat_fold in folds]
    return kept, held


def list_splits(layout: str, root: str, val_fraction: float, seed: int, limit: int | None,
                sample_rate: int = 500) -> dict[str, list]:
    """{"train": [...], "val": [...]}: a raw root's records split by subject, listed once;
    the records rejected from the metadata alone (they belong to no split) are logged by name."""
    from melp_ray.data.sources import scan_records, split_for_subject

    listing = scan_records(layout, root, limit=limit, sample_rate=sample_rate)
    for record_id, why in listing.details.items():
        logger.warning("rejected record %s: %s", record_id, why)
    splits: dict[str, list] = {"train": [], "val": []}
    for ref in listing.refs:
        splits[split_for_subject(ref.subject_id, val_fraction, seed)].append(ref)
    return splits


def split_refs(layout: str, root: str, split: str, val_fraction: float, seed: int,
               limit: int | None, sample_rate: int = 500) -> list:
    """The records of one split (``list_splits``)."""
    return list_splits(layout, root, val_fraction, seed, limit, sample_rate)[split]


def shard_files(root: str, split: str) -> list[str]:
    from melp_ray.data.shards import shard_paths

    return sorted(shard_paths(root, split))
