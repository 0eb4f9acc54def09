"""What an elastic run (``train.num_workers=[min, max]``) needs from a checkpoint: which
datasets a rank of a world size reads, how many workers wrote a checkpoint, and the
checkpoint in a form this world size can load (DeepSpeed's universal checkpoint)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

from melp_ray.hub.checkpoint import (CHECKPOINT_TAG, TRAINER_STATE, UNIVERSAL_TAG, has_partitioned_optimizer,
                                     universal_checkpoint)


def dataset_name(split: str, rank: int, world: int | None = None) -> str:
    """The Ray Train dataset a rank reads: ``train_r0``; an elastic run has every world
    size's slices, ``train_w3_r0``."""
    return f"{split}_r{rank}" if world is None else f"{split}_w{world}_r{rank}"


def saved_world_size(folder: str) -> int | None:
    """The number of workers that wrote a checkpoint (its trainer_state.json)."""
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("world_size")


@contextlib.contextmanager
def resized_checkpoint(folder: str | None, saved_world: int | None, world: int
                       ) -> Iterator[tuple[str | None, str]]:
    """(DeepSpeed load folder, tag) for resuming from ``folder`` on ``world`` ranks: the
    folder itself, or, when another number of ranks wrote its partitioned optimizer state,
    its universal conversion in a temporary folder (each rank converts its own copy: ranks
    need not share a file system)."""
    if folder is None or saved_world in (None, world) or not has_partitioned_optimizer(folder):
        yield folder, CHECKPOINT_TAG
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield universal_checkpoint(folder, tmp), UNIVERSAL_TAG
