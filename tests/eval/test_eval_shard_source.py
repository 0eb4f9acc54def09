"""--dataset shards without Ray: listing shard rows as evaluation records, reading the
signals of one shard file, and the checks that fail before Ray starts. (End to end on
real prepared shards, local and in an S3 bucket: tests/test_evaluate.py and
tests/data/test_data_object_store.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from melp_ray.data import shards
from melp_ray.data.records import RecordRef
from melp_ray.eval import shard_source
from melp_ray.eval_plan.plan import EvalError, build_plan, physionet_fold
from melp_ray.evaluate import make_parser


def _write_shard_folder(root, dataset: str, folds: list[int], rate: int = 100,
                        seconds: float = 10) -> list[np.ndarray]:
    """One shard of len(folds) rows with random signals and the given folds + a manifest."""
    rng = np.random.default_rng(0)
    rows, signals = [], []
    for i, fold in enumerate(folds):
        signal = rng.normal(size=(12, int(rate * seconds))).astype(np.float32)
        ref = RecordRef(record_id=f"r{i}", subject_id=f"s{i}", dataset=dataset, path="",
                        report=f"report {i}", strat_fold=fold,
                        labels={"super": ["NORM"] if i % 2 else ["MI", "CD"]})
        rows.append(shards.shard_row(ref, "train", signal))
        signals.append(signal)
    shards.write_shard(rows, root / shards.shard_relpath("train", 0))
    manifest = {"dataset": dataset, "sample_rate": rate, "seconds": seconds,
                "shards": [{"path": shards.shard_relpath("train", 0), "split": "train",
                            "rows": len(rows)}]}
    (root / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
    return signals


def test_rows_become_records_with_their_folds_labels_and_reports(tmp_path):
    _write_shard_folder(tmp_path, "ptb-xl", folds=[3, 5, 6])
    root, manifest = shard_source.check_shard_root(str(tmp_path))
    classes = shard_source.shard_classes(manifest, "super")
    assert classes == ["NORM", "MI", "STTC", "CD", "HYP"]
    records = shard_source.shard_records(root, manifest, "super", classes)
    assert [(r.record_id, r.fold, r.report) for r in records] == [
        ("r0", 3, "report 0"), ("r1", 5, "report 1"), ("r2", 6, "report 2")]
    assert records[0].labels.tolist() == [0, 1, 0, 1, 0] and records[1].labels.tolist() == [1, 0, 0, 0, 0]
    assert {r.path for r in records} == {str(tmp_path / shards.shard_relpath("train", 0))}


def test_a_dataset_without_folds_gets_pseudo_folds_and_no_label_modes(tmp_path):
    _write_shard_folder(tmp_path, "mimic-iv-ecg", folds=[0, 0])
    root, manifest = shard_source.check_shard_root(str(tmp_path))
    records = shard_source.shard_records(root, manifest, None, [])
    assert [r.fold for r in records] == [physionet_fold("r0"), physionet_fold("r1")]
    with pytest.raises(EvalError, match="mimic-iv-ecg records, which carry no diagnostic labels"):
        shard_source.shard_classes(manifest, "super")


def test_one_shard_file_is_read_for_the_wanted_records_only(tmp_path):
    signals = _write_shard_folder(tmp_path, "ptb-xl", folds=[1, 2, 3])
    path = str(tmp_path / shards.shard_relpath("train", 0))
    batch = {"path": np.array([path], dtype=object),
             "record_ids": np.array([["r2", "r0"]], dtype=object)}
    out = shard_source.read_shard_records(batch, sample_rate=100, seconds=10, crop_seconds=None,
                                          shard_rate=100)
    assert out["record_id"].tolist() == ["r0", "r2"]
    assert out["report"].tolist() == ["report 0", "report 2"]
    assert out["rejected"].tolist() == ["", ""]
    from melp_ray.data.records import minmax_normalise
    np.testing.assert_array_equal(out["ecg"][1], minmax_normalise(signals[2]))
    # Asked for 20 s of 10 s records: rejected by name (wrong length), not dropped.
    longer = shard_source.read_shard_records(batch, sample_rate=100, seconds=20,
                                             crop_seconds=None, shard_rate=100)
    assert all(r.startswith("wrong_length") for r in longer["rejected"])
    assert longer["ecg"].shape == (2, 12, 2000)


def _args(root, tmp_path, *options):
    return make_parser().parse_args(["--checkpoint", str(tmp_path / "no-such-checkpoint"),
                                     "--dataset", "shards", "--root", str(root),
                                     "--out", str(tmp_path / "o"), *options])


def test_a_folder_without_a_manifest_fails_before_ray(tmp_path):
    with pytest.raises(EvalError, match="manifest.json not found"):
        build_plan(_args(tmp_path, tmp_path, "--mode", "zeroshot"))


def test_options_that_shards_make_meaningless_are_refused(tmp_path):
    with pytest.raises(EvalError, match="--split-dir does not apply to --dataset shards"):
        build_plan(_args(tmp_path, tmp_path, "--mode", "zeroshot", "--split-dir", str(tmp_path)))
