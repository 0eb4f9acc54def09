"""The records of each evaluation dataset, with their labels, pseudo-folds and class names.

``list_records`` lists a dataset's root (PTB-XL, CPSC2018, Chapman-Shaoxing, CODE-15%)
into ``EvalRecord``s over a class list; ``split_dir_records`` does the same from the
reference's split CSVs. ``build_plan`` (``melp_ray.eval_plan.plan``) splits and checks them into a
``Plan``. No signal is read here (only CODE's HDF5 row index).

CPSC2018, Chapman-Shaoxing and CODE ship no folds, so each record gets a fixed pseudo-fold
1-10 from a hash of its record id (``physionet_fold``): the same fold options then work on
every dataset and the split never changes between runs or machines.
"""
from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

N_PSEUDO_FOLDS = 10


class EvalError(ValueError):
    """Bad arguments or unusable data, found before any work starts."""


@dataclass
class EvalRecord:
    """One record to evaluate, before its signal is read."""

    record_id: str
    path: str                          # absolute; WFDB record (PTB-XL), .hea (PhysioNet),
                                       # FILE.hdf5::ROW (CODE-15%)
    fold: int
    report: str = ""
    labels: np.ndarray | None = None   # multi-hot over the class list


def physionet_fold(record_id: str) -> int:
    """Fixed pseudo-fold 1..10 of a PhysioNet or CODE record (crc32: stable across runs and
    hosts)."""
    return zlib.crc32(record_id.encode()) % N_PSEUDO_FOLDS + 1


