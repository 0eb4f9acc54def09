"""PTB-XL root reader: records, their reports and their label sets.

Root layout (PhysioNet PTB-XL): ``ptbxl_database.csv``, ``scp_statements.csv`` and
``records100/`` (100 Hz, ``filename_lr``) and/or ``records500/`` (500 Hz, ``filename_hr``).

Labels come from the ``scp_codes`` column ({code: likelihood}) joined with
``scp_statements.csv``. Every listed code is used, whatever its likelihood: this is the
common practice of the PTB-XL benchmark (Strodthoff et al. 2021), and it matters because
form and rhythm statements are always stored with likelihood 0 ("not given"), so a
``likelihood > 0`` filter would drop every rhythm label.
- super:  ``diagnostic_class`` of the diagnostic codes (NORM, MI, STTC, CD, HYP)
- sub:    ``diagnostic_subclass`` of the diagnostic codes (23 classes)
- form:   codes with ``form == 1`` (19 classes)
- rhythm: codes with ``rhythm == 1`` (12 classes)
"""
from __future__ import annotations

import ast
import os
from functools import lru_cache

import pandas as pd

from melp_ray.data.records import RecordRef, read_metadata_csv

DATASET = "ptb-xl"
DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
DATABASE_COLUMNS = ("ecg_id", "patient_id", "report", "scp_codes", "strat_fold", "filename_lr", "filename_hr")
STATEMENTS_COLUMNS = ("description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass")

SUPERCLASSES: list[str] = ["NORM", "MI", "STTC", "CD", "HYP"]
TASKS: tuple[str, ...] = ("super", "sub", "form", "rhythm")
NATIVE_RATES = {"filename_lr": 100, "filename_hr": 500}

# Super- and subclass names are not all SCP codes, so scp_statements.csv has no
# description for some of them; these follow the class names of the PTB-XL paper.
GROUP_DESCRIPTIONS: dict[str, str] = {
    "NORM": "normal ECG",
    "MI": "myocardial infarction",
    "STTC": "ST/T change",
    "CD": "conduction disturbance",
    "HYP": "hypertrophy",
    "AMI": "anterior myocardial infarction",
    "IMI": "inferior myocardial infarction",
    "LMI": "lateral myocardial infarction",
    "PMI": "posterior myocardial infarction",
    "ISCA": "ischemic in anterior leads",
    "ISCI": "ischemic in inferior leads",
    "ISC_": "non-specific ischemic",
    "NST_": "non-specific ST changes",
    "LVH": "left ventricular hypertrophy",
    "RVH": "right ventricular hypertrophy",
    "LAO/LAE": "left atrial overload/enlargement",
    "RAO/RAE": "right atrial overload/enlargement",
    "SEHYP": "septal hypertrophy",
    "LAFB/LPFB": "left anterior/left posterior fascicular block",
    "IRBBB": "incomplete right bundle branch block",
    "CRBBB": "complete right bundle branch block",
    "ILBBB": "incomplete left bundle branch block",
    "CLBBB": "complete left bundle branch block",
    "_AVB": "atrioventricular block",
    "IVCD": "non-specific intraventricular conduction disturbance (block)",
    "WPW": "Wolff-Parkinson-White syndrome",
}


class PTBXLFormatError(ValueError):
    """A PTB-XL csv file is missing or lacks required columns (sources wraps it in DataRootError)."""


def _read_csv(root: str | os.PathLike, name: str, required: tuple[str, ...], **kwargs) -> pd.DataFrame:
    return read_metadata_csv(root, name, required, PTBXLFormatError, "PTB-XL", **kwargs)


def read_database(root: str | os.PathLike) -> pd.DataFrame:
    """ptbxl_database.csv, sorted by ecg_id."""
    table = _read_csv(root, DATABASE_CSV, DATABASE_COLUMNS)
    return table.sort_values("ecg_id", kind="stable").reset_index(drop=True)


def read_statements(root: str | os.PathLike) -> pd.DataFrame:
    """scp_statements.csv indexed by SCP code."""
    return _read_csv(root, STATEMENTS_CSV, STATEMENTS_COLUMNS, index_col=0)


def parse_scp_codes(text: str) -> dict[str, float]:
    """The scp_codes cell, e.g. "{'NORM': 100.0, 'SR': 0.0}", as a dict."""
    value = ast.literal_eval(text) if isinstance(text, str) and text.strip() else {}
    if not isinstance(value, dict):
        raise ValueError(f"scp_codes is not a dict: {text!r}")
    return {str(code): float(likelihood) for code, likelihood in value.items()}


