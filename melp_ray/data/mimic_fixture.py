"""Write a tiny MIMIC-IV-ECG root, in the real layout, from real PTB-XL waveforms.

For tests and smoke runs: MIMIC-IV-ECG itself needs credentialed access, so this builds
the same files from the bundled PTB-XL sample (100 Hz, resampled to MIMIC's 500 Hz)::

    DEST/record_list.csv            subject_id, study_id, file_name, ecg_time, path
    DEST/machine_measurements.csv   subject_id, study_id, cart_id, machine, ecg_time,
                                    report_0 .. report_17, bandwidth, filtering, ...
    DEST/files/p1000/p10000032/s40689238/40689238.hea/.dat
                                    WFDB format 16, 500 Hz, 5000 samples, gain 200/mV,
                                    leads I, II, III, aVR, aVF, aVL, V1..V6 (MIMIC order)

``break_record`` damages one written study in a named way, to exercise each rejection.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from melp_ray.data.leads import LEADS

MIMIC_LEAD_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
FS = 500
N_SAMPLES = 5000
ADC_GAIN = 200.0   # MIMIC-IV-ECG stores 200 ADC units per mV

# Typical machine statements (report_0 ...), including the decorations the rules remove.
DEFAULT_STATEMENTS: tuple[tuple[str, ...], ...] = (
    ("Sinus rhythm", "Normal ECG"),
    ("Sinus tachycardia", "Possible left atrial abnormality", "Borderline ECG"),
    ("*** Poor data quality, interpretation may be adversely affected", "Sinus rhythm", "Abnormal EKG"),
    ("Atrial fibrillation", "Low QRS voltages in limb leads", "", "Abnormal ECG"),
    ("Sinus bradycardia", "Left axis deviation =-", "Inferior infarct - age undetermined"),
    ("Sinus rhythm", "Left ventricular hypertrophy", "= Repolarization abnormality", "Abnormal ECG"),
)

MEASUREMENT_COLUMNS = ("bandwidth", "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset",
                       "qrs_end", "t_end", "p_axis", "qrs_axis", "t_axis")


@dataclass
class Study:
    subject_id: int
    study_id: int
    statements: tuple[str, ...]
    source_record: str                      # PTB-XL record the waveform came from

    @property
    def path(self) -> str:
        """record_list.csv ``path``: files/p<first 4 digits>/p<subject>/s<study>/<study>."""
        return f"files/p{str(self.subject_id)[:4]}/p{self.subject_id}/s{self.study_id}/{self.study_id}"


@dataclass
class MimicFixture:
    root: Path
    studies: list[Study] = field(default_factory=list)

    def study(self, study_id: int | str) -> Study:
        return next(s for s in self.studies if str(s.study_id) == str(study_id))


def _ptbxl_waveforms(source_root: str | os.PathLike, count: int) -> list[tuple[str, np.ndarray]]:
    """The first ``count`` PTB-XL 100 Hz records, resampled to 500 Hz, as (name, (5000, 12) in LEADS order)."""
    import wfdb
    from scipy.signal import resample_poly

    from melp_ray.data.leads import lead_indices

    folder = Path(source_root) / "records100" / "00000"
    names = sorted(p.stem for p in folder.glob("*_lr.hea"))[:count]
    waveforms = []
    for name in names:
        signal, meta = wfdb.rdsamp(str(folder / name))
        signal = signal[:, lead_indices(meta["sig_name"])]
        waveforms.append((name, resample_poly(signal, FS // int(meta["fs"]), 1, axis=0)[:N_SAMPLES]))
    return waveforms


def write_wfdb(record_path: str | os.PathLike, signal: np.ndarray, lead_names, fs: int = FS) -> None:
    """Write a (samples, leads) mV signal as WFDB format 16 with MIMIC's gain."""
    import wfdb

    record_path = Path(record_path)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    n_leads = signal.shape[1]
    wfdb.wrsamp(record_path.name, fs=fs, units=["mV"] * n_leads, sig_name=list(lead_names),
                p_signal=np.asarray(signal, dtype=np.float64), fmt=["16"] * n_leads,
                adc_gain=[ADC_GAIN] * n_leads, baseline=[0] * n_leads, write_dir=str(record_path.parent))


