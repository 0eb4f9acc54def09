"""MIMIC-IV-ECG root reader: record_list.csv + machine_measurements.csv -> RecordRefs.

The report of a study is built from its machine statements ``report_0`` ... ``report_17``
by the reference rules (docs/data.md, spec "MIMIC-IV-ECG report text"):
each statement is stripped of stray ``***``, ``=-`` and ``=``; empty statements are
skipped; the rest are joined with ". "; "EKG" becomes "ECG"; the text is lower-cased,
runs of whitespace become one space, and a final "." is added (not doubled).
Cleaning each statement before joining gives the spec's result and avoids empty
". ." fragments when a statement was only decoration.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable

import pandas as pd

from melp_ray.data.records import RecordRef, read_metadata_csv

DATASET = "mimic-iv-ecg"
RECORD_LIST_CSV = "record_list.csv"
MEASUREMENTS_CSV = "machine_measurements.csv"
N_REPORT_COLUMNS = 18
REPORT_COLUMNS = tuple(f"report_{i}" for i in range(N_REPORT_COLUMNS))
RECORD_LIST_COLUMNS = ("subject_id", "study_id", "path")
MEASUREMENTS_COLUMNS = ("subject_id", "study_id", "report_0")

_STRAY_MARKERS = re.compile(r"\*\*\*|=-|=")
_EKG = re.compile("ekg", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class MIMICFormatError(ValueError):
    """A MIMIC-IV-ECG csv file is missing or lacks required columns."""


def _clean_statement(statement) -> str:
    if statement is None or (isinstance(statement, float) and statement != statement):  # None / NaN
        return ""
    text = _STRAY_MARKERS.sub(" ", str(statement))
    return _WHITESPACE.sub(" ", text).strip()


def build_report(statements: Iterable) -> str:
    """One report from a study's machine statements ("" when every statement is empty)."""
    parts = [part for part in map(_clean_statement, statements) if part]
    if not parts:
        return ""
    text = ". ".join(parts)
    text = _EKG.sub("ECG", text).lower()
    text = _WHITESPACE.sub(" ", text).strip()
    return text if text.endswith(".") else text + "."


def _read_csv(root: str | os.PathLike, name: str, required: tuple[str, ...], **kwargs) -> pd.DataFrame:
    return read_metadata_csv(root, name, required, MIMICFormatError, "MIMIC-IV-ECG", **kwargs)


def read_reports(root: str | os.PathLike) -> dict[str, str]:
    """{study_id: report} from machine_measurements.csv."""
    table = _read_csv(root, MEASUREMENTS_CSV, MEASUREMENTS_COLUMNS, dtype=str, keep_default_na=False)
    columns = [c for c in REPORT_COLUMNS if c in table.columns]
    reports = {}
    for study_id, *statements in table[["study_id", *columns]].itertuples(index=False):
        reports[str(study_id).strip()] = build_report(statements)
    return reports


def list_mimic(root: str | os.PathLike, limit: int | None = None) -> list[RecordRef]:
    """Every row of record_list.csv as a RecordRef, sorted by (subject_id, study_id).

    A study without machine statements gets an empty report (rejected later as
    empty_report, so it is still counted).
    """
    records = _read_csv(root, RECORD_LIST_CSV, RECORD_LIST_COLUMNS, dtype=str, keep_default_na=False)
    records = records.assign(_subject=records["subject_id"].astype(int), _study=records["study_id"].astype(int))
    records = records.sort_values(["_subject", "_study"], kind="stable")
    if limit is not None:
        records = records.head(limit)
    reports = read_reports(root)
    return [
        RecordRef(
            record_id=str(row.study_id).strip(),
            subject_id=str(row.subject_id).strip(),
            dataset=DATASET,
            path=str(row.path).strip(),
            report=reports.get(str(row.study_id).strip(), ""),
        )
        for row in records.itertuples(index=False)
    ]
