"""The Ray Data pipelines that feed training: real Ray Data, real wfdb, real Parquet."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from melp_ray.data.shards import read_shard_table
from melp_ray.data.records import minmax_normalise
from melp_ray.data.rows import split_refs
from melp_ray.train.stream import StreamSpec, rank_datasets
from melp_ray.data.prepare import PrepareSettings, prepare
from melp_ray.text.report_ids import encode_reports, load_report_tokenizer

SPEC = StreamSpec(sample_rate=100, seconds=10, text_model="minilm", max_text_length=32)


@pytest.fixture(scope="module")
def shards(ray_local, bundled_ptbxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_shards")
    prepare(PrepareSettings(dataset="ptb-xl", root=str(bundled_ptbxl), out=str(out),
                            sample_rate=100, shard_size=16, limit=64, val_fraction=0.2))
    return out


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_minmax_normalise_maps_each_record_to_unit_range():
    x = np.random.default_rng(0).normal(size=(3, 12, 50)).astype(np.float32) * [[[1]], [[5]], [[0.1]]]
    y = minmax_normalise(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.min(axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(y.max(axis=(1, 2)), 1, atol=1e-6)


def test_raw_wfdb_stream_gives_model_batches_split_by_rank(ray_local, bundled_ptbxl):
    refs = split_refs("ptb-xl", str(bundled_ptbxl), "train", 0.1, 0, 24, 100)
    per_rank = [collect(ds) for ds in rank_datasets(str(bundled_ptbxl), "train", 2, SPEC, limit=24)]
    assert [len(r["ecg"]) for r in per_rank] == [len(refs[0::2]), len(refs[1::2])]
    first = per_rank[0]
    assert first["ecg"].shape[1:] == (12, 1000) and first["ecg"].dtype == np.float32
    assert first["ecg"].min() >= 0 and first["ecg"].max() <= 1
    # Tokenised on the data workers, exactly as the shared tokenisation does it.
    expected = encode_reports(load_report_tokenizer("minilm"), [r.report for r in refs[0::2]], 32)
    for key in ("input_ids", "attention_mask", "sentence_ids"):
        np.testing.assert_array_equal(first[key], expected[key])
    assert first["labels_super"].shape == (len(refs[0::2]), 5)
    assert first["labels_super"].sum() > 0


def test_shard_stream_gives_each_rank_fixed_rows_in_a_fixed_order(ray_local, shards):
    a = [collect(ds) for ds in rank_datasets(str(shards), "train", 2, SPEC)]
    b = [collect(ds) for ds in rank_datasets(str(shards), "train", 2, SPEC)]
    for x, y in zip(a, b):   # deterministic: same rows, same order, every time
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["ecg"], y["ecg"])
    from melp_ray.data.shards import load_manifest

    manifest = load_manifest(str(shards))
    assert sum(len(r["ecg"]) for r in a) == manifest["splits"]["train"]["records"]


def test_read_tasks_hold_a_few_files_of_signal_each():
    from melp_ray.data.rows import RowSlice
    from melp_ray.train.stream import READ_TASK_BYTES, read_tasks

    files = [RowSlice(f"f{i}", 0, 256) for i in range(18)]   # 18 full 256-row shards
    at_500 = StreamSpec(sample_rate=500, seconds=10, text_model="minilm", max_text_length=32)
    rows_per_task = READ_TASK_BYTES // (12 * 5000 * 4)
    assert read_tasks(files, at_500) == -(-18 * 256 // rows_per_task) < 18
    assert read_tasks(files, SPEC) < read_tasks(files, at_500)       # 100 Hz rows are smaller
    assert read_tasks(files[:1], at_500) == 1
    one_row_each = [RowSlice("f", i, i + 1) for i in range(5)]
    assert read_tasks(one_row_each, at_500) == 1
    assert read_tasks([], at_500) == 1                               # the empty pipeline


def test_many_read_tasks_give_the_rows_of_one_in_the_same_order(ray_local, shards, monkeypatch):
    """Slices grouped into several Ray Data tasks stream the very rows, in the very order,
    that one task reading all of them gives (exact resume depends on the order)."""
    from melp_ray.data.rows import deal_rows, shard_files, shard_rows
    from melp_ray.train import stream

    one = collect(rank_datasets(str(shards), "train", 1, SPEC)[0])
    monkeypatch.setattr(stream, "READ_TASK_BYTES", 12 * 1000 * 4 * 7)   # 7 rows a task
    slices = deal_rows(shard_rows(shard_files(str(shards), "train")), 1, 0)
    assert 1 < stream.read_tasks(slices, SPEC) == len(slices)   # several tasks, not one
    many = collect(rank_datasets(str(shards), "train", 1, SPEC)[0])
    for key in ("ecg", "input_ids", "sentence_ids"):
        np.testing.assert_array_equal(one[key], many[key])


def test_read_tasks_decode_full_batches_across_file_ends(make_shards, tmp_path):
    """A read task decodes ``rows`` rows at a time whatever the files' sizes, held-out rows
    taken out first: every batch but the task's last is full, and together they are the
    files' rows in file order."""
    from melp_ray.data.rows import shard_files
    from melp_ray.train.stream import read_slices

    root = make_shards(tmp_path, [5, 7, 3], [2])
    files = shard_files(str(root), "train")
    whole = {"path": files, "start": [0] * len(files), "stop": [1 << 62] * len(files)}
    folds = np.concatenate([read_shard_table(f, columns=["strat_fold"])["strat_fold"].to_numpy()
                            for f in files])
    held_out = tuple(sorted(set(folds.tolist())))[:1]
    for exclude, kept in (((), slice(None)), (held_out, ~np.isin(folds, held_out))):
        batches = list(read_slices(whole, SPEC, exclude, rows=4))
        sizes = [len(b["ecg"]) for b in batches]
        assert sizes[:-1] == [4] * (len(sizes) - 1) and 0 < sizes[-1] <= 4, sizes
        np.testing.assert_array_equal(np.concatenate([b["ecg"] for b in batches]),
                                      shard_ecg(root)["train"][kept])


