"""EpochPrefetcher over real Ray Data iterators: same batches, same order, next epoch early."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from melp_ray.train.prefetch import EpochPrefetcher

ROWS, BATCH = 40, 8          # 5 batches per epoch


@pytest.fixture(scope="module")
def dataset(ray_local):
    import ray.data

    ds = ray.data.range(ROWS, override_num_blocks=4)
    ds.context.execution_options.preserve_order = True
    return ds


def epochs_of(dataset, started: list | None = None):
    """Epoch e: the dataset with a local shuffle seeded by e (as the training recipe does)."""
    def epoch_batches(epoch: int):
        if started is not None:
            started.append(epoch)
        return dataset.iter_batches(batch_size=BATCH, drop_last=True, batch_format="numpy",
                                    local_shuffle_buffer_size=16, local_shuffle_seed=epoch)
    return epoch_batches


def ids(batch) -> list[int]:
    return batch["id"].tolist()


def drain(prefetcher: EpochPrefetcher, epoch: int) -> list[list[int]]:
    out = []
    while (batch := prefetcher.next(epoch)) is not None:
        out.append(ids(batch))
    return out


def test_batches_and_order_equal_iterating_the_epochs_in_turn(dataset):
    reference = [[ids(b) for b in epochs_of(dataset)(e)] for e in range(3)]
    assert reference[0] != reference[1]          # the shuffle differs per epoch: order matters
    prefetcher = EpochPrefetcher(epochs_of(dataset), depth=3)
    try:
        assert [drain(prefetcher, e) for e in range(3)] == reference
    finally:
        prefetcher.close()


def test_resume_skips_exactly_the_consumed_batches(dataset):
    reference = [[ids(b) for b in epochs_of(dataset)(e)] for e in (1, 2)]
    prefetcher = EpochPrefetcher(epochs_of(dataset), start_epoch=1, skip=3, depth=2)
    try:
        assert drain(prefetcher, 1) == reference[0][3:]
        assert drain(prefetcher, 2) == reference[1]
    finally:
        prefetcher.close()


def test_leaving_an_epoch_early_drops_its_rest(dataset):
    """Another rank ran out first: the next epoch starts at its first batch."""
    reference = [[ids(b) for b in epochs_of(dataset)(e)] for e in (0, 1)]
    prefetcher = EpochPrefetcher(epochs_of(dataset), depth=2)
    try:
        assert ids(prefetcher.next(0)) == reference[0][0]
        assert drain(prefetcher, 1) == reference[1]
    finally:
        prefetcher.close()


def test_next_epoch_starts_before_the_current_one_is_used_up(dataset):
    started: list[int] = []
    epoch_1_started = threading.Event()
    plain = epochs_of(dataset, started)

    def epoch_batches(epoch: int):
        batches = plain(epoch)
        if epoch == 1:
            epoch_1_started.set()
        return batches

    prefetcher = EpochPrefetcher(epoch_batches, depth=4)
    try:
        first = [ids(prefetcher.next(0)) for _ in range(2)]   # 3 of 5 batches still unused
        # With 4 batches of room the thread runs into epoch 1 on its own.
        assert epoch_1_started.wait(timeout=60)
        assert started[:2] == [0, 1]
        assert len(first) == 2 and len(drain(prefetcher, 0)) == 3
    finally:
        prefetcher.close()


def test_a_failing_pipeline_raises_in_the_training_thread(dataset):
    def broken(batch):
        if int(np.max(batch["id"])) >= 30:
            raise ValueError("corrupt shard 7")
        return batch

    failing = dataset.map_batches(broken, batch_format="numpy", batch_size=10)
    prefetcher = EpochPrefetcher(
        lambda e: failing.iter_batches(batch_size=BATCH, batch_format="numpy"), depth=2)
    try:
        with pytest.raises(Exception, match="corrupt shard 7"):
            drain(prefetcher, 0)
    finally:
        prefetcher.close()


def test_close_stops_a_thread_blocked_on_a_full_queue(dataset):
    prefetcher = EpochPrefetcher(epochs_of(dataset), depth=1)
    assert prefetcher.next(0) is not None
    prefetcher.close()
    assert not prefetcher._thread.is_alive()


def test_close_returns_even_if_the_pipeline_never_answers():
    never = threading.Event()

    def stuck_epoch(epoch):
        never.wait()                  # a data pipeline that hangs
        yield from ()

    prefetcher = EpochPrefetcher(stuck_epoch, depth=1)
    prefetcher.close(timeout=0.5)     # returns; the daemon thread is left behind
    assert prefetcher._thread.is_alive()
    never.set()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        EpochPrefetcher(lambda e: [], depth=0)
