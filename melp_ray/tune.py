"""Ray Tune sweeps over MELP pretraining settings (the token / beat / rhythm loss weights, lr ...).

    python -m melp_ray.tune --space tune_spaces/loss_weights.yaml
    python -m melp_ray.tune --space tune_spaces/lr_and_weights.yaml train.max_steps=200
    python -m melp_ray.tune --space tune_spaces/loss_weights.yaml --restore   # after an interruption

Every trial is a full distributed pretraining run (``melp_ray.pretrain.run``: a TorchTrainer
with DeepSpeed workers) launched from a Tune function trainable, the Train V2 pattern.
The loss weights change the scale of the total loss, so trials are ranked by a weight-free
validation metric (zero-shot AUROC or retrieval recall), never by a loss.

A space file is validated completely (distributions, bounds, every config key and value
type, the metric, the scheduler) before Ray is started; see docs/tune.md for its format.
Sweep folder ``<run.storage_path>/<sweep name>/``: Tune's experiment state and trial folders,
``sweep.json`` (what was asked), ``runs/<trial id>/`` (each trial's Train run: checkpoints,
metrics.jsonl, summary.json), ``tune_summary.json`` and ``tune_metric_vs_params.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import yaml
from ray.tune import Callback

from melp_ray import storage
from melp_ray.config import ConfigError, PretrainConfig, load_config, resolve_config_path

DEFAULT_CONFIG = "tiny"
SUMMARY_FILE = "tune_summary.json"
PLOT_FILE = "tune_metric_vs_params.png"
SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
SEARCHERS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")
SPACE_KEYS = {"name", "search", "scheduler", "num_samples", "metric", "mode",
              "max_concurrent_trials", "trial_resources", "seed", "base_overrides", "params"}
# Weight-free validation metrics the pretrain recipe reports (all: higher is better).
METRIC_RE = re.compile(r"val/(zeroshot_auroc|((ecg_to_report|report_to_ecg)/)?recall_at_(1|5|10))")
# The sweep owns these: one run per trial, stored under the sweep's folder.
SWEEP_OWNED_KEYS = ("run.name", "run.storage_path")


# ---------------------------------------------------------------- the space

@dataclass
class Param:
    key: str                          # dotted config key, e.g. "loss.rhythm"
    distribution: str
    low: float | None = None
    high: float | None = None
    values: list | None = None

    def candidates(self) -> list:
        """Values a trial can get that bound what it can get: checked against the config."""
        if self.distribution in ("uniform", "loguniform"):
            return [float(self.low), float(self.high)]   # samples are floats, even for int bounds
        return list(self.values)

    def tune_domain(self):
        from ray import tune

        if self.distribution == "uniform":
            return tune.uniform(self.low, self.high)
        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)


@dataclass
class Scheduler:
    type: str = "asha"
    grace_period: int | None = None    # optimizer steps; None: train.val_every (or max_steps)
    reduction_factor: int = 2


@dataclass
class SweepSpace:
    name: str
    params: list[Param]
    search: str = "random"
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: int = 4
    metric: str = "auto"               # auto: resolved from the validation data (resolve_metric)
    mode: str = "max"
    max_concurrent_trials: int | None = None   # None: what the cluster's CPUs/GPUs fit
    trial_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.5})
    seed: int | None = 0
    base_overrides: list[str] = field(default_factory=list)

    def param_space(self) -> dict[str, Any]:
        return {p.key: p.tune_domain() for p in self.params}


@dataclass
class Sweep:
    """A validated sweep: the space, the base training config (as overrides) and where it goes."""
    space: SweepSpace
    base_args: list[str]               # key=value pairs that rebuild the base config anywhere
    base_cfg: PretrainConfig
    metric: str                        # resolved selection metric
    storage_root: str                  # Tune storage_path; the sweep folder is storage_root/name

    @property
    def dir(self) -> str:
        return storage.join(self.storage_root, self.space.name)

    @property
    def runs_dir(self) -> str:
        return storage.join(self.dir, RUNS_DIR)

    def trial_cpus(self) -> float:
        t = self.base_cfg.train
        return self.space.trial_resources.get("CPU", 0) + t.num_workers * t.cpus_per_worker

    def trial_gpus(self) -> float:
        t = self.base_cfg.train
        return self.space.trial_resources.get("GPU", 0) + (t.num_workers if t.use_gpu else 0)


def load_space(path: str | os.PathLike, name: str | None = None) -> SweepSpace:
    """Parse a space YAML; raises ConfigError on anything malformed (no config checks yet)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"space file {str(path)!r} not found")
    with open(p) as f:
        raw = yaml.safe_load(f) or {}
    return parse_space(raw, name or raw.get("name") or p.stem, where=str(p))