def test_rows_per_yield_is_the_largest_power_of_two_in_a_block():
    from melp_ray.train.stream import BLOCK_BYTES, MAX_ROWS_PER_YIELD, rows_per_yield, signal_bytes

    for rate in (100, 500, 1000, 5000):
        spec = StreamSpec(sample_rate=rate, seconds=10, text_model="minilm", max_text_length=32)
        rows = rows_per_yield(spec)
        assert rows & (rows - 1) == 0 and rows <= MAX_ROWS_PER_YIELD          # a power of two
        assert rows * signal_bytes(spec) <= BLOCK_BYTES
        assert rows == MAX_ROWS_PER_YIELD or 2 * rows * signal_bytes(spec) > BLOCK_BYTES
    at_500 = StreamSpec(sample_rate=500, seconds=10, text_model="minilm", max_text_length=32)
    assert rows_per_yield(at_500) == 512     # the paper config's micro-batch 64 divides it


def test_each_decoded_batch_reaches_the_consumer_as_one_block(ray_local, shards, monkeypatch):
    """Ray Data leaves the read task's batches as they are (it would otherwise join small
    ones into blocks of up to 128 MiB and cut them at any row), so micro-batches of a power
    of two are whole slices of blocks."""
    from melp_ray.train import stream

    monkeypatch.setattr(stream, "MAX_ROWS_PER_YIELD", 8)
    ds = rank_datasets(str(shards), "train", 1, SPEC)[0]
    blocks = [m.num_rows for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    total = sum(blocks)
    assert total > 16   # one read task: its batches of 8 rows, the last one shorter
    assert blocks == [8] * (total // 8) + ([total % 8] if total % 8 else []), blocks


def test_shards_with_another_rate_are_refused(ray_local, shards):
    """A spec that does not know the shards' rate (``shard_rate``) cannot resample them."""
    spec = StreamSpec(sample_rate=500, seconds=10, text_model="minilm", max_text_length=32)
    with pytest.raises(Exception, match="re-run prepare"):
        collect(rank_datasets(str(shards), "train", 1, spec)[0])


def shard_ecg(root) -> dict[str, np.ndarray]:
    """{split: the model-ready ECGs of all its shard rows, in file order}."""
    from melp_ray.data.shards import decode_ecg, read_shard_table
    from melp_ray.data.rows import shard_files

    return {split: np.stack([minmax_normalise(decode_ecg(b)) for path in shard_files(str(root), split)
                             for b in read_shard_table(path, columns=["ecg"])["ecg"].to_pylist()])
            for split in ("train", "val")}


def ranks_ecg(root, split: str, world: int) -> list[np.ndarray]:
    return [np.asarray(list(collect_or_empty(ds))) for ds in rank_datasets(str(root), split, world, SPEC)]


def collect_or_empty(ds):
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from batch["ecg"]


@pytest.mark.parametrize("train, val, world", [([16], [9], 2),       # 1 shard, 2 workers
                                               ([16, 16, 16], [1], 2),   # 3 shards; 1 val record
                                               ([16], [5], 8)])      # more workers than records
def test_any_number_of_shards_feeds_any_number_of_workers(ray_local, make_shards, tmp_path,
                                                          train, val, world):
    """Rows, not whole files, are dealt: each rank a contiguous run of the rows, the runs
    differing by at most one row, every record read exactly once (a rank may get none)."""
    root = make_shards(tmp_path, train, val)
    expected = shard_ecg(root)
    for split in ("train", "val"):
        per_rank = ranks_ecg(root, split, world)
        sizes = [len(r) for r in per_rank]
        assert max(sizes) - min(sizes) <= 1, (split, sizes)
        np.testing.assert_array_equal(np.concatenate([r for r in per_rank if len(r)]), expected[split])


def test_iter_torch_batches_feeds_tensors(ray_local, shards):
    import torch

    ds = rank_datasets(str(shards), "train", 1, SPEC)[0]
    batch = next(iter(ds.iter_torch_batches(batch_size=4, drop_last=True)))
    assert set(batch) == {"ecg", "input_ids", "attention_mask", "sentence_ids", "labels_super"}
    assert batch["ecg"].shape == (4, 12, 1000) and batch["input_ids"].dtype == torch.int64


# ---------------------------------------------------------------- held-out folds

def expected_ecg(refs, root) -> np.ndarray:
    from melp_ray.data.records import load_signal

    return np.stack([minmax_normalise(load_signal(r, str(root), 100, 10)) for r in refs])


def test_excluded_folds_never_reach_a_raw_root_stream(ray_local, bundled_ptbxl):
    refs = split_refs("ptb-xl", str(bundled_ptbxl), "train", 0.1, 0, 48, 100)
    held = [r for r in refs if r.strat_fold == 2]
    kept = [r for r in refs if r.strat_fold != 2]
    assert held and kept   # the first 48 records of the sample span folds 1-6
    counts: dict[str, int] = {}
    (ds,) = rank_datasets(str(bundled_ptbxl), "train", 1, SPEC, limit=48, exclude_folds=[2],
                          counts=counts)
    got = collect(ds)["ecg"]
    assert counts == {"records": len(kept), "held_out": len(held)}
    # Exactly the records of the other folds, in order; none of fold 2.
    np.testing.assert_array_equal(got, expected_ecg(kept, bundled_ptbxl))
    for ecg in expected_ecg(held, bundled_ptbxl):
        assert not any(np.array_equal(ecg, row) for row in got)


def test_excluding_every_fold_is_a_clear_error(ray_local, bundled_ptbxl):
    with pytest.raises(ValueError, match=r"only 0 val record\(s\) for 1 workers \(.* held out\)"):
        rank_datasets(str(bundled_ptbxl), "val", 1, SPEC, exclude_folds=[1, 2, 3, 4, 5, 6])


def test_excluded_folds_never_reach_a_shard_stream(ray_local, shards):
    import pyarrow.parquet as pq

    from melp_ray.data.shards import decode_ecg
    from melp_ray.data.rows import shard_files

    table = pq.read_table(shard_files(str(shards), "train"), columns=["ecg", "strat_fold"])
    folds = np.asarray(table["strat_fold"])
    assert (folds == 3).any() and (folds != 3).any()
    counts: dict[str, int] = {}
    (ds,) = rank_datasets(str(shards), "train", 1, SPEC, exclude_folds=[3], counts=counts)
    got = collect(ds)["ecg"]
    assert counts == {"records": int((folds != 3).sum()), "held_out": int((folds == 3).sum())}
    rows = [minmax_normalise(decode_ecg(b)) for b, f in zip(table["ecg"].to_pylist(), folds) if f != 3]
    np.testing.assert_array_equal(got, np.stack(rows))


def test_pretrain_datasets_hold_out_folds_and_say_how_many(ray_local, bundled_ptbxl, capsys,
                                                           caplog):
    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.data.sources import list_records, scan_records
    from melp_ray.pretraining.run import build_datasets

    cfg = load_config(PretrainConfig, "tiny", ["data.exclude_folds=[6]"])
    info: dict = {}
    with caplog.at_level("WARNING", logger="melp_ray.data.rows"):
        datasets = build_datasets(cfg, info)
    # Records rejected from the metadata (the sample has one: an empty report) are named
    # once, not once per split.
    rejected = scan_records("ptb-xl", str(bundled_ptbxl), sample_rate=100).details
    assert rejected
    for record_id in rejected:
        assert sum(f"rejected record {record_id}:" in m for m in caplog.messages) == 1
    refs = list_records("ptb-xl", str(bundled_ptbxl), sample_rate=100)
    n_fold6 = sum(r.strat_fold == 6 for r in refs)
    assert info["held_out"] == {"folds": [6], "records": n_fold6}
    assert info["train_records"] + info["val_records"] == len(refs) - n_fold6
    assert f"{n_fold6} records of folds [6] held out" in capsys.readouterr().out
    streamed = sum(len(collect(ds)["ecg"]) for ds in datasets.values())
    assert streamed == len(refs) - n_fold6


def test_materialized_datasets_give_the_same_shuffled_batches(ray_local, bundled_ptbxl):
    """``data.materialize`` runs the pipeline once up front; epochs must see exactly the rows,
    in exactly the seeded shuffle order, that the streaming pipeline gives (exact resume)."""
    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.pretraining.run import build_datasets
    from ray.data.dataset import MaterializedDataset

    def epoch(ds, seed):
        batches = ds.iter_batches(batch_size=8, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=16, local_shuffle_seed=seed)
        return [(b["ecg"], b["input_ids"]) for b in batches]

    base = ["data.limit=48", "data.val_fraction=0.2"]
    streamed = build_datasets(load_config(PretrainConfig, "tiny", base))
    cached = build_datasets(load_config(PretrainConfig, "tiny", base + ["data.materialize=true"]))
    assert streamed.keys() == cached.keys()
    assert all(isinstance(ds, MaterializedDataset) for ds in cached.values())
    for name in ("val_r0", "val_r1"):           # validation: not shuffled, same rows
        np.testing.assert_array_equal(collect(cached[name])["ecg"], collect(streamed[name])["ecg"])
    for name in ("train_r0", "train_r1"):
        for seed in (0, 1):                      # two epochs: a different order each
            want, got = epoch(streamed[name], seed), epoch(cached[name], seed)
            assert len(got) == len(want) > 0
            for (ecg_w, ids_w), (ecg_g, ids_g) in zip(want, got):
                np.testing.assert_array_equal(ecg_g, ecg_w)
                np.testing.assert_array_equal(ids_g, ids_w)
    assert not np.array_equal(epoch(cached["train_r0"], 0)[0][0], epoch(cached["train_r0"], 1)[0][0])


def shard_listing(sizes: list[int], held_out: dict[int, set[int]] | None = None) -> list:
    from melp_ray.data.rows import ShardRows

    held_out = held_out or {}
    return [ShardRows(f"train/part-{i:05d}.parquet", n,
                      tuple(r for r in range(n) if r not in held_out.get(i, set())))
            for i, n in enumerate(sizes)]


def rows_read(slices, files) -> list[tuple[str, int]]:
    """The kept rows the slices cover (held-out rows inside a slice are dropped on reading)."""
    kept = {(f.path, r) for f in files for r in f.kept}
    return [(s.path, r) for s in slices for r in range(s.start, s.stop) if (s.path, r) in kept]


@pytest.mark.parametrize("sizes, world", [([256], 2), ([256, 256, 100], 2), ([1], 2),
                                          ([7, 3, 9, 1, 12], 4), ([5, 5], 16)])
def test_each_epoch_deals_every_record_to_exactly_one_rank(sizes, world):
    from melp_ray.data.rows import deal_rows

    files = shard_listing(sizes, held_out={0: {0, 2}})    # held-out rows never dealt
    kept = [(f.path, r) for f in files for r in f.kept]
    # No epoch (validation, fixed slices): rank after rank, the kept rows in file order.
    assert [r for rank in range(world) for r in rows_read(deal_rows(files, world, rank), files)] == kept
    deals = {0: [], 1: []}
    for seed in deals:
        for epoch in range(4):
            dealt = [deal_rows(files, world, rank, epoch, seed) for rank in range(world)]
            read = [rows_read(d, files) for d in dealt]
            assert sorted(r for rank_rows in read for r in rank_rows) == sorted(kept)  # each once
            assert max(map(len, read)) - min(map(len, read)) <= 1   # balanced to one row
            assert dealt == [deal_rows(files, world, rank, epoch, seed) for rank in range(world)]
            deals[seed].append(dealt)
    if len(sizes) > 2:            # several files: epochs and seeds deal them anew
        assert any(d != deals[0][0] for d in deals[0][1:])
        assert deals[0] != deals[1]


def test_too_few_train_records_for_the_workers_is_a_config_error(make_shards, tmp_path):
    """Fewer train records than workers x micro-batch: exit 2 with a clear message from the
    manifest, before Ray is even imported; one record more per worker is fine."""
    from melp_ray.config import ConfigError, PretrainConfig, load_config
    from melp_ray.pretraining.run import check_shards_fit

    root = make_shards(tmp_path, [6], [1])
    ok = load_config(PretrainConfig, "tiny", [f"data.root={root}", "train.global_batch_size=6"])
    check_shards_fit(ok)                                   # 3 records a worker, batch 3 each
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={root}", "train.global_batch_size=8"])
    message = ("6 train records give each of train.num_workers=2 workers 3, fewer than one "
               "micro-batch of 4")
    with pytest.raises(ConfigError, match=message):
        check_shards_fit(cfg)
    # Held-out folds count too (read from the shards' strat_fold column, not the manifest).
    folds = sorted(set(read_shard_table(str(root / "train" / "part-00000.parquet"),
                                        columns=["strat_fold"])["strat_fold"].to_pylist()))
    held = load_config(PretrainConfig, "tiny", [f"data.root={root}", "train.global_batch_size=6",
                                                f"data.exclude_folds=[{folds[0]}]"])
    with pytest.raises(ConfigError, match="give each of train.num_workers=2 workers [0-2], "):
        check_shards_fit(held)
    code = ("import sys; from melp_ray.pretrain import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--config", "tiny", f"data.root={root}",
                           "train.global_batch_size=8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_shards_of_another_rate_are_resampled_another_duration_is_a_config_error(make_shards,
                                                                                tmp_path):
    """The default prepare stores 500 Hz, the small config trains at 100 Hz: the shards are
    resampled as they are read (as raw records are). A duration cannot be made up: said
    before Ray starts, instead of a worker's traceback."""
    from melp_ray.config import ConfigError, PretrainConfig, load_config
    from melp_ray.data.records import resample
    from melp_ray.data.shards import decode_ecg, read_shard_table
    from melp_ray.data.rows import shard_files
    from melp_ray.train.stream import decode_shard_batch
    from melp_ray.pretraining.run import check_shards_fit
    from melp_ray.train.stream import stream_spec

    root = make_shards(tmp_path, [16], [1])                # 100 Hz x 10 s
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={root}", "data.sample_rate=50"])
    check_shards_fit(cfg)
    spec = stream_spec(cfg)
    assert (spec.shard_rate, spec.n_samples) == (100, 500)
    table = read_shard_table(shard_files(str(root), "val")[0], columns=["ecg", "report", "labels_super"])
    batch = decode_shard_batch({k: np.asarray(table[k].to_pylist(), dtype=object) for k in table.column_names},
                               spec)
    expected = minmax_normalise(resample(decode_ecg(table["ecg"][0].as_py())[None], 100, 50))
    np.testing.assert_array_equal(batch["ecg"], expected)
    assert batch["ecg"].shape == (1, 12, 500)
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={root}", "data.seconds=5"])
    with pytest.raises(ConfigError, match="the shards hold 10 s ECGs \\(100 Hz\\), the config asks "
                                          "for data.seconds=5: add data.seconds=10, or re-run "
                                          "prepare with --seconds 5"):
        check_shards_fit(cfg)
