"""Shards on an object store: prepare into, and train from, a real S3-protocol server.

The server is moto's (``moto[server]``) on 127.0.0.1, reached over HTTP through pyarrow's
S3 filesystem exactly as a bucket on AWS or MinIO would be (``endpoint_override`` in the URI).
Each test runs in an empty working directory and checks it stays empty: a URI must never
be taken for a local path (it once became a folder named ``s3:``).
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pyarrow.fs as pafs
import pytest

from melp_ray.utils import storage
from melp_ray.config_sections import DataConfig, check_data_root, data_has_labels
from melp_ray.data import shards
from melp_ray.data.sources import DataRootError, detect_layout, list_records
from melp_ray.data.records import minmax_normalise
from melp_ray.train.stream import StreamSpec, rank_datasets
from melp_ray.prepare import main

BUCKET = "melp-test"
SPEC = StreamSpec(sample_rate=100, seconds=10, text_model="minilm", max_text_length=32)
# 32 bundled records at 100 Hz, 4 per shard: 24 train records (6 shards), 8 val (2 shards).
PREPARE_ARGS = ["--dataset", "ptb-xl", "--limit", "32", "--shard-size", "4", "--sample-rate", "100",
                "--val-fraction", "0.25"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(s3_test_credentials):
    """``host:port`` of a running S3 server holding an empty bucket BUCKET; the dummy
    credentials are set in this process for the module (the Ray workers have them too)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_test_credentials.items():
            patch.setenv(name, value)
        endpoint = f"127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    server.stop()


def s3_uri(endpoint: str, key: str) -> str:
    return f"s3://{BUCKET}/{key}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="module")
def prepared(s3_endpoint, ray_local, bundled_ptbxl, tmp_path_factory):
    """The same records prepared twice with the CLI: into the bucket (from an empty working
    directory, which must stay empty) and into a local folder. (uri, local folder, cwd)."""
    uri = s3_uri(s3_endpoint, "shards")
    local = tmp_path_factory.mktemp("local") / "shards"
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        assert main([*PREPARE_ARGS, "--root", str(bundled_ptbxl), "--out", uri]) == 0
    assert main([*PREPARE_ARGS, "--root", str(bundled_ptbxl), "--out", str(local)]) == 0
    return uri, local, cwd


