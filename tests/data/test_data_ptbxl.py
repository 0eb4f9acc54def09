"""PTB-XL reader on the real bundled records: labels, class lists, file choice."""
from __future__ import annotations

import ast
import csv

import pytest

from melp_ray.data import ptbxl
from melp_ray.data.records import load_signal
from melp_ray.data.sources import list_records, scan_records


@pytest.fixture(scope="module")
def refs_by_id(bundled_ptbxl):
    return {ref.record_id: ref for ref in ptbxl.list_ptbxl(bundled_ptbxl, sample_rate=500)}


# Worked out by hand from ptbxl_database.csv x scp_statements.csv:
#  77:  AMI(MI/AMI) IRBBB(CD/IRBBB) SR(rhythm)
#  103: IMI(MI/IMI) LAFB(CD/LAFB/LPFB) ABQRS(form) STACH(rhythm)
#  282: ASMI(MI/AMI) ILBBB(CD/ILBBB) LVH(HYP/LVH) ISC_(STTC/ISC_) PVC(form) AFIB(rhythm, likelihood 0)
#  1:   NORM(NORM/NORM) LVOLT(form, likelihood 0) SR(rhythm, likelihood 0)
EXPECTED = {
    "77": {"super": ["CD", "MI"], "sub": ["AMI", "IRBBB"], "form": [], "rhythm": ["SR"]},
    "103": {"super": ["CD", "MI"], "sub": ["IMI", "LAFB/LPFB"], "form": ["ABQRS"], "rhythm": ["STACH"]},
    "282": {"super": ["CD", "HYP", "MI", "STTC"], "sub": ["AMI", "ILBBB", "ISC_", "LVH"],
            "form": ["PVC"], "rhythm": ["AFIB"]},
    "1": {"super": ["NORM"], "sub": ["NORM"], "form": ["LVOLT"], "rhythm": ["SR"]},
}


@pytest.mark.parametrize("ecg_id", sorted(EXPECTED))
def test_known_labels(refs_by_id, ecg_id):
    assert refs_by_id[ecg_id].labels == EXPECTED[ecg_id]


def test_labels_match_an_independent_join(bundled_ptbxl, refs_by_id):
    """Every record: recompute the label sets with the csv module alone."""
    with open(bundled_ptbxl / "scp_statements.csv", newline="") as handle:
        statements = {row[""]: row for row in csv.DictReader(handle)}
    with open(bundled_ptbxl / "ptbxl_database.csv", newline="") as handle:
        database = list(csv.DictReader(handle))
    assert len(database) == len(refs_by_id) == 259
    for row in database:
        codes = [c for c in ast.literal_eval(row["scp_codes"]) if c in statements]
        diagnostic = [statements[c] for c in codes if statements[c]["diagnostic"] == "1.0"]
        expected = {
            "super": sorted({s["diagnostic_class"] for s in diagnostic}),
            "sub": sorted({s["diagnostic_subclass"] for s in diagnostic}),
            "form": sorted(c for c in codes if statements[c]["form"] == "1.0"),
            "rhythm": sorted(c for c in codes if statements[c]["rhythm"] == "1.0"),
        }
        ref = refs_by_id[row["ecg_id"]]
        assert ref.labels == expected, row["ecg_id"]
        assert ref.subject_id == str(int(float(row["patient_id"])))
        assert ref.strat_fold == int(row["strat_fold"])


def test_superclass_counts_match_the_data_readme(refs_by_id):
    counts = {name: sum(name in ref.labels["super"] for ref in refs_by_id.values()) for name in ptbxl.SUPERCLASSES}
    assert counts == {"NORM": 166, "CD": 41, "STTC": 40, "MI": 35, "HYP": 19}


def test_class_lists_and_descriptions(bundled_ptbxl):
    assert ptbxl.SUPERCLASSES == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert len(ptbxl.subclasses(bundled_ptbxl)) == 23
    assert len(ptbxl.form_classes(bundled_ptbxl)) == 19
    rhythm = ptbxl.rhythm_classes(bundled_ptbxl)
    assert len(rhythm) == 12 and rhythm == sorted(rhythm) and "AFIB" in rhythm
    for task in ptbxl.TASKS:
        descriptions = ptbxl.class_descriptions(task, bundled_ptbxl)
        assert list(descriptions) == ptbxl.class_names(task, bundled_ptbxl)
        assert all(text.strip() for text in descriptions.values())
    assert ptbxl.class_descriptions("rhythm", bundled_ptbxl)["AFIB"] == "atrial fibrillation"
    assert ptbxl.class_descriptions("super", bundled_ptbxl)["MI"] == "myocardial infarction"


def test_bundled_root_falls_back_to_100hz_files(bundled_ptbxl, refs_by_id):
    assert all(ref.path.startswith("records100/") for ref in refs_by_id.values())
    assert load_signal(refs_by_id["1"], bundled_ptbxl, 500, 10).shape == (12, 5000)


def test_file_choice_follows_the_rate(bundled_ptbxl, tmp_path):
    """With both rates on disk, 500 Hz reads the *_hr files and 100 Hz the *_lr files."""
    import shutil

    import numpy as np
    import pandas as pd
    import wfdb

    root = tmp_path / "ptb-xl"
    shutil.copytree(bundled_ptbxl, root)
    database = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    for ecg_id in database.index[:3]:   # real 500 Hz files: the 100 Hz signal upsampled x5
        signal, fields = wfdb.rdsamp(str(root / database.loc[ecg_id, "filename_lr"]))
        hr = root / database.loc[ecg_id, "filename_hr"]
        hr.parent.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(hr.name, fs=500, units=fields["units"], sig_name=fields["sig_name"],
                    p_signal=np.repeat(signal, 5, axis=0), fmt=["16"] * 12, write_dir=str(hr.parent))
    at_500 = list_records("ptb-xl", root, limit=3, sample_rate=500)
    at_100 = list_records("ptb-xl", root, limit=3, sample_rate=100)
    assert all(ref.path.endswith("_hr") for ref in at_500)
    assert all(ref.path.endswith("_lr") for ref in at_100)
    assert load_signal(at_500[0], root, 500, 10).shape == (12, 5000)


def test_blank_report_is_rejected_at_listing(bundled_ptbxl):
    listing = scan_records("ptb-xl", bundled_ptbxl)
    assert listing.rejected == {"empty_report": ["443"]}
    assert listing.n_input == 259 and len(listing.refs) == 258
    assert [ref.record_id for ref in listing.refs] == sorted((ref.record_id for ref in listing.refs), key=int)
