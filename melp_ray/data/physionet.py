"""Readers for the PhysioNet/CinC Challenge 2020/2021 layout (CPSC2018, Chapman-Shaoxing).

Each record is a WFDB header ``<name>.hea`` next to a MATLAB v4 file ``<name>.mat`` holding
one int16 matrix ``val`` of shape (n_leads, n_samples). The header's signal lines give
per-lead gain (ADC units per physical unit, usually ``1000/mV`` so the ints are µV),
baseline and lead name; comment lines carry the metadata::

    A0001 12 500 7500 05-Feb-2020 11:39:16
    A0001.mat 16+24 1000/mV 16 0 28 -1716 0 I
    ...
    #Age: 74
    #Sex: Male
    #Dx: 59118001,164884008

The format field ``16+24`` says it all to WFDB: 16-bit samples after a 24-byte prefix (the
MAT v4 matrix header of ``val``), so ``wfdb.rdheader`` / ``wfdb.rdrecord`` read these
records like any other WFDB record (as ``data/records.py`` does PTB-XL's). What wfdb does
not check is checked here: the lines the record line announces, a gain field it could not
parse, and that the ``.mat`` holds a ``val`` matrix of the header's shape (wfdb would read
whatever bytes follow the offset).

``#Dx`` holds SNOMED CT codes; the label sets built on them (CPSC2018's 9 classes,
Chapman-Shaoxing's codes, their descriptions) are in ``melp_ray.data.physionet_labels``.
The signal is returned in the canonical lead order, mapped by lead name
(case-insensitive), in mV, float32. A sample of -32768 is WFDB's "no value" in format 16
and comes back as NaN (the record is then rejected as ``nan_or_inf`` downstream).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import wfdb

from melp_ray.data.leads import LEADS
from melp_ray.data.signal_files import TO_MILLIVOLT

CANONICAL_LEADS: tuple[str, ...] = tuple(LEADS)


class PhysioNetFormatError(ValueError):
    """A header or .mat file that does not follow the Challenge layout."""


# --------------------------------------------------------------------------- headers

@dataclass(frozen=True)
class SignalSpec:
    """One signal line of a header."""

    lead: str
    gain: float       # ADC units per physical unit
    baseline: float   # ADC value of 0 physical units
    units: str


@dataclass(frozen=True)
class PhysioNetHeader:
    record_name: str
    fs: float
    n_samples: int
    signal_file: str
    signals: tuple[SignalSpec, ...]
    dx_codes: tuple[str, ...]
    age: float | None
    sex: str | None


@dataclass(frozen=True)
class PhysioNetRecord:
    """One listed record: where it is plus its header metadata (no waveform)."""

    record_id: str
    header_path: Path
    mat_path: Path
    fs: float
    n_samples: int
    dx_codes: tuple[str, ...]
    age: float | None
    sex: str | None


def _fail(path: Path, message: str) -> PhysioNetFormatError:
    return PhysioNetFormatError(f"{path}: {message}")


def _record_path(header_path: Path) -> str:
    """The path wfdb wants: the record without ``.hea``."""
    return os.fspath(header_path.with_suffix(""))


def _count_signal_lines(path: Path) -> int:
    """Non-comment lines after the record line; wfdb reads only as many as announced."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise _fail(path, f"cannot read header ({exc})") from None
    body = [ln for ln in (raw.strip() for raw in lines) if ln and not ln.startswith("#")]
    if not body:
        raise _fail(path, "empty header")
    return len(body) - 1


def _rdheader(path: Path) -> wfdb.Record:
    """``wfdb.rdheader`` plus the checks wfdb leaves out (see the module docstring)."""
    n_lines = _count_signal_lines(path)
    try:
        header = wfdb.rdheader(_record_path(path))
    except Exception as exc:  # HeaderSyntaxError, ValueError from its casts, ...
        raise _fail(path, f"invalid header ({type(exc).__name__}: {exc})") from None
    n_sig, fs, sig_len = header.n_sig or 0, header.fs or 0, header.sig_len or 0
    if n_sig < 1 or fs <= 0 or sig_len < 1:
        raise _fail(path, f"invalid record line: {n_sig} signals, {fs} Hz, {sig_len} samples")
    if n_lines != n_sig:
        raise _fail(path, f"record line announces {n_sig} signals, found {n_lines}")
    for units in header.units:
        # A gain that is not a number does not fail wfdb's signal-line pattern: the gain is
        # left at its default and the whole field ("fast/mV") ends up in the units.
        if units and "/" in units:
            raise _fail(path, f"cannot parse gain {units!r}")
    files = set(header.file_name)
    if len(files) != 1:
        raise _fail(path, f"signals spread over several files {sorted(files)}")
    return header


def _comments(lines: Sequence[str]) -> dict[str, str]:
    """``Key: value`` comment lines (wfdb strips the ``#``), keys lower-cased."""
    pairs = (line.partition(":") for line in lines)
    return {key.strip().lower(): value.strip() for key, sep, value in pairs if sep}


def _parse_age(value: str) -> float | None:
    try:
        age = float(value)
    except ValueError:
        return None  # "Unknown", "NaN", ""
    return None if math.isnan(age) else age


