"""The reference's published split CSVs (``--split-dir DIR``): records and labels per split.

``DIR/<task>_{train,val,test}.csv`` as in the reference's ``src/melp/data_split/`` (e.g.
``data_split/ptbxl/super_class/ptbxl_super_class_test.csv``, ``data_split/icbeb/
icbeb_test.csv``). Each file has some metadata columns, then one 0/1 column per class; the
reference takes the classes positionally (``datasets/finetune_dataset.py``), as we do:

* PTB-XL: ``ecg_id, patient_id, strat_fold, filename_lr, filename_hr, <task column>``,
  then the labels (column 7 on). The record is ``filename_hr`` or ``filename_lr`` under
  --root, the one of the model's rate when both exist (as ``ptbxl.list_ptbxl``).
* CPSC2018 (icbeb): ``patient_id, ecg_id, filename, validation, age, sex, scp_codes``, then
  the labels (column 8 on). ``filename`` is a record name (``A0001``) under --root; it is
  looked up as ``ROOT/<filename>.hea``, else as the one header of that name anywhere under
  --root (the Challenge releases put records in sub-folders).
* Chapman-Shaoxing: ``ecg_path, age, diagnose``, then the labels (column 4 on).
  ``ecg_path`` is ``/chapman/WFDBRecords/.../JS00001.mat``; without the leading
  ``/chapman/`` it is relative to --root, and its ``.hea`` is read.

Every row is used, with the file's labels, whatever our own readers would label it; a row
whose record is missing under --root is counted and named (``missing_file``), never
dropped silently. Bad cells fail with the file, line and column.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitLayout:
    n_metadata: int                 # label columns start after these
    named: dict[int, str]           # position -> required column name


LAYOUTS: dict[str, SplitLayout] = {
    "ptb-xl": SplitLayout(6, {0: "ecg_id", 1: "patient_id", 2: "strat_fold",
                              3: "filename_lr", 4: "filename_hr"}),
    "cpsc2018": SplitLayout(7, {1: "ecg_id", 2: "filename"}),
    "chapman": SplitLayout(3, {0: "ecg_path"}),
}


class SplitFileError(ValueError):
    """A split CSV that does not follow the reference layout."""


@dataclass(frozen=True)
class SplitRow:
    line: int                        # physical line in the file (1-based)
    metadata: dict[str, str]
    labels: np.ndarray               # float32 0/1, one per label column


@dataclass(frozen=True)
class SplitTable:
    path: Path
    classes: list[str]
    rows: list[SplitRow]


def split_path(split_dir: str | Path, task_key: str, split: str) -> Path:
    return Path(split_dir) / f"{task_key}_{split}.csv"


def _label_value(path: Path, line: int, column: int, name: str, cell: str) -> float:
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        raise SplitFileError(f"{path}: line {line} column {column} ({name!r}): label must be "
                             f"0 or 1, got {cell!r}")
    return value


def read_split_csv(path: str | Path, dataset: str) -> SplitTable:
    """One split file: its label columns (the classes, in file order) and its rows."""
    path = Path(path)
    layout = LAYOUTS[dataset]
    if not path.is_file():
        raise SplitFileError(f"split file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = None
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # the reference's chapman files start with a blank line
            if header is None:
                header = [c.strip() for c in cells]
                _check_header(path, reader.line_num, header, layout)
                continue
            if len(cells) != len(header):
                raise SplitFileError(f"{path}: line {reader.line_num} has {len(cells)} cells, "
                                     f"the header {len(header)}")
            labels = np.array([_label_value(path, reader.line_num, i + 1, header[i], cells[i])
                               for i in range(layout.n_metadata, len(header))],
                              dtype=np.float32)
            metadata = dict(zip(header[:layout.n_metadata], cells[:layout.n_metadata]))
            rows.append(SplitRow(reader.line_num, metadata, labels))
    if header is None or not rows:
        raise SplitFileError(f"{path} has no {'header' if header is None else 'rows'}")
    return SplitTable(path, header[layout.n_metadata:], rows)


def _check_header(path: Path, line: int, header: list[str], layout: SplitLayout) -> None:
    for position, name in layout.named.items():
        found = header[position] if position < len(header) else None
        if found != name:
            raise SplitFileError(f"{path}: line {line} column {position + 1} must be {name!r} "
                                 f"(reference layout), got {found!r}")
    if len(header) <= layout.n_metadata:
        raise SplitFileError(f"{path}: line {line}: no label columns after the "
                             f"{layout.n_metadata} metadata columns")
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise SplitFileError(f"{path}: line {line}: columns {duplicates} appear twice")


# ---------------------------------------------------------------- report split

REPORT_SPLIT_COLUMNS = ("ecg_id", "strat_fold", "filename_lr", "filename_hr", "report")


def read_report_split(path: str | Path) -> list[dict[str, str]]:
    """``--report-split FILE``: rows of a CSV in ``ptbxl_database.csv``'s layout (the
    reference's ``data_split/ptbxl/report/ptbxl_test.csv``: 500 PTB-XL records whose
    ``report`` column holds English translations), each with the columns retrieval and
    generation need. Extra columns are ignored; a missing one fails naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SplitFileError(f"report split {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REPORT_SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SplitFileError(f"{path}: no column {', '.join(missing)} (expected the "
                                 "ptbxl_database.csv layout)")
        rows = [{c: row[c] or "" for c in REPORT_SPLIT_COLUMNS} for row in reader]
    if not rows:
        raise SplitFileError(f"{path} has no rows")
    return rows


# ---------------------------------------------------------------- record locations

def ptbxl_record(root: str, metadata: dict[str, str], sample_rate: int
                 ) -> tuple[str, str, int]:
    """(record id, WFDB record path without suffix, strat_fold) of a PTB-XL split row."""
    from melp_ray.data.ptbxl import choose_filename_column, record_path

    path = os.path.join(root, record_path(metadata, root, choose_filename_column(sample_rate)))
    record_id = str(int(float(metadata["ecg_id"])))
    fold = int(float(metadata["strat_fold"])) if metadata["strat_fold"].strip() else -1
    return record_id, path, fold


class HeaderIndex:
    """``.hea`` files under a root by record name, listed once (only when needed)."""

    def __init__(self, root: str):
        self.root = root
        self._by_name: dict[str, list[str]] | None = None

    def find(self, name: str) -> str | None:
        if self._by_name is None:
            self._by_name = {}
            for header in sorted(Path(self.root).rglob("*.hea")):
                self._by_name.setdefault(header.stem, []).append(str(header))
        found = self._by_name.get(name, [])
        return found[0] if len(found) == 1 else None


def cpsc2018_record(root: str, metadata: dict[str, str], headers: HeaderIndex
                    ) -> tuple[str, str]:
    """(record id, .hea path) of an icbeb split row; the path may not exist."""
    name = metadata["filename"].strip()
    direct = os.path.join(root, name + ".hea")
    if os.path.isfile(direct):
        return Path(name).name, direct
    return Path(name).name, headers.find(Path(name).name) or direct


def chapman_record(root: str, metadata: dict[str, str]) -> tuple[str, str]:
    """(record id, .hea path) of a chapman split row; the path may not exist."""
    relative = metadata["ecg_path"].strip()
    relative = relative.removeprefix("/chapman/").lstrip("/")
    header = os.path.join(root, str(Path(relative).with_suffix(".hea")))
    return Path(relative).stem, header
