"""The manifest layout (your own files + ecg_manifest.csv): real PTB-XL records written as
WFDB, .npy (both orientations), HDF5 and EDF, at 100 and 500 Hz, 10 s and 5 s, with other
lead spellings, plus one bad row per rejection reason. In-process: prepare runs with
``local=True`` (no Ray), the streaming reader is called directly."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import wfdb
from wfdb.io.convert.edf import wfdb_to_edf

from melp_ray.data import manifest as M
from melp_ray.data import rejections, shards
from melp_ray.data.records import RecordRef, load_signal
from melp_ray.data.sources import detect_layout, split_for_subject
from melp_ray.data.records import minmax_normalise
from melp_ray.data.rows import list_splits
from melp_ray.train.stream import StreamSpec, read_wfdb_batch
from melp_ray.data.prepare import PrepareSettings, prepare

RATE, SECONDS = 100, 5.0
PTBXL_NAMES = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
SHUFFLED = ["v6", "V5", "v4", "V3", "v2", "V1", "avf", "AVL", "aVR", "iii", "ii", "i"]
APPROX = {"edf-6": 0.01}   # mV: EDF holds 16-bit digital samples of another gain


def _original(ptbxl: Path, ecg_id: int, hz: int) -> tuple[str, wfdb.Record]:
    folder = f"records{hz}/{(ecg_id // 1000) * 1000:05d}"
    path = f"{folder}/{ecg_id:05d}_{'hr' if hz == 500 else 'lr'}"
    return path, wfdb.rdrecord(str(ptbxl / path))


def _rows_and_expected(ptbxl: Path, root: Path) -> tuple[list[dict], dict[str, np.ndarray], dict[str, str]]:
    """Write the signal files; returns (manifest rows, {good id: expected signal}, {bad id: reason}).
    Expected signals are the PTB-XL originals through load_signal at the same settings."""
    hi = 500 if (ptbxl / "records500").is_dir() else 100   # the bundled sample has 100 Hz only
    expected, rows = {}, []

    def expect(record_id: str, ecg_id: int, hz: int):
        path, _ = _original(ptbxl, ecg_id, hz)
        expected[record_id] = load_signal(RecordRef(record_id, "", "ptb-xl", path, ""), ptbxl, RATE, SECONDS)

    def row(record_id, path, subject, report="sinus rhythm. normal ecg.", **extra):
        rows.append({"record_id": record_id, "path": path, "subject_id": subject, "report": report,
                     "labels_super": extra.pop("labels", "NORM"), **extra})

    # WFDB, 100 Hz, 10 s: copied as it is (named by its .hea)
    src, _ = _original(ptbxl, 1, 100)
    (root / "wfdb").mkdir()
    for suffix in (".hea", ".dat"):
        shutil.copy(ptbxl / (src + suffix), root / "wfdb")
    row("wfdb-1", f"wfdb/{Path(src).name}.hea", "s1", labels="NORM;MI")
    expect("wfdb-1", 1, 100)
    # .npy leads x samples, 500 Hz, PTB-XL's spellings
    _, rec = _original(ptbxl, 2, hi)
    (root / "npy").mkdir()
    np.save(root / "npy/2.npy", rec.p_signal.T)
    row("npy-lxs", "npy/2.npy", "s2", fs=hi, leads=";".join(PTBXL_NAMES))
    expect("npy-lxs", 2, hi)
    # .npy samples x leads, 100 Hz, 5 s, leads in another order and spelling
    _, rec = _original(ptbxl, 3, 100)
    order = [PTBXL_NAMES.index(name.upper()) for name in SHUFFLED]
    np.save(root / "npy/3.npy", rec.p_signal[:500, order])
    row("npy-sxl-5s", "npy/3.npy", "s3", fs=100, leads=",".join(SHUFFLED))
    expect("npy-sxl-5s", 3, 100)   # its first 5 s are what was written
    # HDF5, one stacked dataset (2, T, 12) with fs / leads as attributes
    stacked = np.stack([_original(ptbxl, i, hi)[1].p_signal for i in (4, 5)])
    with h5py.File(root / "ecg.h5", "w") as f:
        data = f.create_dataset("tracings", data=stacked)
        data.attrs["fs"] = hi
        data.attrs["leads"] = ";".join(PTBXL_NAMES)
    for i, ecg_id in enumerate((4, 5)):
        row(f"h5-{i}", f"ecg.h5#tracings/{i}", f"s{ecg_id}")
        expect(f"h5-{i}", ecg_id, hi)
    # EDF, written by wfdb from the 100 Hz WFDB record
    src, _ = _original(ptbxl, 6, 100)
    wfdb_to_edf(str(ptbxl / src), output_filename=str(root / "6.edf"))
    row("edf-6", "6.edf", "s6")
    expect("edf-6", 6, 100)   # EDF stores 16-bit digital values: equal to a tolerance (APPROX)

    # one bad row per reason
    _, rec = _original(ptbxl, 11, 100)
    bad = {
        "missing": ("missing_file", "npy/none.npy", {}),
        "garbage": ("unreadable", "npy/garbage.npy", {}),
        "cube": ("wrong_shape", "npy/cube.npy", {"fs": 100}),
        "x7": ("missing_leads", "npy/x7.npy", {"fs": 100, "leads": ";".join(PTBXL_NAMES[:-1] + ["X7"])}),
        "nan": ("nan_or_inf", "npy/nan.npy", {"fs": 100}),
        "flat": ("flat_signal", "npy/flat.npy", {"fs": 100}),
        "short": ("wrong_length", "npy/short.npy", {"fs": 100}),
        "no-fs": ("bad_sample_rate", "npy/2.npy", {}),
        "no-report": ("empty_report", "npy/2.npy", {"fs": hi, "report": "  "}),
        "npy-lxs": ("duplicate_record_id", "npy/3.npy", {"fs": 100}),
    }
    (root / "npy/garbage.npy").write_bytes(b"not a numpy file")
    np.save(root / "npy/cube.npy", np.ones((12, 10, 100)))
    np.save(root / "npy/x7.npy", rec.p_signal)
    with_nan = rec.p_signal.copy()
    with_nan[10, 3] = np.nan
    np.save(root / "npy/nan.npy", with_nan)
    np.save(root / "npy/flat.npy", np.zeros((1000, 12)))
    np.save(root / "npy/short.npy", rec.p_signal[:200])
    for record_id, (_, path, extra) in bad.items():
        row(record_id, path, f"bad-{record_id}", **extra)
    return rows, expected, {record_id: reason for record_id, (reason, _, _) in bad.items()}


@pytest.fixture(scope="module")
def manifest_root(shared_ptbxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    rows, expected, bad = _rows_and_expected(shared_ptbxl, root)
    pd.DataFrame(rows).to_csv(root / M.MANIFEST_CSV, index=False)
    return root, expected, bad


def test_prepare_keeps_the_good_rows_and_names_every_rejection(manifest_root, tmp_path):
    root, expected, bad = manifest_root
    assert detect_layout(root) == "manifest"
    settings = PrepareSettings(dataset="manifest", root=str(root), out=str(tmp_path / "out"),
                               sample_rate=RATE, seconds=SECONDS, shard_size=4, val_fraction=0.3)
    manifest = prepare(settings, local=True)
    n_rows = len(pd.read_csv(root / M.MANIFEST_CSV))
    assert manifest["input"] == n_rows == len(expected) + len(bad)
    assert manifest["kept"] == len(expected)
    assert set(manifest["rejected"]) == set(rejections.MANIFEST_REJECTION_REASONS)
    assert manifest["input"] == manifest["kept"] + sum(map(len, manifest["rejected"].values()))
    named = {rid: reason for reason, ids in manifest["rejected"].items() for rid in ids}
    assert named == bad
    rows = [r for path in shards.shard_paths(tmp_path / "out") for r in shards.read_shard_rows(path)]
    by_id = {r["record_id"]: r for r in rows}
    assert set(by_id) == set(expected)
    for record_id, signal in expected.items():
        got = by_id[record_id]["ecg"]
        assert got.shape == (12, int(RATE * SECONDS))
        if record_id in APPROX:
            assert np.abs(got - signal).max() < APPROX[record_id], record_id
        else:
            np.testing.assert_array_equal(got, signal, err_msg=record_id)
        assert by_id[record_id]["split"] == split_for_subject(by_id[record_id]["subject_id"], 0.3)
    assert by_id["wfdb-1"]["labels_super"] == ["NORM", "MI"] and by_id["wfdb-1"]["dataset"] == "manifest"


def test_streaming_reads_the_manifest_rows_as_prepare_does(manifest_root):
    """``pretrain data.root=<manifest root>`` lists with list_splits and reads with
    read_wfdb_batch on Ray Data workers: here both run in this process."""
    root, expected, bad = manifest_root
    splits = list_splits("manifest", str(root), val_fraction=0.3, seed=0, limit=None, sample_rate=RATE)
    listed = splits["train"] + splits["val"]
    assert {r.record_id for r in listed} == set(expected) | (set(bad) - {"no-report"})
    spec = StreamSpec(sample_rate=RATE, seconds=SECONDS, text_model="minilm", max_text_length=16,
                      with_labels=False)
    good = [r for r in listed if r.record_id in expected and r.record_id not in APPROX]
    batch = read_wfdb_batch(pd.DataFrame([r.to_row() for r in good]).to_dict("list"), spec, str(root))
    want = minmax_normalise(np.stack([expected[r.record_id] for r in good]))
    np.testing.assert_array_equal(batch["ecg"], want)


def test_label_columns_and_format_errors(manifest_root, tmp_path):
    root, _, _ = manifest_root
    labels = M.read_labels(root, "super")
    assert labels["wfdb-1"] == ["NORM", "MI"] and labels["npy-lxs"] == ["NORM"]
    with pytest.raises(M.ManifestFormatError, match="no column labels_rhythm"):
        M.read_labels(root, "rhythm")
    table = pd.read_csv(root / M.MANIFEST_CSV).drop(columns=["subject_id"])
    table.to_parquet(tmp_path / M.MANIFEST_PARQUET)
    with pytest.raises(M.ManifestFormatError, match="lacks columns"):
        M.list_manifest(tmp_path)


def test_evaluate_lists_the_label_columns_and_reads_the_records(manifest_root):
    from melp_ray.eval import datasets as D
    from melp_ray.eval.records import read_record
    from melp_ray.eval_plan.plan_checks import check_root

    root, expected, bad = manifest_root
    assert check_root("manifest", str(root)) == str(root.resolve())
    listing = D.list_records("manifest", str(root), "super", RATE, None)
    assert listing.classes == ["MI", "NORM"]
    assert listing.excluded == {"duplicate_record_id": ["npy-lxs"]}
    by_id = {r.record_id: r for r in listing.records}
    assert len(by_id) == len(listing.records) == len(expected) + len(bad) - 1
    assert by_id["wfdb-1"].labels.tolist() == [1.0, 1.0] and by_id["h5-0"].labels.tolist() == [0.0, 1.0]
    for record_id in ("npy-lxs", "npy-sxl-5s", "h5-1"):
        signal = read_record("manifest", by_id[record_id].path, RATE, SECONDS)
        np.testing.assert_array_equal(signal, expected[record_id])
    with pytest.raises(rejections.RecordRejected, match="missing_leads"):
        read_record("manifest", by_id["x7"].path, RATE, SECONDS)
    with pytest.raises(D.EvalError, match="no column labels_rhythm"):
        D.list_records("manifest", str(root), "rhythm", RATE, None)


def test_pretrain_streams_a_manifest_root(ray_local, bundled_ptbxl, tiny_cfg, tmp_path):
    """``pretrain data.root=<manifest root>``: 40 bundled records as .npy files (samples x
    leads) and a CSV of their reports train a few steps straight from the files (Ray Data
    reads them; the one worker runs in this process)."""
    from melp_ray.data.sources import list_records
    from melp_ray.pretraining.run import run

    root = tmp_path / "own"
    (root / "ecg").mkdir(parents=True)
    rows = []
    for ref in list_records("ptb-xl", str(bundled_ptbxl), sample_rate=100)[:40]:
        signal = load_signal(ref, bundled_ptbxl, 100, 10)            # (12, 1000)
        np.save(root / "ecg" / f"{ref.record_id}.npy", signal.T)
        rows.append({"path": f"ecg/{ref.record_id}.npy", "report": ref.report,
                     "subject_id": ref.subject_id, "fs": 100})
    pd.DataFrame(rows).to_csv(root / M.MANIFEST_CSV, index=False)
    cfg = tiny_cfg(tmp_path / "runs", "own", f"data.root={root}", "data.limit=null",
                   "train.num_workers=1", "train.max_steps=2", "train.checkpoint_every=2",
                   "train.val_every=2", "train.log_every=1")
    summary = run(cfg, in_process=True)
    assert summary["steps"] == 2
    assert summary["data"]["train_records"] + summary["data"]["val_records"] == len(rows)
    assert all(np.isfinite(v) for v in summary["losses"].values())
