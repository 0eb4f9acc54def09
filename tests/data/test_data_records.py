"""RecordRef rows, report checks, and load_signal's validation rules on real WFDB files."""
from __future__ import annotations

import numpy as np
import pytest
import wfdb

from melp_ray.data import rejections
from melp_ray.data.leads import LEADS
from mimic_fixture import write_wfdb
from melp_ray.data.records import RecordRef, check_report, load_signal
from melp_ray.data.rejections import RecordRejected

PTBXL_RECORD = "records100/00000/00001_lr"


def test_row_round_trip():
    ref = RecordRef("77", "8555", "ptb-xl", "records100/00000/00077_lr", "sinusrhythmus", 4,
                    {"super": ["CD", "MI"], "sub": ["AMI", "IRBBB"], "form": [], "rhythm": ["SR"]})
    row = ref.to_row()
    assert row["labels_super"] == ["CD", "MI"] and row["strat_fold"] == 4
    assert RecordRef.from_row(row) == ref
    assert RecordRef.from_row({**row, "labels_sub": np.array(["AMI", "IRBBB"])}) == ref


def test_check_report():
    assert check_report("  sinus rhythm. normal ecg. ", 4) == "sinus rhythm. normal ecg."
    for empty in ("", "   ", None, float("nan"), " . , . ", "-- ; --"):
        with pytest.raises(RecordRejected) as info:
            check_report(empty, 1)
        assert info.value.reason == rejections.EMPTY_REPORT
    with pytest.raises(RecordRejected) as info:
        check_report("normal ecg.", 4)
    assert info.value.reason == rejections.SHORT_REPORT
    assert check_report("sinusrytm. Ök. qrs(t).", 3) == "sinusrytm. Ök. qrs(t)."  # any letters count


def test_unknown_reason_is_a_bug():
    with pytest.raises(ValueError):
        RecordRejected("something_else")


def test_bundled_record_is_resampled_to_500hz(bundled_ptbxl):
    ref = RecordRef("1", "15709", "ptb-xl", PTBXL_RECORD, "x")
    signal = load_signal(ref, bundled_ptbxl, sample_rate=500, seconds=10)
    assert signal.shape == (12, 5000) and signal.dtype == np.float32 and signal.flags.c_contiguous
    native, meta = wfdb.rdsamp(str(bundled_ptbxl / PTBXL_RECORD))
    assert meta["units"] == ["mV"] * 12
    # every 5th sample of the polyphase upsampling sits on an original sample (up to filter ripple)
    np.testing.assert_allclose(signal[:, 100:900:5], native[20:180].T, atol=0.05)
    same_rate = load_signal(ref, bundled_ptbxl, sample_rate=100, seconds=10)
    np.testing.assert_allclose(same_rate, native.T.astype(np.float32), atol=1e-6)


def test_longer_record_is_cropped_from_the_start(bundled_ptbxl):
    ref = RecordRef("1", "15709", "ptb-xl", PTBXL_RECORD, "x")
    native, _ = wfdb.rdsamp(str(bundled_ptbxl / PTBXL_RECORD))
    cropped = load_signal(ref, bundled_ptbxl, sample_rate=100, seconds=2.5)
    np.testing.assert_allclose(cropped, native[:250].T, atol=1e-6)


def _write(tmp_path, signal, names=LEADS, fs=100, name="rec"):
    write_wfdb(tmp_path / name, signal, names, fs=fs)
    return RecordRef(name, "s", "test", name, "report text")


def _reason(ref, root, **kwargs):
    with pytest.raises(RecordRejected) as info:
        load_signal(ref, root, **kwargs)
    return info.value.reason


def _real_signal(bundled_ptbxl):
    return wfdb.rdsamp(str(bundled_ptbxl / PTBXL_RECORD))[0]


def test_one_flat_lead_is_kept_all_flat_is_rejected(tmp_path, bundled_ptbxl):
    signal = _real_signal(bundled_ptbxl)
    signal[:, 3] = 0.0
    loaded = load_signal(_write(tmp_path, signal, name="one_flat"), tmp_path, sample_rate=100, seconds=10)
    assert np.all(loaded[3] == 0.0)
    constant = np.full_like(signal, 0.25)        # constant but not zero is flat too
    assert _reason(_write(tmp_path, constant, name="flat"), tmp_path, sample_rate=100) == rejections.FLAT_SIGNAL


def test_rejections_on_real_files(tmp_path, bundled_ptbxl):
    signal = _real_signal(bundled_ptbxl)
    with_nan = signal.copy()
    with_nan[10:20, 7] = np.nan
    assert _reason(_write(tmp_path, with_nan, name="nan"), tmp_path) == rejections.NAN_OR_INF
    assert _reason(_write(tmp_path, signal[:900], name="short"), tmp_path) == rejections.WRONG_LENGTH
    duplicated = _write(tmp_path, signal, name="dup")
    header = tmp_path / "dup.hea"                # wrsamp refuses duplicates: rename V4 -> V2 by hand
    header.write_text(header.read_text().replace(" V4\n", " V2\n"))
    assert _reason(duplicated, tmp_path) == rejections.MISSING_LEADS
    missing = RecordRef("nope", "s", "test", "does/not/exist", "x")
    assert _reason(missing, tmp_path) == rejections.MISSING_FILE
    (tmp_path / "garbage.hea").write_text("%% not a header\n12 x y z\n")
    assert _reason(RecordRef("g", "s", "test", "garbage", "x"), tmp_path) == rejections.BAD_HEADER


def test_microvolt_units_are_converted(tmp_path, bundled_ptbxl):
    signal = _real_signal(bundled_ptbxl)
    wfdb.wrsamp("uv", fs=100, units=["uV"] * 12, sig_name=list(LEADS), p_signal=signal * 1000,
                fmt=["16"] * 12, adc_gain=[1.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    loaded = load_signal(RecordRef("uv", "s", "test", "uv", "x"), tmp_path, sample_rate=100)
    np.testing.assert_allclose(loaded, signal.T, atol=0.001)
