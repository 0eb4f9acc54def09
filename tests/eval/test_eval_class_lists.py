"""--class-names: the reference's dataset_class_names.json layout replaces our class lists."""
from __future__ import annotations

import json

import numpy as np
import pytest

from melp_ray.data.physionet_labels import CPSC2018_CLASSES, CPSC2018_DESCRIPTIONS
from melp_ray.data.ptbxl import SUPERCLASSES, class_names
from melp_ray.eval.class_lists import ClassListError, match_ptbxl_names, read_class_names
from melp_ray.eval_plan.plan import EvalError, build_plan

# Our own small files in the reference's layout: task key -> list of class names.
SUPER_REORDERED = ["HYP", "NORM", "MI", "CD", "STTC"]
ICBEB_NAMES = ["AFIB", "VPC", "NORM", "1AVB", "CRBBB", "STE", "PAC", "CLBBB", "STD"]


@pytest.fixture
def class_file(tmp_path):
    path = tmp_path / "dataset_class_names.json"
    path.write_text(json.dumps({"ptbxl_super_class": SUPER_REORDERED, "icbeb": ICBEB_NAMES,
                                "ptbxl_sub_class": ["AVB", "ISC", "NST", "IMI", "NORM"],
                                "chapman": ["AQW", "SR", "AFIB"]}))
    return str(path)


def _labels(plan) -> dict[str, np.ndarray]:
    return {r.record_id: r.labels for r in plan.splits["test"]}


def test_ptbxl_uses_the_file_order_and_the_same_labels(plan_args, class_file):
    ours = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-6"))
    plan = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-6",
                                "--class-names", class_file))
    assert plan.class_names == SUPER_REORDERED
    assert plan.settings["class_names_file"] == class_file
    order = [SUPERCLASSES.index(c) for c in SUPER_REORDERED]
    theirs, mine = _labels(plan), _labels(ours)
    assert theirs.keys() == mine.keys() and len(theirs) > 20
    for rid, labels in theirs.items():
        np.testing.assert_array_equal(labels, mine[rid][order])


def test_ptbxl_subclass_names_without_underscore_match_ours(plan_args, class_file,
                                                            bundled_ptbxl):
    ours = class_names("sub", bundled_ptbxl)
    assert match_ptbxl_names(["AVB", "ISC", "NST", "IMI"], ours, "f") == \
        {"AVB": "_AVB", "ISC": "ISC_", "NST": "NST_", "IMI": "IMI"}
    plan = build_plan(plan_args("--mode", "zeroshot", "--task", "sub", "--test-folds", "1-6",
                                "--class-names", class_file))
    assert plan.class_names == ["AVB", "ISC", "NST", "IMI", "NORM"]
    reference = build_plan(plan_args("--mode", "zeroshot", "--task", "sub", "--test-folds",
                                     "1-6"))
    # Same positives per class as our own names give, records without any of the five
    # classes left out as no_label.
    mine = {r.record_id: r.labels for r in reference.splits["test"]}
    columns = [reference.class_names.index(c) for c in ("_AVB", "ISC_", "NST_", "IMI", "NORM")]
    for r in plan.splits["test"]:
        np.testing.assert_array_equal(r.labels, mine[r.record_id][columns])
    assert plan.prompts[0] == reference.prompts[reference.class_names.index("_AVB")]


def test_cpsc2018_reference_names_label_like_ours(plan_args, class_file, challenge_root):
    ours = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-10",
                                dataset="cpsc2018", root=challenge_root))
    plan = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-10", "--class-names",
                                class_file, dataset="cpsc2018", root=challenge_root))
    assert ours.class_names == list(CPSC2018_CLASSES)
    assert plan.class_names == ICBEB_NAMES
    order = [CPSC2018_CLASSES.index(c) for c in
             ("AF", "PVC", "NORM", "I-AVB", "RBBB", "STE", "PAC", "LBBB", "STD")]
    mine = _labels(ours)
    assert _labels(plan).keys() == mine.keys()
    for rid, labels in _labels(plan).items():
        np.testing.assert_array_equal(labels, mine[rid][order])
    assert plan.prompts[0] == [CPSC2018_DESCRIPTIONS["AF"]]  # our default for AFIB = AF


def test_chapman_acronyms_need_the_split_csvs(plan_args, class_file, challenge_root, tmp_path):
    with pytest.raises(EvalError, match=r"\['AQW', 'SR', 'AFIB'\] are not SNOMED codes.*"
                                        "--split-dir"):
        build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-10", "--class-names",
                             class_file, dataset="chapman", root=challenge_root))
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"chapman": ["164889003", "426783006"]}))
    plan = build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-10", "--class-names",
                                str(codes), dataset="chapman", root=challenge_root))
    assert plan.class_names == ["164889003", "426783006"]


def test_bad_class_files_name_the_problem(plan_args, tmp_path, class_file):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ptbxl_super_class": ["NORM", "MI", "XYZ"]}))
    with pytest.raises(EvalError, match=r"classes \['XYZ'\] are not labels of this PTB-XL task"):
        build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-6", "--class-names",
                             str(path)))
    with pytest.raises(ClassListError, match="no class list for task 'ptbxl_form'"):
        read_class_names(path, "ptbxl_form")
    path.write_text('{"ptbxl_super_class": ["NORM",\n "NORM"]}')
    with pytest.raises(ClassListError, match=r"lists \['NORM'\] more than once"):
        read_class_names(path, "ptbxl_super_class")
    path.write_text('{"ptbxl_super_class": [\n  "NORM" "MI"]}')
    with pytest.raises(ClassListError, match="c.json: line 2 column 10"):
        read_class_names(path, "ptbxl_super_class")
    with pytest.raises(EvalError, match="--class-names has no effect on --mode retrieval"):
        build_plan(plan_args("--mode", "retrieval", "--class-names", class_file))