def parse_space(raw: dict[str, Any], name: str, where: str = "space") -> SweepSpace:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    problems: list[str] = []
    unknown = sorted(set(raw) - SPACE_KEYS)
    if unknown:
        problems.append(f"unknown key(s) {unknown} (a space accepts: {sorted(SPACE_KEYS)})")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(name)):
        problems.append(f"name {name!r} must be letters, digits, '.', '_' or '-'")

    params = []
    raw_params = raw.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        problems.append("params: a non-empty mapping of config key -> distribution is required")
        raw_params = {}
    for key, spec in raw_params.items():
        param, errs = parse_param(str(key), spec)
        problems += errs
        if param is not None:
            params.append(param)

    scheduler_raw = raw.get("scheduler") or {}
    if isinstance(scheduler_raw, str):
        scheduler_raw = {"type": scheduler_raw}
    scheduler = Scheduler()
    if not isinstance(scheduler_raw, dict):
        problems.append(f"scheduler: expected a mapping or a name, got {scheduler_raw!r}")
    else:
        bad = sorted(set(scheduler_raw) - {"type", "grace_period", "reduction_factor"})
        if bad:
            problems.append(f"scheduler: unknown key(s) {bad} "
                            "(accepts: type, grace_period, reduction_factor)")
        scheduler = Scheduler(**{k: v for k, v in scheduler_raw.items() if k not in bad})
        if scheduler.type not in SCHEDULERS:
            problems.append(f"scheduler.type must be one of {list(SCHEDULERS)}, got {scheduler.type!r}")
        if scheduler.grace_period is not None and not _is_int(scheduler.grace_period, 1):
            problems.append(f"scheduler.grace_period must be an int >= 1, got {scheduler.grace_period!r}")
        if not _is_int(scheduler.reduction_factor, 2):
            problems.append(f"scheduler.reduction_factor must be an int >= 2, "
                            f"got {scheduler.reduction_factor!r}")

    search = raw.get("search", "random")
    if search not in SEARCHERS:
        problems.append(f"search must be one of {list(SEARCHERS)}, got {search!r}")
    elif search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("search: optuna is not installed (pip install optuna), or use random")
        if any(p.distribution == "grid" for p in params):
            problems.append("search: optuna cannot sample a grid distribution; use choice")

    num_samples = raw.get("num_samples", 4)
    if not _is_int(num_samples, 1):
        problems.append(f"num_samples must be an int >= 1, got {num_samples!r}")
    metric = raw.get("metric", "auto")
    problems += metric_problems(metric)
    mode = raw.get("mode", "max")
    if mode != "max":
        problems.append(f"mode must be max (every allowed metric is higher-is-better), got {mode!r}")
    max_conc = raw.get("max_concurrent_trials")
    if max_conc is not None and not _is_int(max_conc, 1):
        problems.append(f"max_concurrent_trials must be an int >= 1 or null, got {max_conc!r}")
    resources = raw.get("trial_resources", {"CPU": 0.5})
    if (not isinstance(resources, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in resources.values()) or resources.get("CPU", 0) <= 0):
        problems.append("trial_resources must map resource names to numbers >= 0 with CPU > 0 "
                        f"(Tune cannot place a 0-CPU trial), got {resources!r}")
    seed = raw.get("seed", 0)
    if seed is not None and not _is_int(seed, 0):
        problems.append(f"seed must be an int >= 0 or null, got {seed!r}")

    base = raw.get("base_overrides") or {}
    if isinstance(base, dict):
        base_overrides = [f"{k}={json.dumps(v)}" for k, v in base.items()]
    elif isinstance(base, list) and all(isinstance(x, str) for x in base):
        base_overrides = list(base)
    else:
        problems.append("base_overrides must be a mapping of config key -> value "
                        "(or a list of key=value strings)")
        base_overrides = []
    for item in base_overrides:
        key = item.split("=", 1)[0].strip()
        if key in SWEEP_OWNED_KEYS:
            problems.append(f"base_overrides: {key} is set by the sweep for each trial")

    if problems:
        raise ConfigError(f"{where}: invalid tune space:\n  - " + "\n  - ".join(problems))
    return SweepSpace(name=str(name), params=params, search=search, scheduler=scheduler,
                      num_samples=num_samples, metric=metric, mode=mode,
                      max_concurrent_trials=max_conc, trial_resources=dict(resources), seed=seed,
                      base_overrides=base_overrides)


def parse_param(key: str, spec: Any) -> tuple[Param | None, list[str]]:
    where = f"params.{key}"
    if key in SWEEP_OWNED_KEYS:
        return None, [f"{where}: {key} is set by the sweep for each trial, it cannot be swept"]
    if not isinstance(spec, dict):
        return None, [f"{where}: expected a mapping like {{distribution: uniform, low: 0.1, "
                      f"high: 2.0}}, got {spec!r}"]
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        return None, [f"{where}: unknown distribution {dist!r}; choose from {list(DISTRIBUTIONS)}"]
    allowed = {"distribution", "low", "high"} if dist in ("uniform", "loguniform") \
        else {"distribution", "values"}
    extra = sorted(set(spec) - allowed)
    if extra:
        return None, [f"{where}: {dist} takes {sorted(allowed)}, not {extra}"]
    problems = []
    if dist in ("uniform", "loguniform"):
        low, high = spec.get("low"), spec.get("high")
        if not (_is_number(low) and _is_number(high)):
            return None, [f"{where}: {dist} needs numeric low and high, got {low!r}, {high!r}"]
        if low >= high:
            problems.append(f"{where}: low ({low}) must be < high ({high})")
        if dist == "loguniform" and low <= 0:
            problems.append(f"{where}: loguniform needs low > 0, got {low}")
        param = Param(key, dist, low=low, high=high)
    else:
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            return None, [f"{where}: {dist} needs a non-empty list of values, got {values!r}"]
        param = Param(key, dist, values=values)
    if key.startswith("loss.") and any(
            _is_number(v) and v < 0 for v in param.candidates()):
        problems.append(f"{where}: loss weights cannot be negative, got bounds/values "
                        f"{param.candidates()}")
    return (None if problems else param), problems


def metric_problems(metric: Any) -> list[str]:
    if not isinstance(metric, str):
        return [f"metric must be a string, got {metric!r}"]
    if "loss" in metric:
        return [f"metric {metric!r} is a loss: the loss weights change the loss scale, so a loss "
                "cannot rank trials; use a weight-free metric (auto, val/zeroshot_auroc, "
                "val/recall_at_1, ...)"]
    if metric != "auto" and not METRIC_RE.fullmatch(metric):
        return [f"metric {metric!r} is not a validation metric the pretrain recipe reports; use "
                "auto, val/zeroshot_auroc, val/recall_at_{1,5,10} or "
                "val/{ecg_to_report,report_to_ecg}/recall_at_{1,5,10}"]
    return []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


# ---------------------------------------------------------------- config checks

