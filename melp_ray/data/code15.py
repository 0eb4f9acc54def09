"""CODE-15% and CODE-test (Ribeiro et al.): 12-lead ECGs at 400 Hz in HDF5 files.

Two layouts under one root, told apart by their files:

* CODE-15% (``exams.csv`` + ``exams_part{N}.hdf5``): each HDF5 holds ``tracings``
  (n, 4096, 12) float32 and ``exam_id`` (n,); ``exams.csv`` names each exam's
  ``trace_file`` and its six labels as booleans. Parts not downloaded are allowed: their
  exams are left out and named (``missing_file``).
* CODE-test (``ecg_tracings.hdf5`` + ``annotations/gold_standard.csv``): the 827-record
  test set, ``tracings`` (827, 4096, 12), labels row by row in the CSV; record ids are the
  row numbers (``0000``..``0826``), the HDF5 carries no ids.

A record's path is ``FILE.hdf5::ROW``. Each tracing is up to 10 s at 400 Hz centred in
4096 samples with zeros on both sides (a 7 s exam has more zeros); ``read_tracing`` strips
that padding so the caller keeps the real signal and pads at the model's rate. Values are
used as stored: min-max normalisation follows, so the unit only matters to the flat-line
check. Leads are ordered DI, DII, DIII, AVR, AVL, AVF, V1-V6 (the dataset's
documentation) and are mapped onto ours by name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_RATE = 400
CODE_LEADS = ("DI", "DII", "DIII", "AVR", "AVL", "AVF",
              "V1", "V2", "V3", "V4", "V5", "V6")
_LIMB_LEADS = {"DI": "I", "DII": "II", "DIII": "III"}   # Einthoven's D-names -> ours
# Spelled as the CSVs spell them (exams.csv, gold_standard.csv).
CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")
EXAMS_CSV = "exams.csv"
TEST_HDF5 = "ecg_tracings.hdf5"
TEST_LABELS_CSV = os.path.join("annotations", "gold_standard.csv")
_PATH_SEP = "::"


class Code15FormatError(ValueError):
    """A CODE root, CSV or HDF5 file that does not have the documented layout."""


@dataclass
class CodeRecord:
    record_id: str
    path: str                     # FILE.hdf5::ROW
    labels: np.ndarray            # multi-hot over CLASSES


@dataclass
class CodeListing:
    layout: str                   # "code-15" | "code-test"
    records: list[CodeRecord]
    excluded: dict[str, list[str]] = field(default_factory=dict)   # reason -> record ids


def detect_layout(root: str | os.PathLike) -> str | None:
    """"code-15" (exams.csv), "code-test" (ecg_tracings.hdf5) or None."""
    path = Path(root)
    if (path / EXAMS_CSV).is_file():
        return "code-15"
    if (path / TEST_HDF5).is_file():
        return "code-test"
    return None


def list_code_records(root: str | os.PathLike) -> CodeListing:
    """Every exam of the root with its labels over ``CLASSES`` (see the module doc)."""
    layout = detect_layout(root)
    if layout == "code-15":
        return _list_code15(Path(root))
    if layout == "code-test":
        return _list_code_test(Path(root))
    raise Code15FormatError(f"{root} has neither {EXAMS_CSV} (CODE-15%) nor {TEST_HDF5} "
                            "(CODE-test)")


def _read_csv(path: Path, required):
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise Code15FormatError(f"{path}: {err}") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise Code15FormatError(f"{path} lacks columns {missing}")
    return table


def _label_matrix(table, path: Path) -> np.ndarray:
    """Booleans ("True"/"False", true/false) or 0/1 per class column -> float32 multi-hot."""
    columns = []
    for name in CLASSES:
        values = table[name].astype(str).str.strip().str.lower()
        known = values.isin(("true", "false", "1", "0", "1.0", "0.0"))
        if not known.all():
            raise Code15FormatError(f"{path}: column {name} has values other than "
                                    f"true/false/0/1, e.g. {table[name][~known].iloc[0]!r}")
        columns.append(values.isin(("true", "1", "1.0")).to_numpy())
    return np.stack(columns, axis=1).astype(np.float32)


def _list_code15(root: Path) -> CodeListing:
    import h5py

    csv = root / EXAMS_CSV
    table = _read_csv(csv, ("exam_id", "trace_file", *CLASSES))
    labels = _label_matrix(table, csv)
    records: list[CodeRecord] = []
    excluded: dict[str, list[str]] = {}
    for trace_file, rows in table.groupby("trace_file", sort=True).indices.items():
        hdf5 = root / str(trace_file)
        ids = [str(int(table["exam_id"].iloc[i])) for i in rows]
        if not hdf5.is_file():  # a part not downloaded
            excluded.setdefault("missing_file", []).extend(ids)
            continue
        with h5py.File(hdf5, "r") as f:
            _check_datasets(f, hdf5, ("tracings", "exam_id"))
            row_of = {int(e): r for r, e in enumerate(np.asarray(f["exam_id"]))}
        for i, exam_id in zip(rows, ids):
            row = row_of.get(int(exam_id))
            if row is None:
                excluded.setdefault("not_in_hdf5", []).append(exam_id)
                continue
            records.append(CodeRecord(exam_id, f"{hdf5.resolve()}{_PATH_SEP}{row}", labels[i]))
    return CodeListing("code-15", records, excluded)


def _list_code_test(root: Path) -> CodeListing:
    import h5py

    hdf5 = root / TEST_HDF5
    csv = root / TEST_LABELS_CSV
    if not csv.is_file():
        raise Code15FormatError(f"{root} has {TEST_HDF5} but no {TEST_LABELS_CSV}")
    labels = _label_matrix(_read_csv(csv, CLASSES), csv)
    with h5py.File(hdf5, "r") as f:
        _check_datasets(f, hdf5, ("tracings",))
        n = f["tracings"].shape[0]
    if n != len(labels):
        raise Code15FormatError(f"{hdf5} has {n} tracings, {csv} {len(labels)} label rows")
    path = hdf5.resolve()
    return CodeListing("code-test", [CodeRecord(f"{i:04d}", f"{path}{_PATH_SEP}{i}", labels[i])
                                     for i in range(n)])


def _check_datasets(f, path: Path, names) -> None:
    missing = [n for n in names if n not in f]
    if missing:
        raise Code15FormatError(f"{path} lacks datasets {missing}")
    shape = f["tracings"].shape
    if len(shape) != 3 or shape[2] != len(CODE_LEADS):
        raise Code15FormatError(f"{path}: tracings has shape {shape}, expected (n, T, 12)")


def split_path(path: str) -> tuple[str, int]:
    """"FILE.hdf5::ROW" -> (FILE.hdf5, ROW)."""
    file, _, row = path.rpartition(_PATH_SEP)
    if not file or not row.isdigit():
        raise ValueError(f"not a CODE record path (FILE.hdf5{_PATH_SEP}ROW): {path!r}")
    return file, int(row)


def read_tracing(path: str) -> np.ndarray:
    """One exam as float64 (12, T) in our lead order at 400 Hz, the zero padding stripped.

    The padding is the run of all-zero samples (every lead) at each end; an all-zero
    tracing comes back with T = 0. Raises OSError/KeyError/ValueError for a file or row
    that cannot be read."""
    import h5py

    from melp_ray.data.leads import lead_indices

    file, row = split_path(path)
    with h5py.File(file, "r") as f:
        tracings = f["tracings"]
        if not 0 <= row < tracings.shape[0]:
            raise ValueError(f"row {row} outside {file} ({tracings.shape[0]} tracings)")
        signal = np.asarray(tracings[row], dtype=np.float64)   # (T, 12)
    signal = signal[:, lead_indices([_LIMB_LEADS.get(n, n) for n in CODE_LEADS])]
    # NaN counts as signal here, so a NaN record is rejected as such, not as padding.
    nonzero = np.flatnonzero(np.any(signal != 0, axis=1))
    if nonzero.size == 0:
        return np.zeros((len(CODE_LEADS), 0))
    return signal[nonzero[0]:nonzero[-1] + 1].T
