"""--split-dir: records and labels from the reference's split CSVs (files written here in
its layout over the bundled PTB-XL sample and the Challenge-layout fixture)."""
from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from melp_ray.data.ptbxl import read_database
from melp_ray.eval_plan.plan import EvalError, build_plan
from melp_ray.eval.splits import SplitFileError, read_split_csv

PTBXL_META = ["ecg_id", "patient_id", "strat_fold", "filename_lr", "filename_hr", "super_class"]
CLASSES = ["HYP", "NORM", "MI", "CD", "STTC"]


def _write_csv(path, header, rows, blank_first_line=False):
    with open(path, "w", newline="") as f:
        if blank_first_line:
            f.write("\n")
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _ptbxl_rows(bundled_ptbxl, ids, seed):
    """Rows for these ecg_ids with labels drawn at random: they differ from PTB-XL's own, so
    labels equal to them can only come from the file."""
    rng = np.random.default_rng(seed)
    database = read_database(bundled_ptbxl).set_index("ecg_id")
    rows = []
    for ecg_id in ids:
        meta = database.loc[ecg_id]
        labels = rng.integers(0, 2, len(CLASSES)).tolist()
        rows.append([ecg_id, meta["patient_id"], meta["strat_fold"], meta["filename_lr"],
                     meta["filename_hr"], "[]", *labels])
    return rows


@pytest.fixture
def ptbxl_split_dir(tmp_path, bundled_ptbxl):
    folder = tmp_path / "super_class"
    folder.mkdir()
    ids = read_database(bundled_ptbxl)["ecg_id"].astype(int).tolist()
    parts = {"train": ids[:40], "val": ids[40:60], "test": ids[60:75]}
    for seed, (split, chosen) in enumerate(parts.items()):
        rows = _ptbxl_rows(bundled_ptbxl, chosen, seed)
        if split == "test":  # one record not under --root, one without any label
            rows.append([99999, 1.0, 10, "records100/99000/99999_lr", "records500/99000/99999_hr",
                         "[]", 0, 1, 0, 0, 0])
            rows[0][-len(CLASSES):] = [0] * len(CLASSES)
        _write_csv(folder / f"ptbxl_super_class_{split}.csv", PTBXL_META + CLASSES, rows)
    return folder


def _file_records(path):
    table = read_split_csv(path, "ptb-xl")
    return [(str(r.metadata["ecg_id"]), r.labels.tolist()) for r in table.rows]


def test_records_and_labels_are_those_of_the_files(plan_args, ptbxl_split_dir, bundled_ptbxl):
    plan = build_plan(plan_args("--mode", "linear", "--split-dir", str(ptbxl_split_dir)))
    assert plan.class_names == CLASSES  # label columns in file order
    for split in ("train", "val", "test"):
        expected = [(i, labels) for i, labels in
                    _file_records(ptbxl_split_dir / f"ptbxl_super_class_{split}.csv")
                    if i != "99999"]
        used = [(r.record_id, r.labels.tolist()) for r in plan.splits[split]]
        assert used == expected
    assert plan.excluded == {"missing_file": ["99999"]}   # counted and named, not dropped
    assert all(r.path.startswith(str(bundled_ptbxl / "records100"))
               for r in plan.splits["test"])              # the 100 Hz files that exist
    assert not plan.splits["test"][0].labels.any()        # a row without labels is kept
    assert plan.settings["split_files"]["test"].endswith("ptbxl_super_class_test.csv")
    assert plan.folds == {}


def test_zeroshot_needs_only_the_test_file(plan_args, ptbxl_split_dir):
    (ptbxl_split_dir / "ptbxl_super_class_train.csv").unlink()
    plan = build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(ptbxl_split_dir)))
    assert list(plan.splits) == ["test"] and len(plan.splits["test"]) == 15
    assert len(plan.prompts) == len(CLASSES)
    with pytest.raises(EvalError, match="ptbxl_super_class_train.csv does not exist"):
        build_plan(plan_args("--mode", "linear", "--split-dir", str(ptbxl_split_dir)))


def test_class_names_file_reorders_the_label_columns(plan_args, ptbxl_split_dir, tmp_path):
    import json

    names = tmp_path / "names.json"
    names.write_text(json.dumps({"ptbxl_super_class": ["NORM", "MI", "STTC", "CD", "HYP"]}))
    plain = build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(ptbxl_split_dir)))
    plan = build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(ptbxl_split_dir),
                                "--class-names", str(names)))
    assert plan.class_names == ["NORM", "MI", "STTC", "CD", "HYP"]
    order = [CLASSES.index(c) for c in plan.class_names]
    for a, b in zip(plan.splits["test"], plain.splits["test"]):
        np.testing.assert_array_equal(a.labels, b.labels[order])


def test_bad_split_files_name_file_line_and_column(plan_args, ptbxl_split_dir, tmp_path):
    test_csv = ptbxl_split_dir / "ptbxl_super_class_test.csv"
    lines = test_csv.read_text().splitlines()
    lines[3] = lines[3][:-1] + "2"
    test_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalError, match=r"ptbxl_super_class_test.csv: line 4 column 11 "
                                        r"\('STTC'\): label must be 0 or 1, got '2'"):
        build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(ptbxl_split_dir)))
    bad = _write_csv(tmp_path / "x.csv", ["id", "patient_id", "strat_fold", "filename_lr",
                                          "filename_hr", "t", "NORM"], [[1, 1, 1, "a", "b", "", 0]])
    with pytest.raises(SplitFileError, match="line 1 column 1 must be 'ecg_id'"):
        read_split_csv(bad, "ptb-xl")
    with pytest.raises(EvalError, match="--test-folds has no effect with --split-dir"):
        build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(ptbxl_split_dir),
                             "--test-folds", "6"))


