"""MIMIC-IV-ECG: the report rules, and the reader on a fixture in the real layout."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import wfdb

from melp_ray.data import mimic
from melp_ray.data.leads import LEADS
from mimic_fixture import MIMIC_LEAD_ORDER, write_mimic_fixture
from melp_ray.data.records import load_signal
from melp_ray.data.sources import detect_layout, list_records, scan_records


@pytest.mark.parametrize("statements, report", [
    (["Sinus rhythm", "Normal ECG"], "sinus rhythm. normal ecg."),
    (["Sinus rhythm", "", None, float("nan"), "Abnormal EKG"], "sinus rhythm. abnormal ecg."),
    (["*** Poor data quality ***", "Sinus  rhythm\t"], "poor data quality. sinus rhythm."),
    (["Left axis deviation =-", "= Repolarization abnormality"], "left axis deviation. repolarization abnormality."),
    (["Borderline ECG."], "borderline ecg."),
    (["ekg changes"], "ecg changes."),
    (["", "***", "  "], ""),
    ([], ""),
])
def test_report_rules(statements, report):
    assert mimic.build_report(statements) == report


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_mimic_fixture(tmp_path_factory.mktemp("mimic"), n_studies=7)


def test_fixture_has_the_real_layout(fixture):
    root = fixture.root
    assert detect_layout(root) == "mimic-iv-ecg"
    with open(root / "record_list.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["subject_id", "study_id", "file_name", "ecg_time", "path"]
    assert rows[0]["path"] == "files/p1000/p10000032/s40689238/40689238"
    with open(root / "machine_measurements.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert [f"report_{i}" for i in range(18)] == [c for c in header if c.startswith("report_")]
    record = wfdb.rdrecord(str(root / rows[0]["path"]))
    assert (record.fs, record.sig_len, record.sig_name) == (500, 5000, list(MIMIC_LEAD_ORDER))


def test_reader_builds_reports_and_maps_leads(fixture, bundled_ptbxl):
    listing = scan_records("mimic-iv-ecg", fixture.root)
    # default statement 0 is ("Sinus rhythm", "Normal ECG"): 4 words, kept
    assert listing.rejected == {} and len(listing.refs) == 7
    first = listing.refs[0]
    assert (first.record_id, first.subject_id, first.dataset) == ("40689238", "10000032", "mimic-iv-ecg")
    assert first.report == "sinus rhythm. normal ecg."
    assert first.strat_fold == -1 and first.labels == {"super": [], "sub": [], "form": [], "rhythm": []}
    # the waveform came from PTB-XL record 1 in MIMIC order; loaded back in canonical order
    signal = load_signal(first, fixture.root, sample_rate=100, seconds=10)
    source, meta = wfdb.rdsamp(str(bundled_ptbxl / "records100/00000/00001_lr"))
    assert [name.upper() for name in meta["sig_name"]] == [name.upper() for name in LEADS]
    # up- then down-sampling is exact away from the edges (filter transients), at gain 200
    np.testing.assert_allclose(signal[:, 20:-20], source.T[:, 20:-20], atol=0.02)


def test_listing_is_sorted_by_subject_then_study(fixture):
    refs = list_records("mimic-iv-ecg", fixture.root)
    keys = [(int(r.subject_id), int(r.record_id)) for r in refs]
    assert keys == sorted(keys)
    assert len({r.subject_id for r in refs}) < len(refs)     # some subjects have two studies


def test_min_report_words(fixture):
    listing = scan_records("mimic-iv-ecg", fixture.root, min_report_words=6)
    assert set(listing.rejected) == {"short_report"}
    assert listing.n_input == 7
