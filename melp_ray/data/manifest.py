"""The generic manifest layout: a folder of signal files + ``ecg_manifest.csv`` (or .parquet).

One row per record (docs/data.md, "Your own data"):

    path        signal file, relative to the root (required)
    report      free-text report (required)
    subject_id  patient id: splits are by subject (required)
    record_id   unique id (optional; default: the row's path)
    fs          sampling rate in Hz, when the file does not say it (.npy, HDF5)
    leads       lead names separated by ";" or ",", when the file does not say them
    dataset     a source tag for mixed roots (default "manifest")
    labels_<task>  ";"-separated class names, read by evaluation

The signal format follows the extension of ``path``:

- WFDB: ``x``, ``x.hea`` or ``x.dat`` -> ``wfdb.rdrecord`` (rate, leads, units from the header);
- NumPy: ``x.npy``, leads x samples or samples x leads: the axis whose length equals the
  number of ``leads`` is the lead axis (both equal, or neither -> wrong_shape);
- HDF5: ``x.h5#dataset`` or ``x.h5#dataset/INDEX`` (row INDEX of a stacked dataset); the
  dataset's ``fs``/``leads`` attributes are used when the row leaves them empty;
- EDF: ``x.edf`` through wfdb's EDF reader (rate, leads and units from the file).

Arrays are taken to be in millivolts. ``leads`` defaults to the canonical 12 in ``LEADS``
order; a missing ``fs`` rejects the record (bad_sample_rate): a rate is never guessed.
Every record then goes through ``records.fit_signal`` like the other sources: resampled to
the target rate, the first ``seconds`` kept, shorter records rejected (wrong_length).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path


from melp_ray.data.records import LABEL_TASKS, RecordRef, empty_labels, read_metadata_csv, require_columns
from melp_ray.data.rejections import MISSING_FILE, RecordRejected
from melp_ray.data.signal_files import parse_fs

DATASET = "manifest"
MANIFEST_CSV = "ecg_manifest.csv"
MANIFEST_PARQUET = "ecg_manifest.parquet"
REQUIRED_COLUMNS = ("path", "report", "subject_id")
_HDF5_SUFFIXES = (".h5", ".hdf5")
_WFDB_SUFFIXES = (".hea", ".dat")


class ManifestFormatError(ValueError):
    """An ecg_manifest.csv/.parquet that is missing, unreadable or lacks required columns."""


def manifest_file(root: str | os.PathLike) -> Path | None:
    for name in (MANIFEST_CSV, MANIFEST_PARQUET):
        path = Path(root) / name
        if path.is_file():
            return path
    return None


def read_manifest_table(root: str | os.PathLike):
    """The manifest as a DataFrame of strings (empty cells are "")."""
    import pandas as pd

    path = manifest_file(root)
    if path is None:
        raise ManifestFormatError(f"{root} has neither {MANIFEST_CSV} nor {MANIFEST_PARQUET}")
    if path.suffix == ".csv":
        return read_metadata_csv(root, path.name, REQUIRED_COLUMNS, ManifestFormatError,
                                 DATASET, dtype=str, keep_default_na=False)
    try:
        table = pd.read_parquet(path)
    except Exception as err:
        raise ManifestFormatError(f"cannot parse {path}: {err}") from None
    table = table.astype(object).where(table.notna(), "").astype(str)
    return require_columns(table, REQUIRED_COLUMNS, path, ManifestFormatError)


def label_tasks(table) -> list[str]:
    """The tasks named by the table's ``labels_<task>`` columns, in column order."""
    return [c[len("labels_"):] for c in table.columns if c.startswith("labels_") and len(c) > 7]


def parse_labels(cell) -> list[str]:
    """"AF; RBBB" -> ["AF", "RBBB"] (empty names dropped)."""
    return [name.strip() for name in str(cell or "").split(";") if name.strip()]


def read_labels(root: str | os.PathLike, task: str) -> dict[str, list[str]]:
    """{record_id: class names} of one ``labels_<task>`` column (evaluation's labels)."""
    table = read_manifest_table(root)
    column = f"labels_{task}"
    if column not in table.columns:
        raise ManifestFormatError(f"{manifest_file(root)} has no column {column} "
                                  f"(label columns: {label_tasks(table)})")
    return {_record_id(row): parse_labels(row[column]) for row in table.to_dict("records")}


def _record_id(row: dict) -> str:
    return str(row.get("record_id", "")).strip() or str(row["path"]).strip()


def _ref_path(path: str) -> str:
    """A WFDB record is named without extension (as wfdb wants it); other files keep theirs."""
    stem, suffix = os.path.splitext(path)
    return stem if suffix.lower() in _WFDB_SUFFIXES else path


def list_manifest(root: str | os.PathLike, limit: int | None = None) -> list[RecordRef]:
    """Every row of the manifest as a RecordRef, in file order (``limit``: the first N rows).

    Reports and signals are checked later (scan_records / load_signal), duplicate ids by
    ``sources.scan_records``, so every row ends up kept or rejected under a reason."""
    table = read_manifest_table(root)
    if limit is not None:
        table = table.head(limit)
    tasks = [t for t in label_tasks(table) if t in LABEL_TASKS]
    refs = []
    for row in table.to_dict("records"):
        labels = empty_labels()
        labels.update({task: parse_labels(row[f"labels_{task}"]) for task in tasks})
        refs.append(RecordRef(
            record_id=_record_id(row), subject_id=str(row["subject_id"]).strip(),
            dataset=str(row.get("dataset", "")).strip() or DATASET,
            path=_ref_path(str(row["path"]).strip()), report=row["report"], labels=labels,
            fs=parse_fs(row.get("fs")), leads=str(row.get("leads", "")).strip()))
    return refs


# ---------------------------------------------------------------- evaluation
EVAL_PATH_SEP = "::"


def eval_path(root: str | os.PathLike, record_id: str) -> str:
    """"ROOT::RECORD_ID": how evaluation names a manifest record (its row holds fs/leads)."""
    return f"{os.path.abspath(root)}{EVAL_PATH_SEP}{record_id}"


@functools.lru_cache(maxsize=4)
def _refs_by_id(root: str) -> dict[str, RecordRef]:
    """The first row of each id (later ones are duplicates), read once per process."""
    refs: dict[str, RecordRef] = {}
    for ref in list_manifest(root):
        refs.setdefault(ref.record_id, ref)
    return refs


def ref_for_eval_path(path: str) -> tuple[RecordRef, str]:
    """(the row's RecordRef, the root) of an ``eval_path``."""
    root, _, record_id = path.partition(EVAL_PATH_SEP)
    ref = _refs_by_id(root).get(record_id)
    if ref is None:
        raise RecordRejected(MISSING_FILE, f"no row with record_id {record_id!r} in {root}")
    return ref, root
