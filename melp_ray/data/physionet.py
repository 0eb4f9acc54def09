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

``#Dx`` holds SNOMED CT codes. The signal is returned in the canonical lead order, mapped
by lead name (case-insensitive), in mV, float32. The Challenge files are MAT v4 (hence the
``+24`` byte offset in the format field); ``scipy.io.loadmat`` reads v4 and v5 alike.

Label sets
----------
* CPSC2018: the challenge's 9 classes. The Challenge 2020/2021 releases re-coded them with
  SNOMED CT; ``CPSC2018_CODES`` lists, per class, the code used in those releases plus the
  codes the Challenge scoring treats as equivalent (e.g. CRBBB 713427006 for RBBB, VPB
  17338001 / PVC 427172004 for the CPSC "ventricular ectopics" 164884008), so a record
  coded either way gets the same label.
* Chapman-Shaoxing: the MELP reference publishes its 38 classes (the dataset's acronyms,
  ``AQW``, ``SR``, ... in its ``prompt/dataset_class_names.json``) and their labels (its
  split CSVs ``data_split/chapman/chapman_{train,val,test}.csv``); ``melp_ray.evaluate``
  uses them with ``--class-names`` and ``--split-dir``. Without those files,
  ``frequent_dx_classes`` takes the SNOMED codes present in at least ``min_count`` records
  of the data at hand (documented, deterministic order); pass the resulting list around
  explicitly so train and test use the same classes.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # the shared lead definition (written concurrently by the data layer)
    from melp_ray.data.leads import LEADS as _CANONICAL_LEADS
except ImportError:  # pragma: no cover - only while melp_ray.data.leads does not exist yet
    _CANONICAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF",
                        "V1", "V2", "V3", "V4", "V5", "V6")

CANONICAL_LEADS: tuple[str, ...] = tuple(_CANONICAL_LEADS)


class PhysioNetFormatError(ValueError):
    """A header or .mat file that does not follow the Challenge layout."""


# --------------------------------------------------------------------------- label sets

CPSC2018_CLASSES: tuple[str, ...] = ("NORM", "AF", "I-AVB", "LBBB", "RBBB",
                                     "PAC", "PVC", "STD", "STE")

CPSC2018_CODES: dict[str, frozenset[str]] = {
    "NORM": frozenset({"426783006"}),                          # sinus rhythm
    "AF": frozenset({"164889003"}),                            # atrial fibrillation
    "I-AVB": frozenset({"270492004"}),                         # 1st degree AV block
    "LBBB": frozenset({"164909002", "733534002"}),             # (complete) LBBB
    "RBBB": frozenset({"59118001", "713427006"}),              # (complete) RBBB
    "PAC": frozenset({"284470004", "63593006"}),               # PAC / SV premature beats
    "PVC": frozenset({"164884008", "427172004", "17338001"}),  # V ectopics / PVC / VPB
    "STD": frozenset({"429622005"}),                           # ST depression
    "STE": frozenset({"164931005"}),                           # ST elevation
}

CPSC2018_DESCRIPTIONS: dict[str, str] = {
    "NORM": "normal sinus rhythm",
    "AF": "atrial fibrillation",
    "I-AVB": "first degree atrioventricular block",
    "LBBB": "left bundle branch block",
    "RBBB": "right bundle branch block",
    "PAC": "premature atrial contraction",
    "PVC": "premature ventricular contraction",
    "STD": "st segment depression",
    "STE": "st segment elevation",
}

# SNOMED CT code -> description, for the Challenge codes common in CPSC2018 and
# Chapman-Shaoxing (wording after the Challenge's diagnosis mapping tables). Used to build
# zero-shot prompts; a code missing here needs a user prompt file.
SNOMED_DESCRIPTIONS: dict[str, str] = {
    "426783006": "sinus rhythm",
    "426177001": "sinus bradycardia",
    "427084000": "sinus tachycardia",
    "427393009": "sinus arrhythmia",
    "164889003": "atrial fibrillation",
    "164890007": "atrial flutter",
    "426761007": "supraventricular tachycardia",
    "713422000": "atrial tachycardia",
    "233896004": "atrioventricular node reentrant tachycardia",
    "233897008": "atrioventricular reentrant tachycardia",
    "426627000": "bradycardia",
    "10370003": "pacing rhythm",
    "270492004": "first degree atrioventricular block",
    "195042002": "second degree atrioventricular block",
    "54016002": "mobitz type i wenckebach atrioventricular block",
    "27885002": "complete heart block",
    "6374002": "bundle branch block",
    "164909002": "left bundle branch block",
    "733534002": "complete left bundle branch block",
    "59118001": "right bundle branch block",
    "713427006": "complete right bundle branch block",
    "713426002": "incomplete right bundle branch block",
    "445118002": "left anterior fascicular block",
    "698252002": "nonspecific intraventricular conduction disorder",
    "74390002": "wolff parkinson white pattern",
    "284470004": "premature atrial contraction",
    "63593006": "supraventricular premature beats",
    "427172004": "premature ventricular contractions",
    "17338001": "ventricular premature beats",
    "164884008": "ventricular ectopics",
    "11157007": "ventricular bigeminy",
    "251180001": "ventricular trigeminy",
    "39732003": "left axis deviation",
    "47665007": "right axis deviation",
    "251146004": "low qrs voltages",
    "164873001": "left ventricular hypertrophy",
    "89792004": "right ventricular hypertrophy",
    "164947007": "prolonged pr interval",
    "111975006": "prolonged qt interval",
    "164917005": "q wave abnormal",
    "164934002": "t wave abnormal",
    "59931005": "t wave inversion",
    "429622005": "st depression",
    "164931005": "st elevation",
    "55930002": "st changes",
    "428750005": "nonspecific st t abnormality",
    "164865005": "myocardial infarction",
    "164861001": "myocardial ischemia",
    "365413008": "poor r wave progression",
    "428417006": "early repolarization",
}


def labels_from_codes(dx_codes: Iterable[str], classes: Sequence[str],
                      code_groups: Mapping[str, Iterable[str]] | None = None) -> np.ndarray:
    """Multi-hot float32 vector over ``classes`` for one record's SNOMED codes.

    ``code_groups`` maps a class to the codes that count as it (``CPSC2018_CODES``);
    without it each class *is* a code (the Chapman-Shaoxing setup).
    """
    codes = set(dx_codes)
    out = np.zeros(len(classes), dtype=np.float32)
    for i, cls in enumerate(classes):
        members = set(code_groups[cls]) if code_groups is not None else {cls}
        out[i] = float(bool(codes & members))
    return out


def cpsc2018_labels(dx_codes: Iterable[str]) -> np.ndarray:
    """(9,) multi-hot over ``CPSC2018_CLASSES``."""
    return labels_from_codes(dx_codes, CPSC2018_CLASSES, CPSC2018_CODES)


def frequent_dx_classes(records: Iterable[PhysioNetRecord], min_count: int = 10
                        ) -> list[str]:
    """SNOMED codes present in at least ``min_count`` records, most frequent first.

    Ties are ordered by code so the list is deterministic. Our default Chapman-Shaoxing
    label list; the reference's 38 acronym classes come from its class-names file and
    split CSVs instead (``melp_ray.eval.class_lists``, ``--split-dir``).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = Counter(code for rec in records for code in set(rec.dx_codes))
    frequent = [code for code, n in counts.items() if n >= min_count]
    return sorted(frequent, key=lambda code: (-counts[code], code))


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


_TO_MILLIVOLT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}


def _millivolt_factor(path: Path, units: str) -> float:
    try:
        return _TO_MILLIVOLT[units.lower()]
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