def test_a_record_in_two_split_files_is_an_error(plan_args, ptbxl_split_dir, bundled_ptbxl):
    val_csv = ptbxl_split_dir / "ptbxl_super_class_val.csv"
    first_train = (ptbxl_split_dir / "ptbxl_super_class_train.csv").read_text().splitlines()[1]
    val_csv.write_text(val_csv.read_text() + first_train + "\n")
    with pytest.raises(EvalError, match=r"record 1 in .*_val.csv line 22 is also in "
                                        r".*_train.csv line 2"):
        build_plan(plan_args("--mode", "linear", "--split-dir", str(ptbxl_split_dir)))


def test_cpsc2018_and_chapman_layouts(plan_args, challenge_root, tmp_path):
    icbeb = tmp_path / "icbeb"
    icbeb.mkdir()
    header = ["patient_id", "ecg_id", "filename", "validation", "age", "sex", "scp_codes",
              "AFIB", "NORM"]
    _write_csv(icbeb / "icbeb_test.csv", header, [
        [1, 1, "A0001", False, 60, 0, "{}", 0, 1],      # in a sub-folder: found by name
        [2, 2, "g1/A0002", False, 60, 0, "{}", 1, 0],   # relative path
        [3, 3, "A9999", False, 60, 0, "{}", 1, 0]])     # not under --root
    plan = build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(icbeb),
                                dataset="cpsc2018", root=challenge_root))
    assert [(r.record_id, r.labels.tolist()) for r in plan.splits["test"]] == \
        [("A0001", [0.0, 1.0]), ("A0002", [1.0, 0.0])]
    assert plan.splits["test"][0].path == str(challenge_root / "g1" / "A0001.hea")
    assert plan.excluded == {"missing_file": ["A9999"]}

    chapman = tmp_path / "chapman"
    chapman.mkdir()
    _write_csv(chapman / "chapman_test.csv", ["ecg_path", "age", "diagnose", "AQW", "SR"], [
        ["/chapman/g1/A0003.mat", 50, "SR", 0, 1],
        ["/chapman/g1/A0004.mat", 50, "AQW", 1, 0]], blank_first_line=True)
    prompts = tmp_path / "CKEPE_prompt.json"
    prompts.write_text('{"AQW": "abnormal Q wave", "SR": "sinus rhythm"}')
    plan = build_plan(plan_args("--mode", "zeroshot", "--split-dir", str(chapman), "--prompts",
                                str(prompts), dataset="chapman", root=challenge_root))
    assert plan.class_names == ["AQW", "SR"]
    assert [(r.record_id, r.labels.tolist()) for r in plan.splits["test"]] == \
        [("A0003", [0.0, 1.0]), ("A0004", [1.0, 0.0])]
    assert plan.splits["test"][1].path == str(challenge_root / "g1" / "A0004.hea")
    assert plan.prompts == [["abnormal q wave"], ["sinus rhythm"]]


# ---------------------------------------------------------------- --report-split

@pytest.fixture
def report_split(tmp_path, bundled_ptbxl):
    """A report split in ptbxl_database.csv's layout (all its columns), with reports that
    are not PTB-XL's (as the reference's translated file), one record not under --root and
    one empty report."""
    database = read_database(bundled_ptbxl)
    rows = database.iloc[:12].copy()
    rows["report"] = [f"translated report number {i}." for i in range(len(rows))]
    rows.loc[rows.index[3], "report"] = ""
    missing = rows.iloc[[0]].copy()
    missing["ecg_id"], missing["filename_lr"] = 99999, "records100/99000/99999_lr"
    missing["filename_hr"] = "records500/99000/99999_hr"
    path = tmp_path / "ptbxl_test.csv"
    pd.concat([rows, missing]).to_csv(path, index=False)
    return path, rows


def test_report_split_gives_the_records_and_reports_of_the_file(plan_args, report_split):
    path, rows = report_split
    plan = build_plan(plan_args("--mode", "retrieval", "--report-split", str(path)))
    expected = {str(int(r.ecg_id)): r.report for r in rows.itertuples() if r.report}
    assert {r.record_id: r.report for r in plan.splits["test"]} == expected
    assert plan.excluded == {"missing_file": ["99999"],
                             "empty_report": [str(int(rows.iloc[3].ecg_id))]}
    assert plan.settings["split_files"] == {"test": str(path)}
    for record in plan.splits["test"]:   # the WFDB record at the model's rate (100 Hz)
        assert record.path.endswith("_lr")


def test_report_split_checks(plan_args, report_split, tmp_path):
    path, _ = report_split
    with pytest.raises(EvalError, match="--report-split applies to --mode retrieval or generation"):
        build_plan(plan_args("--mode", "zeroshot", "--report-split", str(path)))
    with pytest.raises(EvalError, match="leave out --test-folds"):
        build_plan(plan_args("--mode", "retrieval", "--report-split", str(path), "--test-folds", "6"))
    bad = _write_csv(tmp_path / "bad.csv", ["ecg_id", "report"], [[1, "x"]])
    with pytest.raises(EvalError, match="no column strat_fold, filename_lr, filename_hr"):
        build_plan(plan_args("--mode", "generation", "--report-split", str(bad)))
