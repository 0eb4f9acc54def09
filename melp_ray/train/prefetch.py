"""Training batches across epoch boundaries, fetched ahead on a background thread.

Why: a Ray Data iterator starts its pipeline (tasks, worker processes, the first reads)
only when it is asked for its first batch. A worker that finishes epoch e and only then
asks for epoch e+1 waits for that start-up with its accelerator idle: on the bundled
sample that was a third of every log window that crossed an epoch boundary. Here one
thread walks the epochs back to back, at most ``depth`` batches ahead of training, so
epoch e+1's pipeline starts while the last batches of epoch e are being trained on.

The batches and their order are exactly those of iterating the epochs one after the
other, so exact resume is unaffected.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any
from collections.abc import Callable, Iterable

_END_OF_EPOCH = object()


class EpochPrefetcher:
    """``next(epoch)`` returns the next batch of ``epoch``, or None once it has no more.

    ``epoch_batches(e)`` must return a fresh iterable over epoch ``e``. Training starts at
    ``start_epoch`` after skipping its first ``skip`` batches (a resume). A caller may leave
    an epoch before its end (another rank ran out first): asking for a later epoch drops
    what is still queued of the earlier one, as abandoning its iterator did.
    """

    def __init__(self, epoch_batches: Callable[[int], Iterable[Any]], start_epoch: int = 0,
                 skip: int = 0, depth: int = 4):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="melp-epoch-prefetch",
                                        args=(epoch_batches, start_epoch, skip), daemon=True)
        self._thread.start()

    def next(self, epoch: int) -> Any | None:
        while True:
            item_epoch, item = self._queue.get()
            if isinstance(item, BaseException):
                raise item                    # the data pipeline failed: surface its error here
            if item_epoch < epoch:
                continue                      # the rest of an epoch the caller has left
            if item_epoch > epoch:
                raise RuntimeError(f"asked for epoch {epoch} after epoch {item_epoch} began")
            return None if item is _END_OF_EPOCH else item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (it may be blocked on a full queue) and drop what it fetched.

        Waits at most ``timeout`` seconds: a thread stuck inside a data pipeline is a daemon
        and must not keep the training function from returning.
        """
        self._closed.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    # ---------------------------------------------------------------- producer thread
    def _produce(self, epoch_batches, epoch: int, skip: int) -> None:
        try:
            while True:
                batches = iter(epoch_batches(epoch))
                for _ in range(skip):         # resume: what the checkpoint already consumed
                    next(batches, None)
                skip = 0
                for batch in batches:
                    if not self._put((epoch, batch)):
                        return
                if not self._put((epoch, _END_OF_EPOCH)):
                    return
                epoch += 1
        except BaseException as err:          # handed to the training thread, raised there
            self._put((epoch, err))

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