def read_physionet_header(path: str | Path) -> PhysioNetHeader:
    """Read a Challenge ``.hea`` file (``wfdb.rdheader``) with its ``#Key: value`` metadata."""
    path = Path(path)
    header = _rdheader(path)
    comments = _comments(header.comments or [])
    dx = tuple(code.strip() for code in comments.get("dx", "").split(",") if code.strip())
    sex = comments.get("sex") or None
    signals = tuple(SignalSpec(lead=name, gain=float(gain), baseline=float(baseline),
                               units=units or "mV")
                    for name, gain, baseline, units in zip(
                        header.sig_name, header.adc_gain, header.baseline, header.units))
    return PhysioNetHeader(
        record_name=header.record_name, fs=float(header.fs), n_samples=int(header.sig_len),
        signal_file=header.file_name[0], signals=signals, dx_codes=dx,
        age=_parse_age(comments.get("age", "")),
        sex=None if sex is None or sex.lower() in {"unknown", "nan"} else sex,
    )


def _header_path(path: str | Path) -> Path:
    """Accept ``X.hea``, ``X.mat`` or the bare record path ``X``."""
    path = Path(path)
    return path.with_suffix(".hea") if path.suffix in {".mat", ""} else path


# --------------------------------------------------------------------------- records

def list_physionet_records(root: str | Path) -> list[PhysioNetRecord]:
    """Every ``*.hea`` under ``root`` (recursively) that has its ``.mat`` file, sorted.

    A header without its signal file, or a malformed header, raises
    ``PhysioNetFormatError`` naming the file: a silently shorter test set would change
    the reported metrics.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"PhysioNet root {root} is not a directory")
    records = []
    for header_path in sorted(root.rglob("*.hea")):
        header = read_physionet_header(header_path)
        mat_path = header_path.parent / header.signal_file
        if mat_path.suffix != ".mat":
            raise _fail(header_path, f"signal file {header.signal_file!r} is not a .mat file")
        if not mat_path.is_file():
            raise _fail(header_path, f"signal file {mat_path.name} is missing")
        records.append(PhysioNetRecord(
            record_id=header_path.stem, header_path=header_path, mat_path=mat_path,
            fs=header.fs, n_samples=header.n_samples, dx_codes=header.dx_codes,
            age=header.age, sex=header.sex))
    if not records:
        raise FileNotFoundError(f"no .hea files under {root}")
    return records


def _canonical_lead_rows(path: Path, leads: Sequence[str]) -> list[int]:
    """Row index in the file of each canonical lead, matched by name (case-insensitive)."""
    by_name: dict[str, int] = {}
    for row, lead in enumerate(leads):
        key = lead.strip().lower()
        if key in by_name:
            raise _fail(path, f"lead {lead!r} appears twice")
        by_name[key] = row
    missing = [lead for lead in CANONICAL_LEADS if lead.lower() not in by_name]
    if missing:
        raise _fail(path, f"missing leads {missing} (header has {list(leads)})")
    return [by_name[lead.lower()] for lead in CANONICAL_LEADS]


def _millivolt_factor(path: Path, units: str | None) -> float:
    try:
        return TO_MILLIVOLT[(units or "mV").lower()]
    except KeyError:
        raise _fail(path, f"unsupported signal units {units!r}") from None


def _check_val_matrix(mat_path: Path, header: wfdb.Record) -> None:
    """The .mat holds one MAT v4 int16 ``val`` of the header's shape, so that wfdb's
    format-16 read past the 24-byte prefix yields exactly that matrix."""
    try:
        version = scipy.io.matlab.matfile_version(os.fspath(mat_path))
        matrices = dict((name, shape) for name, shape, _ in scipy.io.whosmat(mat_path))
    except Exception as exc:  # scipy raises several types for a corrupt file
        raise _fail(mat_path, f"cannot read MATLAB file ({exc})") from None
    if "val" not in matrices:
        raise _fail(mat_path, f"no 'val' matrix (keys: {sorted(matrices)})")
    expected = (header.n_sig, header.sig_len)
    if matrices["val"] != expected:
        raise _fail(mat_path, f"'val' has shape {matrices['val']}, header says {expected}")
    int16_size = 24 + 2 * header.n_sig * header.sig_len  # "val" v4 prefix + the samples
    if version[0] != 0 or len(matrices) != 1 or mat_path.stat().st_size != int16_size:
        raise _fail(mat_path, "'val' must be the only matrix of a MAT v4 file, as int16 "
                              "(the header's format 16+24)")


def load_physionet_signal(path: str | Path) -> tuple[np.ndarray, float]:
    """Load one record as ``(signal, fs)``: float32 (12, T) in mV, canonical lead order.

    ``path`` may be the ``.hea``, the ``.mat`` or the record path without suffix.
    Physical value = (adc - baseline) / gain (``wfdb.rdrecord``), converted to mV from the
    header's units.
    """
    header_path = _header_path(path)
    header = _rdheader(header_path)
    _check_val_matrix(header_path.parent / header.file_name[0], header)
    rows = _canonical_lead_rows(header_path, header.sig_name)
    to_mv = np.array([_millivolt_factor(header_path, header.units[r]) for r in rows])
    try:
        record = wfdb.rdrecord(_record_path(header_path))
    except Exception as exc:
        raise _fail(header_path, f"cannot read signal ({type(exc).__name__}: {exc})") from None
    signal = record.p_signal[:, rows].T * to_mv[:, None]
    return signal.astype(np.float32), float(record.fs)
