"""From a parsed space and a base training config to a ``Sweep``: every check that needs no Ray.

``validate_sweep`` builds the base config (config file, then the space's base_overrides,
then the command line), tries every parameter at its bounds / values on that config,
picks the ranking metric and checks the ASHA schedule, so a bad sweep fails before Ray
starts rather than in trial N.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

import yaml

from melp_ray.utils import storage
from melp_ray.config import ConfigError, PretrainConfig, load_config, resolve_config_path
from melp_ray.config_sections import data_has_labels
from melp_ray.sweeps.space import SweepSpace

DEFAULT_CONFIG = "tiny"
RUNS_DIR = "runs"


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
    """A trial's sampled values as key=value overrides (validate_sweep tries them, run_trial uses them)."""
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
    if base_cfg.train.elastic:   # a trial's CPU/GPU reservation is fixed when it is scheduled
        raise ConfigError("train.num_workers: a sweep's trials need a fixed worker count, not a range")
    metric = resolve_metric(space.metric, base_cfg)
    check_schedule(space, base_cfg)
    storage_root = storage.normalise_storage_path(base_cfg.run.storage_path)
    return Sweep(space=space, base_args=base_args, base_cfg=base_cfg, metric=metric,
                 storage_root=storage_root)


def resolve_metric(metric: str, cfg: PretrainConfig) -> str:
    labels = data_has_labels(cfg.data)
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
