"""The sweep space: a space YAML parsed and checked on its own, before any config is built.

A space says which config keys a sweep samples and how (``params``: uniform, loguniform,
choice or grid), how trials are searched and scheduled, and the metric that ranks them.
Everything here is checked without the training config or Ray; validate.py then tries
the space against the config. See docs/tune.md for the format.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from melp_ray.config import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
SEARCHERS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")
SPACE_KEYS = {"name", "search", "scheduler", "num_samples", "metric", "mode",
              "max_concurrent_trials", "trial_resources", "seed", "base_overrides", "params"}
# Weight-free validation metrics the pretrain recipe reports (all: higher is better).
METRIC_RE = re.compile(r"val/(zeroshot_auroc|((ecg_to_report|report_to_ecg)/)?recall_at_(1|5|10))")
# The sweep owns these: one run per trial, stored under the sweep's folder.
SWEEP_OWNED_KEYS = ("run.name", "run.storage_path")


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
        if not (is_number(low) and is_number(high)):
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
            is_number(v) and v < 0 for v in param.candidates()):
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


def is_number(v: Any) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum
