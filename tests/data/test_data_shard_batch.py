"""The shard batch transform (decode straight from Arrow, normalise in place) gives the very
batch of the per-record path it replaced: decode_ecg of each row, stack, finish_batch."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from melp_ray.data.records import load_signal
from melp_ray.data.shards import decode_ecg, decode_ecg_column, read_shard_table, shard_row, write_shard
from melp_ray.data.sources import scan_records
from melp_ray.train.stream import StreamSpec, decode_shard_batch, finish_batch

SPEC = StreamSpec(sample_rate=100, seconds=10.0, text_model="minilm", max_text_length=64)
COLUMNS = ["ecg", "report", "labels_super", "strat_fold"]


@pytest.fixture(scope="module")
def records(bundled_ptbxl):
    refs = scan_records("ptb-xl", str(bundled_ptbxl), limit=24, sample_rate=100).refs
    return [(ref, load_signal(ref, str(bundled_ptbxl), 100, 10)) for ref in refs]


def shard_table(records, encoding: str, tmp_path) -> pa.Table:
    path = tmp_path / f"{encoding}.parquet"
    write_shard([shard_row(ref, "train", signal, encoding) for ref, signal in records], path)
    return read_shard_table(path, columns=COLUMNS)


def per_record_batch(table: pa.Table, spec: StreamSpec, exclude_folds=()) -> dict:
    rows = [r for r in table.to_pylist() if r["strat_fold"] not in exclude_folds]
    ecg = np.stack([decode_ecg(r["ecg"]) for r in rows])
    return finish_batch(ecg, [r["report"] for r in rows], [r["labels_super"] for r in rows], spec)


def assert_same_batch(expected: dict, got: dict) -> None:
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.parametrize("encoding", ["float32", "float16", "int16"])
def test_arrow_batch_equals_the_per_record_path(records, tmp_path, encoding):
    table = shard_table(records, encoding, tmp_path)
    assert_same_batch(per_record_batch(table, SPEC), decode_shard_batch(table, SPEC))


def test_held_out_folds_are_dropped_and_the_rest_is_unchanged(records, tmp_path):
    table = shard_table(records, "int16", tmp_path)
    folds = sorted(set(table["strat_fold"].to_pylist()))[:2]
    got = decode_shard_batch(table, SPEC, exclude_folds=tuple(folds))
    expected = per_record_batch(table, SPEC, exclude_folds=folds)
    assert 0 < len(got["ecg"]) < table.num_rows
    assert_same_batch(expected, got)


def test_a_dict_of_columns_gives_the_same_batch(records, tmp_path):
    table = shard_table(records, "float32", tmp_path)
    columns = {name: table[name].to_numpy(zero_copy_only=False) for name in COLUMNS}
    assert_same_batch(decode_shard_batch(table, SPEC), decode_shard_batch(columns, SPEC))


def test_decode_ecg_column_of_a_sliced_array_reads_the_right_rows(records, tmp_path):
    column = shard_table(records, "float32", tmp_path)["ecg"].combine_chunks()
    got = decode_ecg_column(column.slice(3, 5))
    np.testing.assert_array_equal(got, np.stack([decode_ecg(v) for v in column.to_pylist()[3:8]]))


def test_a_batch_mixing_lengths_is_refused():
    short, long = (np.zeros((12, n), np.float32).tobytes() for n in (10, 20))
    with pytest.raises(ValueError, match="different lengths"):
        decode_ecg_column(pa.array([short, long], pa.binary()))
