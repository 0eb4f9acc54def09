"""Evaluation and benchmark results to experiment tracking, when asked: ``--tensorboard``
(event files in OUT/tensorboard) and ``--wandb`` (one W&B run per command), the same
writers as pretraining's ``run.tensorboard`` / ``run.wandb`` (``train/metrics.py``).

Every number of the result is one scalar, logged once at the checkpoint's training step
(0 for an exported folder or ``--random-init``), so evaluations of several checkpoints of a
run line up on the training axis. W&B also gets the settings as the run's config and the
result table (per-class AUROC, or the benchmark's table.csv rows) as a ``wandb.Table``;
TensorBoard the results.md / table.md text. ``WANDB_MODE=offline`` works without a key.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from melp_ray.utils import storage
from melp_ray.hub.checkpoint import checkpoint_step, is_exported_folder
from melp_ray.train.metrics import TensorBoardWriter

# results.json entries that are not results (inputs, record lists, texts)
_NOT_SCALARS = ("settings", "records", "prompts", "class_names", "skipped", "task")


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment tracking (as pretraining's run.tensorboard "
                                      "and run.wandb)")
    group.add_argument("--tensorboard", action="store_true",
                       help="write the result's numbers as TensorBoard scalars in "
                            "OUT/tensorboard (at the checkpoint's training step)")
    group.add_argument("--wandb", action="store_true",
                       help="log the result to a W&B run (WANDB_MODE=offline works without "
                            "a key): numbers, the result table, the settings as config")
    group.add_argument("--wandb-project", default="melp_ray",
                       help="W&B project (default melp_ray)")
    group.add_argument("--wandb-group", help="W&B run group (e.g. the pretraining run's name)")
    group.add_argument("--wandb-name", help="W&B run name (default: the name of OUT)")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def evaluation_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """results.json's numbers, nested keys joined with ``/``: ``macro_auroc``,
    ``ci/low``, ``ci/high``, ``per_class/NORM``, ``recall@1``, ``n_samples``, ..."""
    scalars: dict[str, float] = {}
    for key, value in results.items():
        if key in _NOT_SCALARS:
            continue
        if key == "ci" and isinstance(value, list | tuple) and len(value) == 2:
            value = {"low": value[0], "high": value[1]}
        if isinstance(value, Mapping):
            scalars.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            scalars[key] = float(value)
    return scalars


def _column(cell: Mapping[str, Any]) -> str:
    parts = [cell["dataset"], cell.get("task"),
             None if cell.get("fraction") is None else f"{cell['fraction']:g}"]
    return "/".join(str(p) for p in parts if p)


def benchmark_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """One scalar per scored table cell and number: ``<table>/<model>/<dataset>[/<task>]
    [/<fraction>]/macro_auroc`` (and ``ci_low``, ``ci_high``)."""
    scalars = {}
    for cell in results["cells"]:
        if cell["status"] != "ok":
            continue
        prefix = f"{cell['table']}/{cell['model']}/{_column(cell)}"
        scalars.update({f"{prefix}/{k}": float(cell[k])
                        for k in ("macro_auroc", "ci_low", "ci_high") if _is_number(cell.get(k))})
    return scalars


def evaluation_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the result table: per-class AUROC, else every scalar."""
    if isinstance(results.get("per_class"), Mapping):
        return ["class", "auroc"], [[k, v] for k, v in results["per_class"].items()]
    return ["metric", "value"], [[k, v] for k, v in evaluation_scalars(results).items()]


def benchmark_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of table.csv: one row per cell, skipped and failed ones included."""
    columns = ["table", "model", "dataset", "task", "fraction", "status", "macro_auroc",
               "ci_low", "ci_high", "reason"]
    return columns, [[cell.get(c) for c in columns] for cell in results["cells"]]


def log_results(args: argparse.Namespace, *, job_type: str, scalars: dict[str, float],
                table: tuple[list[str], list[list[Any]]], config: Mapping[str, Any],
                text_file: str, random_init: bool = False) -> None:
    """Log one command's result where ``args`` asks (nothing, and no reads, without the
    flags): the numbers at the checkpoint's step, ``text_file`` (results.md / table.md)."""
    if not (args.tensorboard or args.wandb):
        return
    step = checkpoint_training_step(args.checkpoint, random_init)
    if args.tensorboard:
        writer = TensorBoardWriter(args.out)
        writer.writer.add_text("results", storage.read_text(text_file), global_step=step)
        writer.log({"step": step, **scalars})
        writer.close()
    if args.wandb:
        _log_wandb(args, job_type, scalars, table, config, step)


def _log_wandb(args, job_type: str, scalars: dict[str, float], table, config, step: int) -> None:
    import wandb   # only when asked, as in train/metrics.py: it is slow to import

    out = args.out.rstrip("/")
    run = wandb.init(project=args.wandb_project, group=args.wandb_group, job_type=job_type,
                     name=args.wandb_name or out.rsplit("/", 1)[-1],
                     dir=None if storage.is_uri(out) else out, config=dict(config))
    columns, rows = table
    run.log({**scalars, "results": wandb.Table(columns=columns, data=rows)}, step=step)
    run.finish()


def checkpoint_training_step(checkpoint: str, random_init: bool = False) -> int:
    """The step the evaluated weights were trained to: 0 for untrained or exported ones."""
    if random_init or is_exported_folder(checkpoint):
        return 0
    return int(checkpoint_step(checkpoint) or 0)
