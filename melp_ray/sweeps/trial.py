"""The trial side: what one Tune trial runs (a whole pretraining run) and how it reports to Tune.

Every trial is a full distributed pretraining run (``melp_ray.pretraining.run.run``: a TorchTrainer
with DeepSpeed workers) launched from a Tune function trainable, the Train V2 pattern.
"""
from __future__ import annotations

import json
from typing import Any

from melp_ray.utils import storage
from melp_ray.config import PretrainConfig, load_config
from melp_ray.sweeps.validate import Sweep, trial_overrides


def trial_report_callback(metric: str):
    """TuneReportCallback that only forwards reports which carry the selection metric.

    The recipe reports every ``log_every`` steps but validates only every ``val_every``
    steps; Tune rejects a result without the metric. So the last validation values (and
    checkpoint path) are carried into later reports, with ``val_step`` saying when they
    were measured, and reports before the first validation stay in the run's own
    metrics.jsonl only. ASHA rungs sit on validation steps (check_schedule), so every
    rung decision sees a fresh value.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.carried: dict[str, Any] = {}
            self.forwarded = False   # has any result reached Tune

        def after_report(self, run_context, metrics, checkpoint):
            latest = dict(metrics[0])
            if checkpoint is not None:
                self.carried["checkpoint_path"] = checkpoint.path
            fresh = {k: v for k, v in latest.items() if k.startswith("val/")}
            if fresh:
                self.carried.update(fresh, val_step=latest.get("step"))
            if metric not in self.carried:
                return
            super().after_report(run_context, [{**latest, **self.carried}], checkpoint)
            self.forwarded = True

    return ValidationReportCallback()


def final_result(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's last losses and validation as one Tune result, keyed as the workers report them."""
    return {**{f"loss/{k}": v for k, v in summary["losses"].items()},
            **{f"val/{k}": v for k, v in summary["validation"].items()},
            "step": summary["steps"], "val_step": summary["steps"],
            "checkpoint_path": summary["last_checkpoint"]}


def run_trial(config: dict[str, Any], *, base_args: list[str], metric: str, runs_dir: str,
              sweep_name: str) -> None:
    """One Tune trial: a whole pretraining run with this trial's values as overrides."""
    from ray import tune

    from melp_ray.pretraining.run import run
    from melp_ray.train.metrics import run_dir

    trial_id = tune.get_context().get_trial_id()
    # Stable across a restore: a restarted trial resumes its Train run from its checkpoint.
    cfg = load_config(PretrainConfig, None, base_args + trial_overrides(config) + [
        f"run.name={sweep_name}_{trial_id}", f"run.storage_path={runs_dir}",
        f"run.wandb_group={sweep_name}"])   # with run.wandb=true: one W&B group a sweep
    callback = trial_report_callback(metric)
    result = final_result(run(cfg, callbacks=[callback]))
    if not callback.forwarded and metric in result:
        # Restored after its last checkpoint, before Tune saw that step's result: the run
        # resumed with no step left and reported nothing; its checkpoint's metrics are the result.
        tune.report(result)
    # A trial that never reported the metric would leave Tune with a result that lacks it
    # (which stops the whole sweep); fail just this trial, with the reason.
    history = storage.join(run_dir(cfg), "metrics.jsonl")
    lines = storage.read_text(history).splitlines() if storage.exists(history) else []
    if not any(metric in json.loads(line) for line in lines if line.strip()):
        raise RuntimeError(
            f"trial {trial_id} never reported {metric} (see {history}); zero-shot AUROC needs "
            "validation batches with both positive and negative labels for some class: more "
            "validation data (data.val_fraction, train.val_batches) or metric: val/recall_at_1")


def make_trainable(sweep: Sweep):
    """run_trial bound to this sweep, with the trial's own resources (its workers ask for theirs)."""
    from ray import tune

    fn = tune.with_parameters(run_trial, base_args=sweep.base_args, metric=sweep.metric,
                              runs_dir=sweep.runs_dir, sweep_name=sweep.space.name)
    return tune.with_resources(fn, dict(sweep.space.trial_resources))