def test_prepare_writes_into_the_bucket_and_nothing_locally(prepared, s3_endpoint):
    uri, local, cwd = prepared
    assert os.listdir(cwd) == []
    manifest = shards.load_manifest(uri)
    assert (manifest["input"], manifest["kept"]) == (32, 32)
    assert [s["split"] for s in manifest["shards"]].count("train") == 6
    assert manifest["shards"] == shards.load_manifest(local)["shards"]
    # Listed with a filesystem of our own, not through melp_ray: the objects are in the bucket.
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    keys = {info.path for info in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/shards", recursive=True))}
    for shard in manifest["shards"]:
        assert f"{BUCKET}/shards/{shard['path']}" in keys
    assert f"{BUCKET}/shards/manifest.json" in keys
    assert not any(".tmp-" in key for key in keys)


def test_shards_in_the_bucket_hold_the_same_rows_as_local_ones(prepared):
    uri, local, _ = prepared
    for remote_path, local_path in zip(shards.shard_paths(uri), shards.shard_paths(local), strict=True):
        assert remote_path.startswith(f"s3://{BUCKET}/shards/") and "endpoint_override=" in remote_path
        remote_rows, local_rows = shards.read_shard_rows(remote_path), shards.read_shard_rows(local_path)
        assert [r["record_id"] for r in remote_rows] == [r["record_id"] for r in local_rows]
        for remote, expected in zip(remote_rows, local_rows, strict=True):
            np.testing.assert_array_equal(remote["ecg"], expected["ecg"])


def test_rerun_resumes_skipping_finished_chunks(prepared, bundled_ptbxl, empty_cwd):
    uri, _, _ = prepared
    state_done = storage.join(uri, shards.state_relpath("train", 0))
    state_redo = storage.join(uri, shards.state_relpath("train", 1))
    # A marker only a skipped chunk keeps; a killed run's temp file; a chunk to redo.
    done = storage.read_json(state_done)
    storage.write_json(state_done, {**done, "details": {"marker": "kept because skipped"}})
    stale_tmp = storage.join(uri, "train", "part-00001.parquet.tmp-1")
    storage.write_bytes(stale_tmp, b"half a shard")
    storage.delete_file(state_redo)
    assert main([*PREPARE_ARGS, "--root", str(bundled_ptbxl), "--out", uri]) == 0
    assert storage.read_json(state_done)["details"] == {"marker": "kept because skipped"}
    assert storage.read_json(state_redo)["rows"] == 4
    assert not storage.exists(stale_tmp)
    assert shards.load_manifest(uri)["kept"] == 32
    assert os.listdir(empty_cwd) == []


def test_pretraining_streams_read_the_bucket(prepared):
    uri, local, _ = prepared
    assert detect_layout(uri) == "shards"
    check_data_root(DataConfig(root=uri))                 # what pretrain runs before Ray
    assert data_has_labels(DataConfig(root=uri)) is True   # the manifest says ptb-xl
    per_rank = rank_datasets(uri, "train", 2, SPEC)
    first_rank = [row for batch in per_rank[0].iter_batches(batch_size=None, batch_format="numpy")
                  for row in batch["ecg"]]
    # Rank 0 reads the first half of the train rows (deal_rows): shards 0-2, in manifest order.
    expected = [row["ecg"] for path in shards.shard_paths(local, "train")[:3]
                for row in shards.read_shard_rows(path)]
    assert len(first_rank) == len(expected) == 12
    np.testing.assert_allclose(np.stack(first_rank), minmax_normalise(np.stack(expected)), rtol=0, atol=0)


def test_a_uri_without_shards_is_refused_with_a_hint(s3_endpoint, empty_cwd):
    raw_copy = s3_uri(s3_endpoint, "raw-ptbxl")
    storage.write_text(storage.join(raw_copy, "ptbxl_database.csv"), "ecg_id\n")
    with pytest.raises(DataRootError, match="prepared shards.*raw WFDB roots must be local"):
        detect_layout(raw_copy)
    with pytest.raises(DataRootError, match="must be read from a local folder"):
        list_records("ptb-xl", raw_copy)
    assert main([*PREPARE_ARGS, "--root", raw_copy, "--out", "out"]) == 2
    assert os.listdir(empty_cwd) == []


@pytest.mark.slow   # the S3 client retries a refused connection for about 12 s
def test_unreachable_endpoint_fails_clearly_and_writes_nothing(bundled_ptbxl, empty_cwd, capsys,
                                                               monkeypatch, s3_test_credentials):
    for name, value in s3_test_credentials.items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{BUCKET}/shards?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    assert main([*PREPARE_ARGS, "--root", str(bundled_ptbxl), "--out", uri]) == 2
    error = capsys.readouterr().err
    assert "prepare: error: cannot use --out s3://" in error and "127.0.0.1" in error
    assert os.listdir(empty_cwd) == []


def test_files_under_a_uri_are_listed_and_read_as_uris(tmp_path):
    """file:// goes through pyarrow's from_uri like s3://, with the local disk as bucket."""
    folder = f"file://{tmp_path}/shards"
    storage.write_text(storage.join(folder, "train", "a.txt"), "a")
    storage.write_text(storage.join(folder, "b.txt"), "b")
    files = storage.list_files(folder)
    assert files == [f"{folder}/b.txt", f"{folder}/train/a.txt"]
    filesystem, paths = storage.filesystem_and_paths(files)
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert paths == [f"{tmp_path}/shards/b.txt", f"{tmp_path}/shards/train/a.txt"]
    assert storage.filesystem_and_paths([str(tmp_path / "x")]) == (None, [str(tmp_path / "x")])
    with pytest.raises(ValueError, match="not on the filesystem"):
        storage.filesystem_and_paths([files[0], "s3://other/b.txt"])
    with pytest.raises(ValueError, match="local paths and URIs"):
        storage.filesystem_and_paths([files[0], str(tmp_path / "x")])
    storage.delete_file(files[0])
    assert storage.list_files(folder) == [f"{folder}/train/a.txt"]
    assert storage.list_files(f"file://{tmp_path}/nothing") == []


def test_pretrain_reads_the_bucket_and_checkpoints_into_it(prepared, s3_endpoint, tiny_cfg, empty_cwd):
    """2 steps of the tiny model on Ray Train: data.root and run.storage_path both in the
    bucket. One worker: the bucket is read and written the same way by each of several.
    A checkpoint each step, uploaded while training goes on (``train.checkpoint_upload=async``,
    the default): both are whole in the bucket when the run returns, named by step."""
    from melp_ray.hub.checkpoint import consolidated_state_dict, resolve_checkpoint
    from melp_ray.pretraining.run import run

    uri, _, _ = prepared
    runs = s3_uri(s3_endpoint, "runs")
    cfg = tiny_cfg(runs, "from-s3", f"data.root={uri}", "data.limit=null", "train.max_steps=2",
                   "train.log_every=1", "train.val_every=2", "train.checkpoint_every=1",
                   "train.num_workers=1")
    summary = run(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["losses"]["total"])
    checkpoint = summary["last_checkpoint"]
    assert checkpoint.startswith(f"s3://{BUCKET}/runs/from-s3/checkpoint_step_000002?")
    assert checkpoint.endswith("&scheme=http")
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    folders = sorted(info.base_name for info in fs.get_file_info(
        pafs.FileSelector(f"{BUCKET}/runs/from-s3")) if info.type == pafs.FileType.Directory
        and info.base_name.startswith("checkpoint_"))
    assert folders == ["checkpoint_step_000001", "checkpoint_step_000002"]
    for step, name in enumerate(folders, start=1):
        folder = s3_uri(s3_endpoint, f"runs/from-s3/{name}")
        assert storage.read_json(storage.join(folder, "trainer_state.json"))["step"] == step
    assert resolve_checkpoint(summary["run_dir"]) == checkpoint
    assert all(np.isfinite(v.numpy()).all() for v in consolidated_state_dict(checkpoint).values())
    assert storage.read_json(storage.join(summary["run_dir"], "summary.json"))["steps"] == 2
    assert os.listdir(empty_cwd) == []


def test_evaluate_reads_shards_from_the_bucket_and_writes_results_there(
        prepared, s3_endpoint, tiny_checkpoint, tmp_path, empty_cwd):
    """evaluate --dataset shards --root s3://... --out s3://...: the same recalls as the
    same shards on the local disk, the result files in the bucket, nothing local."""
    import json

    from melp_ray import evaluate

    uri, local, _ = prepared
    common = ["--checkpoint", tiny_checkpoint, "--dataset", "shards", "--mode", "retrieval",
              "--test-folds", "1-10", "--actors", "0"]
    out_uri = s3_uri(s3_endpoint, "eval/retrieval")
    assert evaluate.main([*common, "--root", uri, "--out", out_uri]) == 0
    assert os.listdir(empty_cwd) == []
    remote = json.loads(storage.read_text(storage.join(out_uri, "results.json")))
    assert storage.is_file(storage.join(out_uri, "results.md"))
    assert evaluate.main([*common, "--root", str(local), "--out", str(tmp_path / "local")]) == 0
    expected = json.loads((tmp_path / "local" / "results.json").read_text())
    assert remote["n_pairs"] == expected["n_pairs"] == 32 - len(
        remote["records"]["excluded_before_loading"].get("empty_report", []))
    for k in (1, 5, 10):
        assert remote[f"recall@{k}"] == expected[f"recall@{k}"]
