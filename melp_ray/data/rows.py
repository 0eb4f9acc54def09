"""Which rows each training rank reads, and in which split: a data root resolved, a raw root
listed into train/val, prepared shards dealt out as row ranges.

Why one fixed slice per rank instead of ``streaming_split``: Ray's streaming split hands
blocks to whichever worker asks first, so which sample lands on which rank changes from run
to run. Training must be exactly resumable and give the same global batch for any worker
count, so each rank gets a fixed, deterministic slice: every ``world``-th record of a raw
root (free: only metadata is sliced), or one contiguous run of the rows of prepared shards
(``deal_rows``: row ranges of files, read by row group, so any number of shard files serves
any number of ranks). The Ray Data pipelines that read these slices: ``melp_ray.train.stream``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

from melp_ray.utils import storage

logger = logging.getLogger(__name__)


def resolve_root(root: str | None) -> str:
    from melp_ray.data.sources import bundled_root

    return str(bundled_root()) if root is None else str(root)


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


def epoch_order(files: Sequence[ShardRows], epoch: int, seed: int) -> list[tuple[str, int]]:
    """An elastic run's epoch: every kept row as (file, row), files in the order seeded by
    (seed, epoch) as ``deal_rows`` puts them; the same for any number of workers."""
    order = list(files)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [(f.path, row) for f in order for row in f.kept]


def elastic_positions(total: int, global_batch: int, world: int, rank: int,
                      start_step: int = 0) -> list[range]:
    """Which positions of an epoch of ``total`` records ``rank`` of ``world`` reads in an
    elastic run, from step ``start_step`` of the epoch on: step s trains on positions
    [s x global_batch, (s + 1) x global_batch), the same records whatever the world size,
    of which each rank reads one contiguous run of global_batch / world. So the data
    position is one number, the epoch's steps done, and a run resized between two steps
    reads every remaining record of the epoch once. The last total mod global_batch
    records of an epoch (less than a step) are not trained on, at any world size."""
    if global_batch % world:
        raise ValueError(f"a global batch of {global_batch} cannot be split over {world} workers")
    per_rank = global_batch // world
    return [range(s * global_batch + rank * per_rank, s * global_batch + (rank + 1) * per_rank)
            for s in range(start_step, total // global_batch)]


def elastic_slices(order: Sequence[tuple[str, int]], positions: Sequence[range]) -> list[RowSlice]:
    """The row slices holding ``positions`` of an ``epoch_order``, in order: runs of
    consecutive rows of one file become one slice (rows of held-out folds between them
    are dropped on reading, as in ``deal_rows``)."""
    slices: list[RowSlice] = []
    for span in positions:
        run_start = None
        for i in span:
            path, row = order[i]
            if run_start is not None and path == order[i - 1][0]:
                continue
            if run_start is not None:
                slices.append(RowSlice(order[run_start][0], order[run_start][1], order[i - 1][1] + 1))
            run_start = i
        if run_start is not None:
            slices.append(RowSlice(order[run_start][0], order[run_start][1], order[span[-1]][1] + 1))
    return slices


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
