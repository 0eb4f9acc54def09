"""The driver: build (or restore) the Tuner for a validated sweep, run it, and summarise it.

Also owns the sweep's record (``sweep.json``: what was asked, checked again on --restore),
how many trials fit on the cluster at once, and the resumable interruption that
``--stop-after-trials`` asks for.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any

from ray.tune import Callback

from melp_ray.utils import storage
from melp_ray.config import ConfigError
from melp_ray.sweeps.summary import format_table, summarise
from melp_ray.sweeps.trial import make_trainable
from melp_ray.sweeps.validate import Sweep

SWEEP_FILE = "sweep.json"


# Trials to finish in this invocation before interrupting (--stop-after-trials). A module
# global, not callback state: Tune pickles its callbacks with the experiment, and a restored
# sweep must obey the new command line, not the old one.
_stop_after_trials: int | None = None


class InterruptAfterTrials(Callback):
    """Interrupts the sweep like Ctrl+C once enough trials finished: state is saved and
    unfinished trials stay resumable (Tune's stop_all would mark them terminated instead).

    Defined at module level so that the copy Tune restores from its pickle looks up the
    live ``_stop_after_trials`` (a class defined in a function would carry a frozen copy).
    """

    def __init__(self):
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        limit = _stop_after_trials
        if limit is None or self.finished < limit:
            return
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):          # Tune's interrupt handler (main thread only)
            print(f"[melp_ray.tune] {self.finished} trial(s) finished: interrupting the "
                  f"sweep (resume with --restore)", flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)


# Ray Data's read/decode tasks take 1 whole CPU each: with less than that left over,
# the trials' train workers wait for data forever.
DATA_CPUS = 1.0


def max_concurrent(sweep: Sweep) -> int:
    """Trials that fit at once: Tune only sees the trial's own resources, not its workers'."""
    import ray

    if sweep.space.max_concurrent_trials:
        return sweep.space.max_concurrent_trials
    total = ray.cluster_resources()
    cpus = total.get("CPU", 0)
    fits = int((cpus - DATA_CPUS) // sweep.trial_cpus())
    if sweep.trial_gpus():
        fits = min(fits, int(total.get("GPU", 0) // sweep.trial_gpus()))
    if fits < 1:
        t = sweep.base_cfg.train
        gpus = f" / {total.get('GPU', 0):g} GPU" if sweep.trial_gpus() else ""
        raise ConfigError(
            f"one trial needs {sweep.trial_cpus():g} CPU (trial_resources "
            f"{sweep.space.trial_resources} + {t.num_workers} x train.cpus_per_worker="
            f"{t.cpus_per_worker:g}) plus {DATA_CPUS:g} CPU left for Ray Data, and the cluster "
            f"has {cpus:g} CPU{gpus}; "
            "lower train.cpus_per_worker / train.num_workers, or set max_concurrent_trials "
            "in the space if the cluster autoscales")
    return fits


def build_tuner(sweep: Sweep):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    space, t = sweep.space, sweep.base_cfg.train
    grace = space.scheduler.grace_period or t.val_every or t.max_steps
    scheduler, scheduler_note = FIFOScheduler(), "fifo"
    if space.scheduler.type == "asha" and grace < t.max_steps:
        # Rungs only before the last step (max_t = max_steps - 1, and no stop at max_t):
        # stopping a trial at its last report saves nothing and would kill a run that is
        # writing its summary.
        scheduler = ASHAScheduler(time_attr="step", max_t=t.max_steps - 1, grace_period=grace,
                                  reduction_factor=space.scheduler.reduction_factor,
                                  stop_last_trials=False)
        scheduler_note = f"asha (rungs from step {grace}, x{space.scheduler.reduction_factor})"
    elif space.scheduler.type == "asha":
        scheduler_note = f"fifo (no ASHA rung before the last step: grace_period {grace})"
    concurrency = max_concurrent(sweep)
    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, tune_limit = OptunaSearch(seed=space.seed), concurrency
    else:
        # Tune ignores TuneConfig.max_concurrent_trials for a given BasicVariantGenerator.
        search_alg = BasicVariantGenerator(random_state=space.seed, max_concurrent=concurrency)
        tune_limit = None
    print(f"[melp_ray.tune] sweep {space.name!r}: {space.num_samples} sample(s), metric "
          f"{sweep.metric} (max), {scheduler_note}, up to {concurrency} trial(s) at once "
          f"({sweep.trial_cpus():g} CPU each incl. {t.num_workers} train worker(s))", flush=True)
    return tune.Tuner(
        make_trainable(sweep),
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler,
                                    search_alg=search_alg, num_samples=space.num_samples,
                                    max_concurrent_trials=tune_limit),
        run_config=tune.RunConfig(name=space.name, storage_path=sweep.storage_root,
                                  callbacks=[InterruptAfterTrials()], verbose=1),
    )


def sweep_record(sweep: Sweep, space_path: str) -> dict[str, Any]:
    """sweep.json: what was asked; --restore refuses another space, base config or metric."""
    return {"space_file": space_path, "space": dataclasses.asdict(sweep.space),
            "base_args": sweep.base_args, "metric": sweep.metric}


def run_sweep(sweep: Sweep, space_path: str = "", restore: bool = False,
              stop_after_trials: int | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep to completion or interruption; returns the summary."""
    global _stop_after_trials
    from ray import tune

    from melp_ray.utils.ray_connect import pin_data_stats_here, quiet_data_progress_bars
    from melp_ray.utils.ray_connect import init_ray

    record_path = storage.join(sweep.dir, SWEEP_FILE)
    record = sweep_record(sweep, space_path)
    exists = storage.exists(record_path)
    if restore and not exists:
        raise ConfigError(f"--restore: no sweep at {sweep.dir} to restore")
    if not restore and exists:
        raise ConfigError(f"a sweep already exists at {sweep.dir}: resume it with --restore, "
                          "or pick another --name / run.storage_path")
    if restore:
        saved = storage.read_json(record_path)
        changed = [k for k in ("space", "base_args", "metric") if saved.get(k) != json.loads(
            json.dumps(record[k], default=str))]
        if changed:
            raise ConfigError(f"--restore: the {', '.join(changed)} differ from the sweep saved at "
                              f"{sweep.dir}; restore with the same space file and overrides")

    init_ray()
    quiet_data_progress_bars()
    pin_data_stats_here()       # before any trial's workers run a dataset
    _stop_after_trials = stop_after_trials
    try:
        if restore:
            print(f"[melp_ray.tune] restoring sweep {sweep.dir}", flush=True)
            tuner = tune.Tuner.restore(sweep.dir, trainable=make_trainable(sweep),
                                       resume_unfinished=True)
        else:
            tuner = build_tuner(sweep)          # may refuse a cluster too small for one trial
            storage.write_json(record_path, record)
        tuner.fit()
    finally:
        _stop_after_trials = None
    summary = summarise(sweep)
    print(format_table(summary), flush=True)
    return summary
