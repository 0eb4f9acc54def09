"""Where a recipe runs: inside a Ray Train worker (the product), or in this very process.

A recipe needs five things from whatever runs it: its rank and world size, its device, its
datasets (by name), the checkpoint to resume from, and somewhere to ``report`` metrics and
checkpoint folders. ``RayTrainSession`` takes them from Ray Train. ``LocalSession`` provides
them in the calling process, with the same datasets and the same checkpoint folders, so the
recipe's own logic (resume arithmetic, early stopping, data positions, gradient maths) can
be run and checked without starting a Ray Train controller and worker actors each time —
what ``bench/gpu_step.py`` and most of the test suite need. It keeps every checkpoint it is
given, newest last; choosing which to keep is Ray Train's job (``CheckpointConfig``) and is
only ever tested through Ray Train.

A reported checkpoint folder belongs to the session from then on: it deletes the folder once
it has been persisted (Ray Train: after its upload, which ``train.checkpoint_upload=async``
runs in the background while training goes on). Both name the persisted folders
``checkpoint_step_NNNNNN`` (``checkpoint_name``), so they sort by training step.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from melp_ray.train.gloo import ONE_THREAD_GLOO, register_one_thread_gloo
from melp_ray.utils.console import configure_libraries
from melp_ray.utils.distributed import free_port, world


def worker_entry(config: dict[str, Any]) -> dict[str, Any]:
    """What every Ray Train worker runs."""
    cfg = config["cfg"]
    # DeepSpeed 0.19's ZeRO all-gathers call this torch API, deprecated in torch 2.13: a
    # warning on every step that no user of ours can act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # before deepspeed is imported
    configure_libraries(cfg.run.verbose)
    recipe = config["recipe_cls"](cfg)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


def checkpoint_name(step: int) -> str:
    """The persisted folder of the checkpoint at ``step``: names sort in step order (Ray
    Train's own default is a timestamp). A run resumed from an older checkpoint that reaches
    ``step`` again writes the same folder anew."""
    return f"checkpoint_step_{step:06d}"


class RayTrainSession:
    """The recipe's view of the Ray Train worker it runs in.

    ``upload``: ``train.checkpoint_upload``. ``async`` hands every report to Ray Train's
    upload thread: the checkpoint's copy to storage and the hand-over to the Train controller
    (which takes one report per worker each poll, ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s)
    happen while training goes on, in report order. Metrics-only reports go the same way: a
    synchronous one would wait for the upload before it (Ray keeps reports in order).
    """

    def __init__(self, upload: str = "async"):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.upload_mode = (ray.train.CheckpointUploadMode.ASYNC if upload == "async"
                            else ray.train.CheckpointUploadMode.SYNC)

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        """A local folder holding the checkpoint to resume from, or None for a fresh run."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def has_checkpoint(self) -> bool:
        import ray.train

        return ray.train.get_checkpoint() is not None

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None = None) -> None:
        """Every rank calls this the same number of times (Ray Train waits for all ranks).
        Ray deletes ``checkpoint_folder`` once it is uploaded."""
        import ray.train

        if checkpoint_folder is None:
            ray.train.report(metrics, checkpoint_upload_mode=self.upload_mode)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_folder),
                         checkpoint_dir_name=checkpoint_name(int(metrics["step"])),
                         checkpoint_upload_mode=self.upload_mode,
                         delete_local_checkpoint_after_upload=True)

    def preemption_notice(self):
        """Ray Train's ``PreemptionInfo`` once a node of this run is being reclaimed, else
        None. A collective: every rank calls it the same number of times."""
        import ray.train

        return ray.train.get_preemption_info()

    def cluster_nodes(self) -> int:
        """Live Ray nodes of the cluster now (an autoscaler adds and removes them)."""
        import ray

        return sum(node["Alive"] for node in ray.nodes())


class LocalSession:
    """A recipe run in this process (and, with a process group, in its peers).

    ``datasets``: name -> Ray Dataset (what ``TorchTrainer(datasets=...)`` would be given;
    the recipe iterates them here instead of through a Ray Train shard).
    ``checkpoints``: the folder that receives ``checkpoint_step_NNNNNN`` copies of every
    reported checkpoint, as Ray Train's run folder does; a session created over a folder that
    already holds some resumes from the newest, as a re-run Ray Train job does. Nothing
    preempts a process on this machine: ``preemption_notice`` is always None.
    """

    def __init__(self, datasets: dict[str, Any], checkpoints: str | os.PathLike,
                 device: torch.device | None = None):
        self.rank, self.world = world()
        self.device = device or torch.device("cpu")
        self.datasets = datasets
        self.checkpoints = os.fspath(checkpoints)
        self.reports: list[dict[str, Any]] = []            # every report's metrics, in order
        self.checkpointed: list[tuple[str, dict[str, Any]]] = []   # (folder, metrics) of this run
        os.makedirs(self.checkpoints, exist_ok=True)

    def dataset(self, name: str):
        return self.datasets.get(name)

    def checkpoint_folders(self) -> list[str]:
        """The reported checkpoints, oldest first."""
        names = sorted(n for n in os.listdir(self.checkpoints) if n.startswith("checkpoint_"))
        return [os.path.join(self.checkpoints, n) for n in names]

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        folders = self.checkpoint_folders()
        yield folders[-1] if folders else None

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint_folders())

    def preemption_notice(self) -> None:
        return None

    def cluster_nodes(self) -> None:
        return None            # this process is the run: no cluster of its own

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_folder is None:
            return
        # Every rank adds its own files (DeepSpeed names them per rank), as Ray merges them.
        target = os.path.join(self.checkpoints, checkpoint_name(int(metrics["step"])))
        shutil.copytree(checkpoint_folder, target, dirs_exist_ok=True)
        shutil.rmtree(checkpoint_folder)
        self.checkpointed.append((target, dict(metrics)))
        if self.world > 1:
            dist.barrier()        # the checkpoint exists whole before anyone resumes from it


def run_locally(cfg, recipe_cls, datasets: dict[str, Any], checkpoints: str | os.PathLike,
                device: torch.device | None = None) -> tuple[dict[str, Any], LocalSession]:
    """``recipe_cls(cfg)`` set up, trained and cleaned up in this process, as a Ray Train
    worker would run it; returns (what ``train`` returned, the session with its reports).

    Needs a process group (``torch.distributed``; a world of one is enough) for DeepSpeed:
    ``single_process_group`` makes one.
    """
    session = LocalSession(datasets, checkpoints, device)
    recipe = recipe_cls(cfg, session=session)
    recipe.setup()
    try:
        return recipe.train(), session
    finally:
        recipe.cleanup()


def single_process_group(backend: str = ONE_THREAD_GLOO) -> None:
    """A torch.distributed world of one in this process (DeepSpeed requires a process group):
    on CPU the one-thread gloo Ray Train's CPU workers use (``melp_ray.train.gloo``); pass
    ``"nccl"`` on a GPU."""
    if dist.is_initialized():
        return
    register_one_thread_gloo()
    # DeepSpeed reads the launcher's variables too, not only the process group.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    # A fresh port, never an inherited MASTER_PORT: a world of one has no peer to agree with,
    # and a port left in the environment may be held by the parent's own process group.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