def labels_for_codes(codes: dict[str, float] | list[str], statements: pd.DataFrame) -> dict[str, list[str]]:
    """The four label sets (sorted, unique) of one record's SCP codes (any likelihood)."""
    labels: dict[str, set[str]] = {task: set() for task in TASKS}
    for code in codes:
        if code not in statements.index:
            continue  # a code unknown to scp_statements.csv carries no label
        row = statements.loc[code]
        if row["diagnostic"] == 1:
            if isinstance(row["diagnostic_class"], str):
                labels["super"].add(row["diagnostic_class"])
            if isinstance(row["diagnostic_subclass"], str):
                labels["sub"].add(row["diagnostic_subclass"])
        if row["form"] == 1:
            labels["form"].add(code)
        if row["rhythm"] == 1:
            labels["rhythm"].add(code)
    return {task: sorted(values) for task, values in labels.items()}


# ---------------------------------------------------------------- class lists
def class_names(task: str, root: str | os.PathLike) -> list[str]:
    """Ordered class list of a task: SUPERCLASSES for "super", else sorted from scp_statements.csv."""
    if task == "super":
        return list(SUPERCLASSES)
    return list(_class_names_cached(os.path.abspath(os.fspath(root)), task))


@lru_cache(maxsize=32)
def _class_names_cached(root: str, task: str) -> tuple[str, ...]:
    statements = read_statements(root)
    if task == "sub":
        names = statements.loc[statements["diagnostic"] == 1, "diagnostic_subclass"].dropna()
    elif task == "form":
        names = statements.index[statements["form"] == 1]
    elif task == "rhythm":
        names = statements.index[statements["rhythm"] == 1]
    else:
        raise ValueError(f"unknown PTB-XL task {task!r}; expected one of {TASKS}")
    return tuple(sorted(set(map(str, names))))


def subclasses(root: str | os.PathLike) -> list[str]:
    return class_names("sub", root)


def form_classes(root: str | os.PathLike) -> list[str]:
    return class_names("form", root)


def rhythm_classes(root: str | os.PathLike) -> list[str]:
    return class_names("rhythm", root)


def class_descriptions(task: str, root: str | os.PathLike) -> dict[str, str]:
    """{class: human-readable description} for a task, in class order (for zero-shot prompts).

    Codes use scp_statements.csv's ``description``; super/subclass names that are not
    codes fall back to GROUP_DESCRIPTIONS.
    """
    statements = read_statements(root)
    descriptions = {}
    for name in class_names(task, root):
        from_csv = statements["description"].get(name) if task != "super" else None
        if isinstance(from_csv, str) and from_csv.strip():
            descriptions[name] = from_csv.strip()
        else:
            descriptions[name] = GROUP_DESCRIPTIONS.get(name, name)
    return descriptions


# ---------------------------------------------------------------- records
def choose_filename_column(sample_rate: int) -> str:
    """The preferred file for a target rate: 500 Hz files above 100 Hz, else the 100 Hz ones."""
    return "filename_hr" if sample_rate > NATIVE_RATES["filename_lr"] else "filename_lr"


def record_path(row, root: str, preferred: str) -> str:
    """The preferred file when it exists, else the other rate's file when that exists.

    When neither exists the preferred path is returned and loading rejects it as
    missing_file, so the record is still counted.
    """
    other = "filename_lr" if preferred == "filename_hr" else "filename_hr"
    for column in (preferred, other):
        path = row[column]
        if isinstance(path, str) and os.path.exists(os.path.join(root, path + ".hea")):
            return path
    return str(row[preferred])


def _subject_id(value) -> str:
    """patient_id is stored as a float ("15709.0"); the id is the integer."""
    try:
        return str(int(float(value)))
    except (TypeError, ValueError):
        return str(value)


def list_ptbxl(root: str | os.PathLike, sample_rate: int = 500, limit: int | None = None) -> list[RecordRef]:
    """Every row of ptbxl_database.csv as a RecordRef, in ecg_id order (reports are not checked)."""
    root = os.fspath(root)
    database = read_database(root)
    if limit is not None:
        database = database.head(limit)
    statements = read_statements(root)
    preferred = choose_filename_column(sample_rate)
    refs = []
    for row in database.to_dict("records"):
        report = row["report"] if isinstance(row["report"], str) else ""
        refs.append(RecordRef(
            record_id=str(int(row["ecg_id"])),
            subject_id=_subject_id(row["patient_id"]),
            dataset=DATASET,
            path=record_path(row, root, preferred),
            report=report,
            strat_fold=int(row["strat_fold"]) if pd.notna(row["strat_fold"]) else -1,
            labels=labels_for_codes(parse_scp_codes(row["scp_codes"]), statements),
        ))
    return refs