def _multi_hot(names, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros(len(classes), dtype=np.float32)
    for name in names:
        if name in index:
            out[index[name]] = 1.0
    return out


@dataclass
class Listing:
    """A dataset root's records over ``classes``; ``aliases`` maps a class name to our label
    name where one matches (for default prompts); ``excluded`` names records left out while
    listing (reason -> ids), e.g. a CODE-15% part that is not downloaded."""

    records: list[EvalRecord]
    classes: list[str]
    aliases: dict[str, str]
    excluded: dict[str, list[str]] = field(default_factory=dict)


def list_records(dataset: str, root: str, task: str | None, sample_rate: int,
                 min_count: int, class_file: str | None = None) -> Listing:
    """Every record of ``root`` with labels over the dataset's (or the class file's) classes."""
    if dataset == "ptb-xl":
        return Listing(*_ptbxl_records(root, task, sample_rate, class_file))
    if dataset == "code-15":
        return _code15_records(root)
    if dataset == "manifest":
        return _manifest_records(root, task, class_file)
    return Listing(*_physionet_records(dataset, root, min_count, class_file))


def _code15_records(root: str) -> Listing:
    from melp_ray.data import code15

    try:
        listing = code15.list_code_records(root)
    except (code15.Code15FormatError, OSError) as err:
        raise EvalError(f"--root: {err}") from None
    records = [EvalRecord(record_id=r.record_id, path=r.path, fold=physionet_fold(r.record_id),
                          labels=r.labels) for r in listing.records]
    classes = list(code15.CLASSES)
    return Listing(records, classes, {c: c for c in classes}, listing.excluded)


def _manifest_records(root: str, task: str | None, class_file: str | None) -> Listing:
    """A manifest root's rows (first row of each id) with labels from ``labels_<task>``;
    the classes are the names found in that column, sorted, or a class file's list."""
    from melp_ray.data import manifest as M

    try:
        refs = M.list_manifest(root)
        labels = M.read_labels(root, task) if task else {}
    except M.ManifestFormatError as err:
        raise EvalError(f"--root: {err}") from None
    classes = sorted({name for names in labels.values() for name in names})
    if task and class_file:
        classes = _or_eval_error(_plain_class_names, class_file)
    seen, records, excluded = set(), [], {}
    for ref in refs:
        if ref.record_id in seen:
            excluded.setdefault("duplicate_record_id", []).append(ref.record_id)
            continue
        seen.add(ref.record_id)
        records.append(EvalRecord(record_id=ref.record_id, path=M.eval_path(root, ref.record_id),
                                  fold=physionet_fold(ref.record_id), report=ref.report,
                                  labels=_multi_hot(labels[ref.record_id], classes) if task else None))
    return Listing(records, classes, {c: c for c in classes}, excluded)


def _plain_class_names(path: str) -> list[str]:
    """A class file for a manifest root: one class name per line."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as err:
        raise ValueError(f"--class-names {path}: {err}") from None
    if not names:
        raise ValueError(f"--class-names {path} names no class")
    return names


def _ptbxl_records(root: str, task: str | None, sample_rate: int,
                   class_file: str | None = None
                   ) -> tuple[list[EvalRecord], list[str], dict[str, str]]:
    """Records with labels over the task's classes: ours, or a class-names file's (then
    with the map file name -> our label name)."""
    from melp_ray.data.ptbxl import class_names, list_ptbxl
    from melp_ray.eval import class_lists

    classes = class_names(task, root) if task else []
    aliases = {c: c for c in classes}
    if task and class_file:
        names = _class_file_names(class_file, "ptb-xl", task)
        aliases = _or_eval_error(class_lists.match_ptbxl_names, names, classes,
                                 f"--class-names {class_file}")
        classes = names
    name_of = {ours: name for name, ours in aliases.items()}
    records = [EvalRecord(record_id=ref.record_id, path=os.path.join(root, ref.path),
                          fold=ref.strat_fold, report=ref.report,
                          labels=_multi_hot([name_of[n] for n in ref.labels[task]
                                             if n in name_of], classes) if task else None)
               for ref in list_ptbxl(root, sample_rate=sample_rate)]
    return records, classes, aliases


def _physionet_records(dataset: str, root: str, min_count: int, class_file: str | None = None
                       ) -> tuple[list[EvalRecord], list[str], dict[str, str]]:
    from melp_ray.data import physionet, physionet_labels
    from melp_ray.eval import class_lists

    listed = physionet.list_physionet_records(root)
    source = f"--class-names {class_file}"
    if dataset == "cpsc2018":
        classes = list(physionet_labels.CPSC2018_CLASSES)
        aliases = {c: c for c in classes}
        if class_file:
            classes = _class_file_names(class_file, dataset, None)
            aliases = _or_eval_error(class_lists.match_cpsc2018_names, classes, source)
        label = functools.partial(
            physionet_labels.labels_from_codes, classes=classes,
            code_groups={c: physionet_labels.CPSC2018_CODES[aliases[c]] for c in classes})
    else:  # Chapman-Shaoxing: SNOMED codes as classes (see physionet_labels.py)
        if class_file:
            classes = _class_file_names(class_file, dataset, None)
            _or_eval_error(class_lists.check_snomed_names, classes, source)
        else:  # the codes frequent in this data
            classes = physionet_labels.frequent_dx_classes(listed, min_count=min_count)
        if not classes:
            raise EvalError(f"no SNOMED code occurs in >= {min_count} records under {root}; "
                            "lower --min-count")
        aliases = {c: c for c in classes}
        label = functools.partial(physionet_labels.labels_from_codes, classes=classes)
    records = [EvalRecord(record_id=rec.record_id, path=str(rec.header_path),
                          fold=physionet_fold(rec.record_id), labels=label(rec.dx_codes))
               for rec in listed]
    return records, classes, aliases


def _class_file_names(class_file: str, dataset: str, task: str | None) -> list[str]:
    from melp_ray.eval import class_lists

    key = class_lists.reference_task_key(dataset, task)
    return _or_eval_error(class_lists.read_class_names, class_file, key)


def _or_eval_error(function, *args):
    """``function(*args)``, its ValueError (bad input file) reported as an EvalError."""
    try:
        return function(*args)
    except ValueError as err:
        raise EvalError(f"--class-names: {err}" if "--class-names" not in str(err)
                        else str(err)) from None


def split_dir_records(dataset: str, root: str, task: str | None, sample_rate: int,
                       split_dir: str, split_names, class_file: str | None):
    """Records, labels and classes of each split from the reference's split CSVs.

    Every row is used with the file's labels; rows whose record is not under --root are
    left out and named under ``missing_file``. Returns (splits, classes, excluded, files).
    """
    from melp_ray.eval import class_lists
    from melp_ray.eval import splits as S

    key = class_lists.reference_task_key(dataset, task)
    files = {split: S.split_path(split_dir, key, split) for split in split_names}
    try:
        tables = {split: S.read_split_csv(path, dataset) for split, path in files.items()}
    except S.SplitFileError as err:
        raise EvalError(f"--split-dir: {err}") from None
    classes = tables[split_names[0]].classes
    for table in tables.values():
        if table.classes != classes:
            raise EvalError(f"--split-dir: {table.path} has label columns {table.classes}, "
                            f"{tables[split_names[0]].path} has {classes}")
    order = list(range(len(classes)))
    if class_file:
        names = _class_file_names(class_file, dataset, task)
        if set(names) != set(classes):
            raise EvalError(f"--class-names {class_file} lists {sorted(set(names) - set(classes))} "
                            f"not in the split files and misses {sorted(set(classes) - set(names))}")
        order = [classes.index(n) for n in names]
        classes = names
    headers = S.HeaderIndex(root)
    seen: dict[str, str] = {}
    splits: dict[str, list[EvalRecord]] = {}
    excluded: dict[str, list[str]] = {}
    for split, table in tables.items():
        kept = []
        for row in table.rows:
            record = _split_row_record(dataset, root, row, sample_rate, headers, order)
            where = f"{table.path} line {row.line}"
            if record.record_id in seen:
                raise EvalError(f"--split-dir: record {record.record_id} in {where} is also in "
                                f"{seen[record.record_id]}")
            seen[record.record_id] = where
            exists = record.path + ".hea" if dataset == "ptb-xl" else record.path
            if os.path.isfile(exists):
                kept.append(record)
            else:
                excluded.setdefault("missing_file", []).append(record.record_id)
        if not kept:
            raise EvalError(f"--split-dir: none of the {len(table.rows)} records of "
                            f"{table.path} is under --root {root}")
        splits[split] = kept
    return splits, classes, excluded, {s: str(p) for s, p in files.items()}


def _split_row_record(dataset: str, root: str, row, sample_rate: int, headers, order
                      ) -> EvalRecord:
    from melp_ray.eval import splits as S

    labels = row.labels[order]
    if dataset == "ptb-xl":
        record_id, path, fold = S.ptbxl_record(root, row.metadata, sample_rate)
        return EvalRecord(record_id=record_id, path=path, fold=fold, labels=labels)
    if dataset == "cpsc2018":
        record_id, path = S.cpsc2018_record(root, row.metadata, headers)
    else:
        record_id, path = S.chapman_record(root, row.metadata)
    return EvalRecord(record_id=record_id, path=path, fold=0, labels=labels)


def default_aliases(dataset: str, root: str, task: str | None, classes: list[str]
                     ) -> dict[str, str]:
    """Class name -> our label name where one matches (for default prompts); others none."""
    from melp_ray.data.physionet_labels import CPSC2018_CLASSES
    from melp_ray.data.ptbxl import class_names
    from melp_ray.eval.class_lists import ICBEB_TO_CPSC2018

    if dataset == "ptb-xl":
        ours = class_names(task, root)
        by_bare = {n.strip("_"): n for n in ours}
        return {c: c if c in ours else by_bare[c.strip("_")] for c in classes
                if c in ours or c.strip("_") in by_bare}
    if dataset == "cpsc2018":
        known = {**ICBEB_TO_CPSC2018, **{c: c for c in CPSC2018_CLASSES}}
        return {c: known[c] for c in classes if c in known}
    return {c: c for c in classes}


@dataclass
class Plan:
    """The checked, resolved form of the command line."""

    mode: str
    dataset: str
    root: str
    out: Path
    checkpoint: str
    checkpoint_kind: str               # "training checkpoint" | "exported folder"
    sample_rate: int
    seconds: float
    task: str | None
    class_names: list[str]
    splits: dict[str, list[EvalRecord]]     # the splits the mode uses
    folds: dict[str, list[int]]
    excluded: dict[str, list[str]]          # reason -> record ids left out before loading
    prompts: list[list[str]] | None = None
    crop_seconds: float | None = None       # first S s of each record, zero-padded to seconds
    shard_sample_rate: int | None = None    # --dataset shards: the rate the shards hold
    settings: dict[str, Any] = field(default_factory=dict)
