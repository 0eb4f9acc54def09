"""Readers for the PhysioNet/CinC Challenge 2020/2021 layout (CPSC2018, Chapman-Shaoxing).

Each record is a WFDB-style text header ``<name>.hea`` next to a MATLAB file ``<name>.mat``
holding one int matrix ``val`` of shape (n_leads, n_samples). The header's signal lines
give per-lead gain (ADC units per physical unit, usually ``1000/mV`` so the ints are µV),
baseline and lead name; comment lines carry the metadata::

    A0001 12 500 7500 05-Feb-2020 11:39:16
    A0001.mat 16+24 1000/mV 16 0 28 -1716 0 I
    ...
    #Age: 74
    #Sex: Male
    #Dx: 59118001,164884008

``#Dx`` holds SNOMED CT codes; the label sets built on them (CPSC2018's 9 classes,
Chapman-Shaoxing's codes, their descriptions) are in ``melp_ray.data.physionet_labels``.
The signal is returned in the canonical lead order, mapped by lead name
(case-insensitive), in mV, float32. The Challenge files are MAT v4 (hence the
``+24`` byte offset in the format field); ``scipy.io.loadmat`` reads v4 and v5 alike.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melp_ray.data.signal_files import TO_MILLIVOLT

try:  # the shared lead definition (written concurrently by the data layer)
    from melp_ray.data.leads import LEADS as _CANONICAL_LEADS
except ImportError:  # pragma: no cover - only while melp_ray.data.leads does not exist yet
    _CANONICAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF",
                        "V1", "V2", "V3", "V4", "V5", "V6")

CANONICAL_LEADS: tuple[str, ...] = tuple(_CANONICAL_LEADS)


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


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# "1000/mV", "1000.0(0)/mV", "4.88(-2)/uV", "200": gain, optional (baseline), optional /units
_GAIN_RE = re.compile(
    rf"^(?P<gain>{_NUMBER})?(?:\((?P<baseline>{_NUMBER})\))?(?:/(?P<units>\S+))?$")
_DEFAULT_GAIN = 200.0  # WFDB: a missing or zero gain means 200 ADC units per mV


def _fail(path: Path, message: str) -> PhysioNetFormatError:
    return PhysioNetFormatError(f"{path}: {message}")


def _parse_record_line(path: Path, line: str) -> tuple[str, int, float, int]:
    fields = line.split()
    if len(fields) < 4:
        raise _fail(path, f"record line needs 'name n_signals fs n_samples', got {line!r}")
    try:
        n_signals = int(fields[1])
        fs = float(re.split(r"[/(]", fields[2])[0])  # "500" or "500/..." or "500(...)"
        n_samples = int(fields[3])
    except ValueError:
        raise _fail(path, f"non-numeric field in record line {line!r}") from None
    if n_signals < 1 or fs <= 0 or n_samples < 1:
        raise _fail(path, f"invalid record line {line!r}")
    return fields[0], n_signals, fs, n_samples


def _parse_signal_line(path: Path, line: str) -> tuple[str, SignalSpec]:
    fields = line.split()
    if len(fields) < 9:
        raise _fail(path, f"signal line needs 9 fields (file format gain adc_res adc_zero "
                          f"init checksum block lead), got {line!r}")
    match = _GAIN_RE.match(fields[2])
    if match is None:
        raise _fail(path, f"cannot parse gain {fields[2]!r}")
    try:
        adc_zero = float(fields[4])
    except ValueError:
        raise _fail(path, f"non-numeric ADC zero in {line!r}") from None
    gain = float(match["gain"]) if match["gain"] else 0.0
    spec = SignalSpec(
        lead=" ".join(fields[8:]),
        gain=gain if gain != 0 else _DEFAULT_GAIN,
        baseline=float(match["baseline"]) if match["baseline"] else adc_zero,
        units=match["units"] or "mV",
    )
    return fields[0], spec


def _parse_comment(line: str) -> tuple[str, str] | None:
    key, sep, value = line.lstrip("#").partition(":")
    return (key.strip().lower(), value.strip()) if sep else None


def _parse_age(value: str) -> float | None:
    try:
        age = float(value)
    except ValueError:
        return None  # "Unknown", "NaN", ""
    return None if math.isnan(age) else age


def read_physionet_header(path: str | Path) -> PhysioNetHeader:
    """Parse a Challenge ``.hea`` file (record line, signal lines, ``#Key: value`` lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise _fail(path, f"cannot read header ({exc})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body = [ln for ln in lines if not ln.startswith("#")]
    comments = dict(filter(None, (_parse_comment(ln) for ln in lines if ln.startswith("#"))))
    if not body:
        raise _fail(path, "empty header")
    name, n_signals, fs, n_samples = _parse_record_line(path, body[0])
    if len(body) - 1 != n_signals:
        raise _fail(path, f"record line announces {n_signals} signals, found {len(body) - 1}")
    parsed = [_parse_signal_line(path, ln) for ln in body[1:]]
    files = {file for file, _ in parsed}
    if len(files) != 1:
        raise _fail(path, f"signals spread over several files {sorted(files)}")
    dx = tuple(code.strip() for code in comments.get("dx", "").split(",") if code.strip())
    sex = comments.get("sex") or None
    return PhysioNetHeader(
        record_name=name, fs=fs, n_samples=n_samples, signal_file=files.pop(),
        signals=tuple(spec for _, spec in parsed), dx_codes=dx,
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


def _millivolt_factor(path: Path, units: str) -> float:
    try:
        return TO_MILLIVOLT[units.lower()]
    except KeyError:
        raise _fail(path, f"unsupported signal units {units!r}") from None


def _load_val_matrix(mat_path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(mat_path)
    except Exception as exc:  # scipy raises several types for a corrupt file
        raise _fail(mat_path, f"cannot read MATLAB file ({exc})") from None
    if "val" not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise _fail(mat_path, f"no 'val' matrix (keys: {keys})")
    val = np.asarray(content["val"])
    if val.ndim != 2 or not np.issubdtype(val.dtype, np.number):
        raise _fail(mat_path, f"'val' must be a 2-D numeric matrix, got {val.dtype} {val.shape}")
    return val


def load_physionet_signal(path: str | Path) -> tuple[np.ndarray, float]:
    """Load one record as ``(signal, fs)``: float32 (12, T) in mV, canonical lead order.

    ``path`` may be the ``.hea``, the ``.mat`` or the record path without suffix.
    Physical value = (adc - baseline) / gain, converted to mV from the header's units.
    """
    header_path = _header_path(path)
    header = read_physionet_header(header_path)
    mat_path = header_path.parent / header.signal_file
    val = _load_val_matrix(mat_path)
    expected = (len(header.signals), header.n_samples)
    if val.shape != expected:
        raise _fail(mat_path, f"'val' has shape {val.shape}, header says {expected}")
    rows = _canonical_lead_rows(header_path, [s.lead for s in header.signals])
    specs = [header.signals[r] for r in rows]
    gain = np.array([s.gain for s in specs])[:, None]
    baseline = np.array([s.baseline for s in specs])[:, None]
    to_mv = np.array([_millivolt_factor(header_path, s.units) for s in specs])[:, None]
    signal = (val[rows].astype(np.float64) - baseline) / gain * to_mv
    return signal.astype(np.float32), header.fs
