"""Roots: the bundled sample, layout detection, clear errors, the subject split."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest

from melp_ray.data.sources import DataRootError, bundled_root, detect_layout, list_records, split_for_subject


def test_bundled_sample_is_complete(bundled_ptbxl):
    assert bundled_ptbxl == type(bundled_ptbxl)(bundled_root())
    for name in ("ptbxl_database.csv", "scp_statements.csv", "LICENSE.txt", "README.md"):
        assert (bundled_ptbxl / name).is_file()
    assert len(list((bundled_ptbxl / "records100").rglob("*_lr.hea"))) == 259
    assert len(list((bundled_ptbxl / "records100").rglob("*_lr.dat"))) == 259
    assert not (bundled_ptbxl / "records500").exists()
    assert detect_layout(bundled_ptbxl) == "ptb-xl"


def test_missing_root_message(tmp_path):
    with pytest.raises(DataRootError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    with pytest.raises(DataRootError, match="not a known layout.*ptbxl_database.csv.*record_list.csv"):
        detect_layout(tmp_path)


def test_malformed_csv_message(tmp_path, bundled_ptbxl):
    root = tmp_path / "ptb"
    root.mkdir()
    shutil.copy(bundled_ptbxl / "scp_statements.csv", root)
    (root / "ptbxl_database.csv").write_text("ecg_id,patient_id,report\n1,2,hello\n")
    missing = r"lacks columns \['scp_codes', 'strat_fold', 'filename_lr', 'filename_hr'\]"
    with pytest.raises(DataRootError, match=missing):
        list_records("ptb-xl", root)
    (root / "scp_statements.csv").unlink()
    shutil.copy(bundled_ptbxl / "ptbxl_database.csv", root)
    with pytest.raises(DataRootError, match="has no scp_statements.csv"):
        list_records("ptb-xl", root)


def test_malformed_mimic_csv_message(tmp_path):
    (tmp_path / "record_list.csv").write_text("subject_id,study_id,file_name\n1,2,3\n")
    with pytest.raises(DataRootError, match=r"record_list.csv lacks columns \['path'\]"):
        list_records("mimic-iv-ecg", tmp_path)


def test_wrong_dataset_for_root(bundled_ptbxl):
    with pytest.raises(DataRootError, match="looks like 'ptb-xl', not 'mimic-iv-ecg'"):
        list_records("mimic-iv-ecg", bundled_ptbxl)


def test_split_is_deterministic_and_roughly_the_fraction():
    subjects = [str(10000000 + i) for i in range(4000)]
    sides = [split_for_subject(s, 0.1) for s in subjects]
    assert sides == [split_for_subject(s, 0.1) for s in subjects]
    assert 300 < Counter(sides)["val"] < 500
    assert sides != [split_for_subject(s, 0.1, seed=1) for s in subjects]
    assert {split_for_subject(s, 0.0) for s in subjects} == {"train"}


def test_limit_keeps_the_first_records(bundled_ptbxl):
    assert [r.record_id for r in list_records("ptb-xl", bundled_ptbxl, limit=5)] == ["1", "2", "3", "4", "5"]