def write_mimic_fixture(dest: str | os.PathLike, n_studies: int = 8, source_root: str | os.PathLike | None = None,
                        statements: list[tuple[str, ...]] | None = None) -> MimicFixture:
    """Write ``n_studies`` studies; every third subject has two studies (to test the split)."""
    from melp_ray.data.sources import bundled_root

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    waveforms = _ptbxl_waveforms(source_root or bundled_root(), n_studies)
    if len(waveforms) < n_studies:
        raise ValueError(f"only {len(waveforms)} source records for {n_studies} studies")
    fixture = MimicFixture(root=dest)
    subject_id = 10000032
    for i, (source_name, signal) in enumerate(waveforms):
        if i and i % 3 != 1:           # studies 1+2, 4+5, ... share a subject
            subject_id += 7
        study = Study(subject_id=subject_id, study_id=40689238 + 1013 * i,
                      statements=tuple(statements[i] if statements
                                       else DEFAULT_STATEMENTS[i % len(DEFAULT_STATEMENTS)]),
                      source_record=source_name)
        order = [LEADS.index(name) for name in MIMIC_LEAD_ORDER]
        write_wfdb(dest / study.path, signal[:, order], MIMIC_LEAD_ORDER)
        fixture.studies.append(study)
    write_csvs(fixture)
    return fixture


def write_csvs(fixture: MimicFixture) -> None:
    """(Re)write record_list.csv and machine_measurements.csv for ``fixture.studies``."""
    with open(fixture.root / "record_list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "study_id", "file_name", "ecg_time", "path"])
        for i, s in enumerate(fixture.studies):
            ecg_time = f"2180-07-{1 + i % 28:02d} 08:{i % 60:02d}:00"
            writer.writerow([s.subject_id, s.study_id, s.study_id, ecg_time, s.path])
    with open(fixture.root / "machine_measurements.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "study_id", "cart_id", "machine", "ecg_time",
                         *[f"report_{k}" for k in range(18)], *MEASUREMENT_COLUMNS])
        for i, s in enumerate(fixture.studies):
            reports = list(s.statements) + [""] * (18 - len(s.statements))
            writer.writerow([s.subject_id, s.study_id, 6848, "TC50", f"2180-07-{1 + i % 28:02d} 08:{i % 60:02d}:00",
                             *reports, "0.005-150 Hz", "60 Hz notch Baseline filter", 659, 40, 128, 170, 258, 518,
                             81, 77, 79])


# ---------------------------------------------------------------- deliberate damage
BREAKAGES = ("missing_file", "unreadable", "bad_header", "nan_or_inf", "flat_signal", "missing_leads",
             "wrong_length", "bad_sample_rate", "empty_report", "short_report")


def break_record(fixture: MimicFixture, study_id: int | str, how: str) -> None:
    """Damage one study so that loading it is rejected for reason ``how`` (see BREAKAGES)."""
    import wfdb

    study = fixture.study(study_id)
    record = fixture.root / study.path
    signal, _ = wfdb.rdsamp(str(record))          # (5000, 12), MIMIC order
    if how == "missing_file":
        os.remove(f"{record}.dat")
    elif how == "unreadable":                     # truncated .dat, cut mid-sample
        data = Path(f"{record}.dat").read_bytes()
        Path(f"{record}.dat").write_bytes(data[: len(data) // 2 + 1])
    elif how == "bad_header":
        Path(f"{record}.hea").write_text("this is not a WFDB header\n%%% garbage\n")
    elif how == "nan_or_inf":                     # NaN is stored as format 16's invalid sample value
        signal[100:200, 3] = np.nan
        write_wfdb(record, signal, MIMIC_LEAD_ORDER)
    elif how == "flat_signal":
        write_wfdb(record, np.zeros_like(signal), MIMIC_LEAD_ORDER)
    elif how == "missing_leads":                  # V4 dropped
        keep = [i for i, name in enumerate(MIMIC_LEAD_ORDER) if name != "V4"]
        write_wfdb(record, signal[:, keep], [MIMIC_LEAD_ORDER[i] for i in keep])
    elif how == "wrong_length":                   # 8 s instead of 10 s
        write_wfdb(record, signal[: FS * 8], MIMIC_LEAD_ORDER)
    elif how == "bad_sample_rate":                # 500 Hz -> 499.5 Hz in the record line
        header = Path(f"{record}.hea")
        first, rest = header.read_text().split("\n", 1)
        parts = first.split()
        parts[2] = "499.5"
        header.write_text(" ".join(parts) + "\n" + rest)
    elif how == "empty_report":
        study.statements = ("", "  ", "***")
        write_csvs(fixture)
    elif how == "short_report":
        study.statements = ("Normal ECG",)
        write_csvs(fixture)
    else:
        raise ValueError(f"unknown breakage {how!r}; expected one of {BREAKAGES}")