def config_overrides(cls: type, raw: dict[str, Any], prefix: str = "") -> list[str]:
    """A YAML config as key=value overrides, so a trial can rebuild it on any node.

    Recurses only into dataclass sections: dict-typed fields (model.text_overrides)
    stay whole.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in raw.items():
        tp = hints.get(key)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out += config_overrides(tp, value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def base_config_args(config: str | os.PathLike, space: SweepSpace,
                     overrides: Sequence[str]) -> list[str]:
    """Base config file, then the space's base_overrides, then the command line (wins)."""
    with open(resolve_config_path(config)) as f:
        raw = yaml.safe_load(f) or {}
    for item in overrides:
        if item.split("=", 1)[0].strip() == "run.name":
            raise ConfigError("run.name is set per trial by the sweep; use --name to name the sweep")
    return config_overrides(PretrainConfig, raw) + space.base_overrides + list(overrides)


def trial_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def validate_sweep(space: SweepSpace, config: str | os.PathLike = DEFAULT_CONFIG,
                   overrides: Sequence[str] = ()) -> Sweep:
    """Everything checkable without Ray: raises ConfigError before any trial (or Ray) starts.

    Each parameter is tried at each of its bounds / values on top of the base config
    (the others at their lowest), so unknown keys, wrong value types and impossible
    combinations (e.g. every loss weight 0) fail here rather than in trial N.
    """
    base_args = base_config_args(config, space, overrides)
    try:
        base_cfg = load_config(PretrainConfig, None, base_args)
    except ConfigError as err:
        raise ConfigError(f"base training config: {err}") from None
    lowest = {p.key: p.candidates()[0] for p in space.params}
    for p in space.params:
        for value in p.candidates():
            trial = {**lowest, p.key: value}
            try:
                load_config(PretrainConfig, None, base_args + trial_overrides(trial))
            except ConfigError as err:
                raise ConfigError(f"space {space.name!r}, param {p.key} = {value!r}: {err}") from None
    metric = resolve_metric(space.metric, base_cfg)
    check_schedule(space, base_cfg)
    storage_root = storage.normalise_storage_path(base_cfg.run.storage_path)
    return Sweep(space=space, base_args=base_args, base_cfg=base_cfg, metric=metric,
                 storage_root=storage_root)


