"""build_plan: folds, records and classes per dataset, and the checks that fail before Ray.

The checks that go through the command line (exit code 2 and the usage message) are in
tests/test_evaluate.py.
"""
from __future__ import annotations

import pytest

from melp_ray.eval_plan.plan import EvalError, build_plan, physionet_fold
from melp_ray.eval_plan.plan_checks import parse_folds
from melp_ray.text.prompts import PTBXL_SUPERCLASS_PROMPTS
from melp_ray.evaluate import make_parser


def test_fold_parsing():
    assert parse_folds("1-8", "--x") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert parse_folds("3,1,2", "--x") == [1, 2, 3]
    assert parse_folds("1-2,5", "--x") == [1, 2, 5]
    for bad in ("", "a", "3-1", "0-2", "1-"):
        with pytest.raises(EvalError, match="folds"):
            parse_folds(bad, "--x")


def test_chapman_classes_are_the_frequent_codes_with_pseudo_folds(tiny_checkpoint,
                                                                   challenge_root, tmp_path):
    """Chapman runs the CPSC2018 code path past the plan; check what differs."""
    from melp_ray.data.physionet import list_physionet_records
    from melp_ray.data.physionet_labels import frequent_dx_classes

    args = make_parser().parse_args(
        ["--checkpoint", tiny_checkpoint, "--dataset", "chapman", "--root", str(challenge_root),
         "--out", str(tmp_path / "o"), "--mode", "zeroshot", "--test-folds", "1-5",
         "--min-count", "3"])
    plan = build_plan(args)
    records = list_physionet_records(challenge_root)
    assert plan.class_names == frequent_dx_classes(records, min_count=3)
    assert plan.class_names[0] == "426783006"  # sinus rhythm: the most frequent code
    assert {r.fold for r in plan.splits["test"]} <= {1, 2, 3, 4, 5}
    assert len(plan.prompts) == len(plan.class_names)
    assert physionet_fold("A0001") == physionet_fold("A0001")  # stable


@pytest.mark.parametrize("options, message", [
    (["--mode", "zeroshot", "--test-folds", "9-10"],
     "--test-folds 9,10: no record .* is in these folds \\(folds present: 1,2,3,4,5,6\\)"),
    (["--mode", "linear", "--train-folds", "1-5", "--val-folds", "5", "--test-folds", "6"],
     "--train-folds and --val-folds share folds 5"),
    (["--mode", "linear", "--train-folds", "1-4", "--val-folds", "5"],
     "--test-folds 10: no record"),
    (["--mode", "zeroshot", "--test-folds", "6", "--sample-rate", "33", "--seconds", "0.1"],
     "sample_rate \\* seconds must be a positive whole number"),
])
def test_bad_folds_and_lengths_fail_with_a_real_checkpoint(tiny_checkpoint, bundled_ptbxl,
                                                           tmp_path, options, message):
    args = make_parser().parse_args(
        ["--checkpoint", tiny_checkpoint, "--dataset", "ptb-xl", "--root", str(bundled_ptbxl),
         "--out", str(tmp_path / "o"), *options])
    with pytest.raises(EvalError, match=message):
        build_plan(args)


def test_missing_prompt_and_not_a_checkpoint_are_named(tiny_checkpoint, bundled_ptbxl,
                                                       tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("NORM: a normal ecg\n")
    parser = make_parser()
    base = ["--dataset", "ptb-xl", "--root", str(bundled_ptbxl), "--out", str(tmp_path / "o"),
            "--mode", "zeroshot", "--test-folds", "6"]
    plan = build_plan(parser.parse_args(
        ["--checkpoint", tiny_checkpoint, "--prompts", str(prompts), *base]))
    assert plan.prompts[0] == ["a normal ecg"]  # the file overrides the default per class
    assert plan.prompts[1] == PTBXL_SUPERCLASS_PROMPTS["MI"]

    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    with pytest.raises(EvalError, match="neither a melp_ray training checkpoint"):
        build_plan(parser.parse_args(["--checkpoint", str(not_a_checkpoint), *base]))
