"""CODE-15% / CODE-test reader on fixtures written in the published HDF5 + CSV layout from
real bundled PTB-XL waveforms (100 Hz, resampled to CODE's 400 Hz and centred in 4096
samples), read back through the plan and the Ray Data loading function (no Ray)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from code15_fixture import NAN_EXAM, PAD, ZERO_EXAM, write_code_test

from melp_ray.data import code15
from melp_ray.data.leads import LEADS
from melp_ray.eval.records import load_batch, read_record
from melp_ray.eval_plan.plan import EvalError, build_plan
from melp_ray.text.prompts import CODE15_PROMPTS


def _plan(plan_args, root, *options):
    return build_plan(plan_args("--mode", "zeroshot", "--test-folds", "1-10", *options,
                                dataset="code-15", root=root))


def test_code15_records_labels_and_missing_part(plan_args, code15_root):
    plan = _plan(plan_args, code15_root["root"])
    by_id = {r.record_id: r for r in plan.splits["test"]}
    written = [str(e) for e in code15_root["exam_ids"][:-1]]
    assert sorted(by_id) == sorted(written)                     # the dummy row is no exam
    for i, exam_id in enumerate(written):
        assert np.array_equal(by_id[exam_id].labels, code15_root["labels"][i]), exam_id
    assert not by_id["1000"].labels.any()                       # normal exams are kept
    assert plan.excluded == {"missing_file": ["2000", "2001"]}
    assert plan.class_names == list(code15.CLASSES)
    assert plan.prompts == [CODE15_PROMPTS[c] for c in code15.CLASSES]


def test_code15_signals_read_back_in_lead_order_and_bad_exams_named(plan_args, code15_root):
    plan = _plan(plan_args, code15_root["root"])
    paths = {r.record_id: r.path for r in plan.splits["test"]}
    tracings = code15_root["tracings"]
    raw = code15.read_tracing(paths["1003"])
    # Padding stripped, leads in LEADS order (CODE's order is ours: DI..AVF = I..aVF).
    assert raw.shape == (12, 4000)
    np.testing.assert_array_equal(raw, tracings[3, PAD:PAD + 4000].T)
    assert LEADS[4] == "aVL" and np.array_equal(raw[4], tracings[3, PAD:PAD + 4000, 4])
    # At the model's 400 Hz the signal is the written one; at 100 Hz, the source record.
    np.testing.assert_allclose(read_record("code-15", paths["1003"], 400, 10), raw, atol=1e-6)
    source = tracings[3, PAD:PAD + 4000:4].T
    back = read_record("code-15", paths["1003"], 100, 10)
    assert back.shape == (12, 1000)
    assert np.corrcoef(back.ravel(), source.ravel())[0, 1] > 0.99

    ids = np.array(sorted(paths))
    out = load_batch({"record_id": ids, "path": np.array([paths[i] for i in ids])},
                     "code-15", 100, 10)
    reasons = dict(zip(ids, (str(r).split(":", 1)[0] for r in out["rejected"])))
    assert reasons.pop(str(NAN_EXAM)) == "nan_or_inf"
    assert reasons.pop(str(ZERO_EXAM)) == "flat_signal"
    assert set(reasons.values()) == {""}                         # every other exam is read


def test_a_short_exam_is_zero_padded_to_the_model_length(code15_root, tmp_path):
    tracing = np.zeros((1, 4096, 12), dtype=np.float32)
    seven = code15_root["tracings"][5, PAD:PAD + 2800]              # 7 s, centred
    start = (4096 - 2800) // 2
    tracing[0, start:start + 2800] = seven
    with h5py.File(tmp_path / "t.hdf5", "w") as f:
        f.create_dataset("tracings", data=tracing)
    signal = read_record("code-15", f"{tmp_path / 't.hdf5'}::0", 400, 10)
    assert signal.shape == (12, 4000)
    np.testing.assert_allclose(signal[:, :2800], seven.T, atol=1e-6)
    assert not signal[:, 2800:].any()


def test_code_test_layout(plan_args, bundled_ptbxl, tmp_path):
    """CODE-test: ecg_tracings.hdf5 + annotations/gold_standard.csv, ids = row numbers."""
    y = write_code_test(tmp_path, bundled_ptbxl, 6)
    plan = _plan(plan_args, tmp_path)
    assert [r.record_id for r in plan.splits["test"]] == [f"{i:04d}" for i in range(6)]
    assert np.array_equal(np.stack([r.labels for r in plan.splits["test"]]), y)

    (tmp_path / "annotations" / "gold_standard.csv").write_text("1dAVb,RBBB\n0,1\n")
    with pytest.raises(EvalError, match="lacks columns"):
        _plan(plan_args, tmp_path)


def test_code15_root_and_options_checked(plan_args, code15_root, tmp_path):
    with pytest.raises(EvalError, match="not a CODE-15% folder"):
        _plan(plan_args, tmp_path)
    with pytest.raises(EvalError, match="--split-dir has no CODE-15% entry"):
        _plan(plan_args, code15_root["root"], "--split-dir", str(tmp_path))
