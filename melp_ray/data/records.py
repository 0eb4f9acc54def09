"""One ECG record: its reference (RecordRef), the reasons it can be rejected, and loading.

``load_signal`` turns a WFDB record into the canonical array: float32, shape
(12, sample_rate * seconds), millivolts, leads in ``LEADS`` order. Anything that cannot
become such an array raises ``RecordRejected`` with one of the named reasons below, so
that ``prepare`` can count every rejected record under its reason.

Rules (documented in docs/data.md):
- missing .hea/.dat -> missing_file; unparsable header -> bad_header; samples that cannot
  be read (truncated/corrupt .dat) -> unreadable;
- leads are matched by name (``leads.lead_indices``); extra leads are ignored;
- NaN/Inf anywhere -> nan_or_inf;
- flat: a lead is flat when its peak-to-peak range is below ``FLAT_TOLERANCE_MV``. The
  record is rejected (flat_signal) only when ALL 12 leads are flat (this includes the
  all-zero records the reference drops). A single flat lead, or a few, is kept: it is
  what a detached electrode looks like and training already zeroes leads at random;
- length: a record shorter than ``seconds`` is rejected (wrong_length); a longer one
  keeps its first ``seconds`` (cropped from the start);
- rate: the source rate must be a positive whole number of Hz (else bad_sample_rate);
  it is resampled to ``sample_rate`` with ``scipy.signal.resample_poly``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from melp_ray.data.leads import LEADS, LeadMappingError, lead_indices
from melp_ray.data.rejections import (BAD_HEADER, BAD_SAMPLE_RATE, EMPTY_REPORT, FLAT_SIGNAL, MISSING_FILE,
                                      MISSING_LEADS, NAN_OR_INF, SHORT_REPORT, UNREADABLE, WRONG_LENGTH,
                                      RecordRejected)
from melp_ray.data.signal_files import is_array_path, millivolt_factors, read_signal_file

FLAT_TOLERANCE_MV = 1e-3   # below one ADC step of any common ECG format: the lead is constant

LABEL_TASKS: tuple[str, ...] = ("super", "sub", "form", "rhythm")


def empty_labels() -> dict[str, list[str]]:
    return {task: [] for task in LABEL_TASKS}


@dataclass
class RecordRef:
    """Where one record lives and what is known about it before its signal is read."""

    record_id: str
    subject_id: str
    dataset: str
    path: str                 # WFDB record without extension; relative to the root, or absolute
    report: str
    strat_fold: int = -1      # PTB-XL fold, -1 when the source has none
    labels: dict[str, list[str]] = field(default_factory=empty_labels)
    fs: float = 0.0           # manifest rows: the rate of a file that does not say it (0: unknown)
    leads: str = ""           # manifest rows: its lead names, ";"-separated ("": the file's / LEADS)

    def to_row(self) -> dict[str, Any]:
        """A flat dict of plain types (a Ray Data row); labels become labels_<task> columns."""
        row = {
            "record_id": self.record_id,
            "subject_id": self.subject_id,
            "dataset": self.dataset,
            "path": self.path,
            "report": self.report,
            "strat_fold": int(self.strat_fold),
            "fs": float(self.fs),
            "leads": self.leads,
        }
        for task in LABEL_TASKS:
            row[f"labels_{task}"] = list(self.labels.get(task, []))
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RecordRef:
        """Inverse of to_row (also accepts numpy arrays for the label lists, as Ray gives them)."""
        labels = {}
        for task in LABEL_TASKS:
            values = row.get(f"labels_{task}")
            labels[task] = [] if values is None else [str(value) for value in values]
        return cls(
            record_id=str(row["record_id"]),
            subject_id=str(row["subject_id"]),
            dataset=str(row["dataset"]),
            path=str(row["path"]),
            report=str(row["report"]),
            strat_fold=int(row.get("strat_fold", -1)),
            labels=labels,
            fs=float(row.get("fs") or 0.0),
            leads=str(row.get("leads") or ""),
        )


# ---------------------------------------------------------------- report
def check_report(text: str | None, min_words: int) -> str:
    """The report with outer whitespace removed; raises RecordRejected when too short.

    Empty (or missing / whitespace-only, or punctuation only: nothing to align an ECG
    with) -> empty_report; fewer than ``min_words`` whitespace-separated words (the
    reference's count) -> short_report.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        text = ""
    cleaned = str(text).strip()
    if not cleaned:
        raise RecordRejected(EMPTY_REPORT, "no report text")
    if not any(ch.isalnum() for ch in cleaned):
        raise RecordRejected(EMPTY_REPORT, f"no words, only punctuation: {cleaned!r}")
    n_words = len(cleaned.split())
    if n_words < min_words:
        raise RecordRejected(SHORT_REPORT, f"{n_words} words < {min_words}: {cleaned!r}")
    return cleaned


# ---------------------------------------------------------------- signal
def n_samples_for(sample_rate: int | float, seconds: float) -> int:
    """Number of samples of one lead at ``sample_rate`` over ``seconds`` (must be whole)."""
    n = sample_rate * seconds
    if n <= 0 or abs(n - round(n)) > 1e-6:
        raise ValueError(f"sample_rate * seconds must be a positive whole number, got {n}")
    return int(round(n))


def resolve_path(ref: RecordRef, root: str | os.PathLike | None) -> str:
    """Absolute WFDB record path (no extension) of ``ref`` under ``root``."""
    if root is None or os.path.isabs(ref.path):
        return ref.path
    return os.path.join(os.fspath(root), ref.path)


def load_signal(ref: RecordRef, root: str | os.PathLike | None, sample_rate: int = 500,
                seconds: float = 10.0) -> np.ndarray:
    """Read, validate and resample one record: float32 (12, sample_rate*seconds) in mV.

    WFDB unless the path names a .npy, HDF5 or EDF file (manifest roots, data/signal_files.py)."""
    import wfdb  # imported here so that light users of this module do not pay for it

    record_path = resolve_path(ref, root)
    if is_array_path(record_path):
        signal, fs = read_signal_file(record_path, ref.fs, ref.leads)
        return fit_signal(signal, fs, sample_rate, seconds)
    record = _read_record(wfdb, record_path)
    source_rate = _source_rate(record.fs)
    try:
        columns = lead_indices(record.sig_name or [])
    except LeadMappingError as err:
        raise RecordRejected(MISSING_LEADS, str(err)) from None
    to_mv = millivolt_factors(record.units, columns)
    signal = (record.p_signal[:, columns] * to_mv).T        # (12, T), canonical order, mV
    return fit_signal(signal, source_rate, sample_rate, seconds)


def fit_signal(signal: np.ndarray, fs, sample_rate: int, seconds: float) -> np.ndarray:
    """(12, T) in mV at ``fs`` -> float32 (12, sample_rate*seconds); every reader ends here.

    The first ``seconds`` are kept (a shorter record is wrong_length), NaN/Inf or all-flat
    leads are rejected, and the rate is converted with ``resample_poly``.
    """
    source_rate = _source_rate(fs)
    # Samples needed at the source rate to produce exactly the wanted output length.
    n_out = n_samples_for(sample_rate, seconds)
    up, down = _resample_ratio(source_rate, sample_rate)
    n_in = math.ceil(n_out * down / up)
    if signal.shape[1] < n_in:
        raise RecordRejected(WRONG_LENGTH, f"{signal.shape[1]} samples at {source_rate} Hz < "
                                           f"{n_in} needed for {seconds} s")
    window = signal[:, :n_in].astype(np.float64)
    _check_values(window.T)
    if up != down:
        from scipy.signal import resample_poly

        window = resample_poly(window, up, down, axis=1)
    return np.ascontiguousarray(window[:, :n_out], dtype=np.float32)


def _read_record(wfdb, record_path: str):
    """wfdb.rdrecord, with its failures sorted into missing_file / bad_header / unreadable.

    The header is parsed once on the happy path (parsing is most of the cost of a read);
    only a failed read parses it again to tell the reasons apart.
    """
    if not os.path.exists(record_path + ".hea"):
        raise RecordRejected(MISSING_FILE, f"{record_path}.hea not found")
    try:
        record = wfdb.rdrecord(record_path)
    except Exception as err:  # HeaderSyntaxError, FileNotFoundError, numpy reshape errors, ...
        _classify_read_failure(wfdb, record_path, err)
    if not record.sig_name or not record.n_sig:
        raise RecordRejected(BAD_HEADER, "header has no signals")
    signal = record.p_signal
    if signal is None or signal.ndim != 2 or signal.shape[0] != record.sig_len:
        shape = None if signal is None else signal.shape
        raise RecordRejected(UNREADABLE, f"read {shape} samples, header says {record.sig_len}")
    return record


def _classify_read_failure(wfdb, record_path: str, err: Exception):
    try:
        header = wfdb.rdheader(record_path)
    except Exception as header_err:
        raise RecordRejected(BAD_HEADER, f"{type(header_err).__name__}: {header_err}") from None
    folder = os.path.dirname(record_path)
    for data_file in sorted(set(header.file_name or [])):
        if not os.path.exists(os.path.join(folder, data_file)):
            raise RecordRejected(MISSING_FILE, f"{os.path.join(folder, data_file)} not found") from None
    raise RecordRejected(UNREADABLE, f"{type(err).__name__}: {err}") from None


def _source_rate(fs) -> int:
    if fs is None or not np.isfinite(fs) or fs <= 0 or abs(fs - round(fs)) > 1e-6:
        raise RecordRejected(BAD_SAMPLE_RATE, f"sampling rate {fs!r} is not a positive whole number of Hz")
    return int(round(fs))


def resample(ecg: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Signals (..., samples) from ``source_rate`` to ``target_rate`` (``resample_poly``, as
    raw records are), float32."""
    from scipy.signal import resample_poly

    up, down = _resample_ratio(int(source_rate), target_rate)
    return resample_poly(ecg, up, down, axis=-1).astype(np.float32)


def _resample_ratio(source_rate: int, target_rate: int | float) -> tuple[int, int]:
    ratio = Fraction(int(round(target_rate)), source_rate)
    return ratio.numerator, ratio.denominator


def _check_values(signal: np.ndarray) -> None:
    """NaN/Inf anywhere, or every lead flat -> rejected (see the module docstring)."""
    if not np.all(np.isfinite(signal)):
        bad_leads = [LEADS[i] for i in np.nonzero(~np.all(np.isfinite(signal), axis=0))[0]]
        raise RecordRejected(NAN_OR_INF, f"non-finite samples in leads {bad_leads}")
    peak_to_peak = signal.max(axis=0) - signal.min(axis=0)
    if np.all(peak_to_peak < FLAT_TOLERANCE_MV):
        raise RecordRejected(FLAT_SIGNAL, "all 12 leads are flat (constant or zero)")


def read_metadata_csv(root, name: str, required: tuple[str, ...], error: type[Exception],
                      dataset: str, **kwargs):
    """A dataset's metadata csv as a DataFrame; ``error`` names what is missing or malformed."""
    import pandas as pd

    path = Path(root) / name
    if not path.is_file():
        raise error(f"{dataset} root {root} has no {name}")
    try:
        table = pd.read_csv(path, **kwargs)
    except Exception as err:
        raise error(f"cannot parse {path}: {err}") from None
    return require_columns(table, required, path, error)


def require_columns(table, required: tuple[str, ...], path, error: type[Exception]):
    """``table`` if it has every ``required`` column, else ``error`` naming what it lacks."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise error(f"{path} lacks columns {missing} (has {list(table.columns)[:12]})")
    return table


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
