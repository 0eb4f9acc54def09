"""Driver side: turn a recipe + datasets into a Ray Train run, then write summary.json."""
from __future__ import annotations

import time
from typing import Any

from melp_ray.utils import storage
from melp_ray.utils.console import ray_train_logging
from melp_ray.utils.ray_connect import pin_data_stats_here
from melp_ray.train.curves import write_run_curves
from melp_ray.train.metrics import log_wandb_summary, run_dir
# worker_entry lives with the sessions: what a worker unpickles imports no plotting library.
from melp_ray.train.session import run_locally, single_process_group, worker_entry


def build_trainer(cfg, recipe_cls, datasets: dict[str, Any], callbacks: list | None = None):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from melp_ray.train.ray_backend import OneThreadGlooConfig

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **t.worker_resources}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker=worker_entry,
        train_loop_config={"cfg": cfg, "recipe_cls": recipe_cls},
        # A range is Ray Train V2's elastic scaling: it starts as many workers as fit (at
        # least min), and restarts the group from the last checkpoint when it can grow or
        # has lost a worker; the recipe re-derives its batch split at each (re)start.
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.elastic_resize_interval_s),
        # On CPU, gloo groups with one worker thread: torch's two race and crash (train/gloo.py).
        torch_config=TorchConfig(backend="nccl") if t.use_gpu else OneThreadGlooConfig(),
        datasets=datasets,
        # Each rank has its own deterministic dataset (see melp_ray.data.rows): nothing to
        # split, and block order preserved so a resumed run sees the same batches.
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage.normalise_storage_path(cfg.run.storage_path),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # With a checkpoint_metric Ray keeps the best keep_checkpoints by it (and always
            # the newest, which a restart resumes from).
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute=t.checkpoint_metric,
                                               checkpoint_score_order=t.checkpoint_mode),
            callbacks=callbacks or None,
            logging_config=ray_train_logging(cfg.run.verbose),
            worker_runtime_env={"env_vars": dict(t.worker_env)},
        ),
    )


def fit_and_summarise(cfg, recipe_cls, datasets: dict[str, Any], extra_summary=None,
                      callbacks: list | None = None) -> dict[str, Any]:
    """Run the recipe on Ray Train workers; write and return summary.json."""
    pin_data_stats_here()
    trainer = build_trainer(cfg, recipe_cls, datasets, callbacks)
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    # Ray reports paths on its filesystem (scheme stripped): keep them usable as URIs.
    last = storage.to_uri(cfg.run.storage_path, result.checkpoint.path) if result.checkpoint else None
    kept = [(storage.to_uri(cfg.run.storage_path, c.path), m) for c, m in result.best_checkpoints or []]
    return write_summary(cfg, out, wall, last, kept, extra_summary)


def fit_in_process(cfg, recipe_cls, datasets: dict[str, Any], extra_summary=None) -> dict[str, Any]:
    """The same run in this process instead of on Ray Train workers (``train.num_workers=1``):
    the same recipe, Ray Data datasets, DeepSpeed engine, checkpoint folders and summary.json,
    without a Train controller and worker actors. For debugging and for tests of the
    recipe's logic; model selection keeps every checkpoint (Ray's ``CheckpointConfig`` is
    what prunes them)."""
    if cfg.train.elastic or cfg.train.num_workers != 1:
        raise ValueError(f"an in-process run has one worker, not train.num_workers="
                         f"{cfg.train.num_workers}")
    if storage.is_uri(cfg.run.storage_path):
        raise ValueError("an in-process run writes to a local run.storage_path")
    single_process_group()
    start = time.perf_counter()
    out, session = run_locally(cfg, recipe_cls, datasets, run_dir(cfg))
    wall = time.perf_counter() - start
    folders = session.checkpoint_folders()
    return write_summary(cfg, out, wall, folders[-1] if folders else None, session.checkpointed,
                         extra_summary)


def write_summary(cfg, out: dict[str, Any], wall: float, last_checkpoint: str | None,
                  kept: list[tuple[str, dict[str, Any]]], extra_summary=None) -> dict[str, Any]:
    """summary.json from what the workers returned (``out``) and the checkpoints kept."""
    metrics = out.get("metrics", {})
    summary = {
        "run_name": cfg.run.name,
        "steps": out.get("step"),
        "world_size": out.get("world_size"),
        "zero_stage": cfg.deepspeed.zero_stage,
        "global_batch_size": cfg.train.global_batch_size,
        "losses": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("loss/")},
        "validation": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("val/")},
        "samples_per_s": metrics.get("samples_per_s"),
        "input_wait_frac": metrics.get("input_wait_frac"),
        "wall_seconds": wall,
        "worker_env": out.get("worker_env"),
        "last_checkpoint": last_checkpoint,
        **model_selection_summary(cfg, kept, out),
        "run_dir": run_dir(cfg),
        "curves": write_run_curves(run_dir(cfg)),
        **(extra_summary or {}),
    }
    storage.write_json(storage.join(run_dir(cfg), "summary.json"), summary)
    if cfg.run.wandb:
        log_wandb_summary(cfg, summary)
    return summary


def model_selection_summary(cfg, kept: list[tuple[str, dict[str, Any]]],
                            out: dict[str, Any]) -> dict[str, Any]:
    """With ``train.checkpoint_metric``: the best checkpoint kept, its step and score."""
    metric = cfg.train.checkpoint_metric
    if metric is None:
        return {}
    best = None
    for path, metrics in kept:
        if metrics.get("step") == out.get("best_step") and metric in metrics:
            best = {"path": path, "step": metrics["step"], "metric": metric, "score": metrics[metric]}
    return {"best_checkpoint": best, "stopped_early": bool(out.get("stopped_early"))}