def data_has_labels(cfg: PretrainConfig) -> bool | None:
    """Whether validation records carry PTB-XL labels (None: cannot tell, e.g. a URI root)."""
    from melp_ray.data.sources import DataRootError, detect_layout

    if cfg.data.root is None:
        return True                               # the bundled PTB-XL sample
    if "://" in cfg.data.root:
        return None
    try:
        layout = cfg.data.dataset if cfg.data.dataset != "auto" else detect_layout(cfg.data.root)
        if layout == "shards":
            from melp_ray.data.shards import load_manifest

            layout = load_manifest(cfg.data.root).get("dataset")
    except (DataRootError, OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.root: {err}") from None
    return layout == "ptb-xl"


def resolve_metric(metric: str, cfg: PretrainConfig) -> str:
    labels = data_has_labels(cfg)
    if metric == "auto":
        return "val/zeroshot_auroc" if labels else "val/recall_at_1"
    if metric == "val/zeroshot_auroc" and labels is False:
        raise ConfigError(f"metric val/zeroshot_auroc needs PTB-XL labels in the validation data "
                          f"(data.root={cfg.data.root!r} has none); use val/recall_at_1 or auto")
    return metric


def check_schedule(space: SweepSpace, cfg: PretrainConfig) -> None:
    """ASHA rungs must fall on validation steps, the only reports that carry a fresh metric."""
    t = cfg.train
    if any(p.key in ("train.max_steps", "train.val_every") for p in space.params):
        raise ConfigError("train.max_steps / train.val_every cannot be swept: trials must share "
                          "the step axis that early stopping compares them on")
    if cfg.data.val_fraction <= 0 and cfg.data.root is None:
        raise ConfigError("data.val_fraction=0 leaves no validation data to rank trials on")
    if space.scheduler.type != "asha":
        return
    val_every = t.val_every or t.max_steps
    grace = space.scheduler.grace_period or val_every
    if grace % val_every or grace > t.max_steps:
        raise ConfigError(
            f"scheduler.grace_period={grace} must be a multiple of train.val_every={val_every} "
            f"and <= train.max_steps={t.max_steps}: ASHA compares trials at grace_period x "
            f"reduction_factor^k steps, which must be validation steps")


# ---------------------------------------------------------------- trial side

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

    return ValidationReportCallback()


def run_trial(config: dict[str, Any], *, base_args: list[str], metric: str, runs_dir: str,
              sweep_name: str) -> None:
    """One Tune trial: a whole pretraining run with this trial's values as overrides."""
    from ray import tune

    from melp_ray.pretrain import run
    from melp_ray.train.metrics import run_dir

    trial_id = tune.get_context().get_trial_id()
    # Stable across a restore: a restarted trial resumes its Train run from its checkpoint.
    cfg = load_config(PretrainConfig, None, base_args + trial_overrides(config) + [
        f"run.name={sweep_name}_{trial_id}", f"run.storage_path={runs_dir}"])
    run(cfg, callbacks=[trial_report_callback(metric)])
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
    from ray import tune

    fn = tune.with_parameters(run_trial, base_args=sweep.base_args, metric=sweep.metric,
                              runs_dir=sweep.runs_dir, sweep_name=sweep.space.name)
    return tune.with_resources(fn, dict(sweep.space.trial_resources))


# ---------------------------------------------------------------- driver

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
    return {"space_file": space_path, "space": dataclasses.asdict(sweep.space),
            "base_args": sweep.base_args, "metric": sweep.metric}


def run_sweep(sweep: Sweep, space_path: str = "", restore: bool = False,
              stop_after_trials: int | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep to completion or interruption; returns the summary."""
    global _stop_after_trials
    from ray import tune

    from melp_ray.ray_utils import quiet_data_progress_bars
    from melp_ray.ray_utils import init_ray

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


# ---------------------------------------------------------------- outputs

def summarise(sweep: Sweep) -> dict[str, Any]:
    """tune_summary.json + the plot, from Tune's saved experiment state."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(sweep.dir)
    max_steps = sweep.base_cfg.train.max_steps
    trials = []
    for trial in sorted(analysis.trials, key=lambda tr: tr.trial_id):
        last = trial.last_result or {}
        value = last.get(sweep.metric)
        step = last.get("step")
        status = trial.status
        if status == "TERMINATED" and step is not None:
            status = "COMPLETED" if step >= max_steps else "EARLY_STOPPED"
        run_summary = storage.join(sweep.runs_dir, f"{sweep.space.name}_{trial.trial_id}",
                                   "summary.json")
        trials.append({
            "trial_id": trial.trial_id,
            "status": status,
            "config": dict(trial.config),
            "metric": float(value) if value is not None else None,
            "metric_step": last.get("val_step"),
            "step": step,
            "losses": {k: v for k, v in last.items() if k.startswith("loss/")},
            "validation": {k: v for k, v in last.items() if k.startswith("val/")},
            "checkpoint_path": last.get("checkpoint_path"),
            "run_summary": run_summary if storage.exists(run_summary) else None,
            "trial_path": trial.path,
            "best": False,
        })
    ranked = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    best = max(ranked, key=lambda t: t["metric"], default=None)
    if best is not None:
        best["best"] = True
    summary = {
        "sweep": sweep.space.name,
        "sweep_dir": sweep.dir,
        "metric": sweep.metric,
        "mode": "max",
        "scheduler": sweep.space.scheduler.type,
        "search": sweep.space.search,
        "params": [p.key for p in sweep.space.params],
        "num_trials": len(trials),
        "status_counts": {s: sum(t["status"] == s for t in trials)
                          for s in sorted({t["status"] for t in trials})},
        "best_trial": best["trial_id"] if best else None,
        "best_config": best["config"] if best else None,
        "best_metric": best["metric"] if best else None,
        "best_checkpoint": best["checkpoint_path"] if best else None,
        "trials": trials,
    }
    storage.write_json(storage.join(sweep.dir, SUMMARY_FILE), summary)
    summary["plot"] = write_plot(summary, sweep)
    storage.write_json(storage.join(sweep.dir, SUMMARY_FILE), summary)
    return summary


def write_plot(summary: dict[str, Any], sweep: Sweep) -> str | None:
    """One panel per swept parameter: the metric of every trial against its value."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in summary["trials"] if t["metric"] is not None]
    keys = summary["params"]
    if not trials or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [t["config"].get(key) for t in trials]
        numeric = all(_is_number(x) for x in xs)
        pos = xs if numeric else [sorted(map(str, set(xs))).index(str(x)) for x in xs]
        ax.scatter(pos, [t["metric"] for t in trials], c="tab:blue")
        for x, t in zip(pos, trials):
            if t["best"]:
                ax.scatter([x], [t["metric"]], marker="*", s=250, c="tab:red", label="best")
        if not numeric:
            ax.set_xticks(range(len(set(map(str, xs)))), sorted(map(str, set(xs))))
        elif any(p.key == key and p.distribution == "loguniform" for p in sweep.space.params):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(summary["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best")
    fig.suptitle(f"sweep {summary['sweep']}: {len(trials)} trial(s)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = storage.join(sweep.dir, PLOT_FILE)
    fs, p = storage.filesystem_and_path(path)
    with fs.open_output_stream(p) as f:
        f.write(buf.getvalue())
    return path


def format_table(summary: dict[str, Any]) -> str:
    keys = summary["params"]
    header = ["", "trial", "status", *keys, summary["metric"], "at step"]
    rows = []
    for t in summary["trials"]:
        rows.append(["*" if t["best"] else "", t["trial_id"], t["status"],
                     *[_fmt(t["config"].get(k)) for k in keys], _fmt(t["metric"]),
                     _fmt(t["metric_step"])])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = (f"best: {summary['best_trial']} {summary['metric']}={summary['best_metric']:.4f} "
            f"checkpoint {summary['best_checkpoint']}" if summary["best_trial"]
            else "best: none (no trial reported the metric)")
    return (f"[melp_ray.tune] sweep {summary['sweep']} ({summary['sweep_dir']})\n"
            + "\n".join(lines) + "\n" + best + f"\nsummary: {storage.join(summary['sweep_dir'], SUMMARY_FILE)}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.tune",
        description="Ray Tune sweeps over MELP pretraining settings (loss weights, lr ...); "
                    "each trial is a full Ray Train + DeepSpeed pretraining run.",
        epilog="Overrides are key=value pairs over the base training config (after the "
               "space's base_overrides), e.g. train.max_steps=200 data.root=/data/shards. "
               "See docs/tune.md.")
    parser.add_argument("--space", required=True, help="tune space YAML (see tune_spaces/)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="base training config: YAML file or shipped name. Default: tiny")
    parser.add_argument("--name", default=None,
                        help="sweep name (folder under run.storage_path). Default: the space's name")
    parser.add_argument("--restore", action="store_true",
                        help="resume the interrupted sweep of this name; finished trials are kept")
    parser.add_argument("--stop-after-trials", type=int, default=None, metavar="N",
                        help="interrupt (resumably) once N trials finished in this invocation")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        space = load_space(args.space, args.name)
        sweep = validate_sweep(space, args.config, args.overrides)
        summary = run_sweep(sweep, space_path=args.space, restore=args.restore,
                            stop_after_trials=args.stop_after_trials)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["best_trial"] else 1


if __name__ == "__main__":
    sys.exit(main())
