"""What a run prints: our start banner, progress and validation lines, a short end table,
and from the libraries only what a user must act on (warnings and errors).

Every process we start code in (the driver, each Ray Train worker, each evaluation actor)
calls ``configure_libraries``; it sets each library's own switch, never redirects streams:

- transformers: verbosity "error" and no progress bars (its "Loading weights" bars, the
  notice that a resized embedding row is drawn from the old rows' distribution);
- DeepSpeed: its logger at WARNING (engine start-up prints a page of INFO);
- Ray Data: its console at WARNING (the per-dataset "Starting execution", "Execution plan",
  "execution finished in N s" lines), and its one notice that progress bars are off —
  our recipes print their own progress lines, which is why they are off;
- Ray Train: ``ray_train_logging`` gives the run's ``RunConfig(logging_config=...)`` level,
  and its per-report "Reporting training result N: TrainingReport(...)" logger is at WARNING;
- DeepSpeed's "deepspeed_shm_comm_op built successfully" is gone with the op itself
  (``train.deepspeed_config.skip_cpu_shared_memory_op``).

``verbose=True`` (``--verbose`` / ``run.verbose=true``) leaves every library at its default.
Processes that get no config (evaluation actors) read ``MELP_RAY_VERBOSE=1`` instead, which
``--verbose`` sets before Ray starts (on a running cluster, set it in the job's runtime env).
Ray Data and Ray Train still write everything to their log files in the Ray session folder.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

QUIET_LEVEL = logging.WARNING
VERBOSE_ENV = "MELP_RAY_VERBOSE"
# Ray Data's notice when progress bars are disabled (ours are off on purpose).
_PROGRESS_BARS_OFF = "Progress bars disabled"


class _DropProgressBarNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PROGRESS_BARS_OFF)


def configure_libraries(verbose: bool | None = None) -> None:
    """Library verbosity for this process (``verbose=None``: ``$MELP_RAY_VERBOSE``); idempotent,
    and cheap: transformers is configured through its environment switches when it is not
    imported yet (importing it costs seconds)."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    if verbose:
        os.environ[VERBOSE_ENV] = "1"      # inherited by the processes a local Ray starts
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:      # read those variables already: switch it directly
        import transformers.utils.logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(QUIET_LEVEL)
    import ray.data  # noqa: F401  (importing it configures its logger: set the level after)
    import ray.data._internal.progress as ray_data_progress
    import ray.train.v2._internal.execution.context as ray_train_context

    logging.getLogger("ray.data").setLevel(QUIET_LEVEL)
    # A filter acts only on the logger a record is logged to, not on its ancestors.
    progress = logging.getLogger(ray_data_progress.__name__)
    if not any(isinstance(f, _DropProgressBarNotice) for f in progress.filters):
        progress.addFilter(_DropProgressBarNotice())
    # Ray Train logs each worker's "Reporting training result N" at INFO to a logger named
    # after its module's file (outside "ray.train", so LoggingConfig does not reach it).
    logging.getLogger(ray_train_context.__file__).setLevel(QUIET_LEVEL)


def ray_train_logging(verbose: bool = False):
    """The ``logging_config`` of a Ray Train ``RunConfig``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose else "WARNING")


# ---------------------------------------------------------------- the end table

def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(summary: dict[str, Any]) -> str:
    """A few lines that say how the run ended and where its results are."""
    minutes = (summary.get("wall_seconds") or 0) / 60
    lines = [f"[melp_ray] finished: {summary.get('steps')} steps in {minutes:.1f} min "
             f"({summary.get('world_size')} workers, ZeRO-{summary.get('zero_stage')}, "
             f"global batch {summary.get('global_batch_size')}"
             + (f", {summary['samples_per_s']:.1f} samples/s" if summary.get("samples_per_s") else "")
             + ")"]
    losses = summary.get("losses") or {}
    if losses:
        lines.append("  final loss   " + "  ".join(f"{k} {_fmt(v)}" for k, v in losses.items()))
    val = summary.get("validation") or {}
    recalls = [f"R@{k} {val[f'recall_at_{k}']:.3f} (chance {val[f'recall_at_{k}_chance']:.3f})"
               for k in (1, 5, 10) if f"recall_at_{k}" in val and f"recall_at_{k}_chance" in val]
    if "zeroshot_auroc" in val:
        recalls.append(f"zero-shot AUROC {val['zeroshot_auroc']:.3f}")
    if recalls:
        lines.append("  validation   " + "  ".join(recalls))
    best = summary.get("best_checkpoint")
    if best:
        lines.append(f"  best         step {best['step']}: {best['metric']} {_fmt(best['score'])}"
                     + (" (stopped early)" if summary.get("stopped_early") else ""))
        lines.append(f"               {best['path']}")
    if summary.get("last_checkpoint"):
        lines.append(f"  checkpoint   {summary['last_checkpoint']}")
    if summary.get("run_dir"):
        lines.append(f"  run folder   {summary['run_dir']} (metrics.jsonl, summary.json)")
    return "\n".join(lines)
