"""Typed configs for the recipes: dataclasses loaded from YAML, then `key=value` overrides.

    cfg = load_config(PretrainConfig, "melp_ray/configs/tiny.yaml", ["train.max_steps=20"])

Unknown keys, wrong types and impossible combinations raise ``ConfigError`` here,
before any Ray resource is asked for.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Sequence

from melp_ray.config_parsing import (ConfigError, apply_preset, from_dict, load_yaml, parse_override,
                                     set_dotted)
from melp_ray.config_sections import (DataConfig, DeepSpeedConfig, LossConfig, RunConfig, TrainConfig,
                                      data_has_labels, data_problems, deepspeed_problems, loss_problems,
                                      raise_if, run_problems, train_problems)
from melp_ray.model.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        validate_pretrain_config(self)


# ---------------------------------------------------------------- loading

T = TypeVar("T")


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key=value`` overrides, then validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        with open(path) as f:
            raw = load_yaml(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_preset(cls, raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    raw = apply_preset(cls, raw)
    cfg = from_dict(cls, raw)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A file path, or the name of a config shipped in melp_ray/configs ("tiny", "paper.yaml")."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {str(path)!r} not found (shipped configs: {shipped})")


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from its saved dict (a checkpoint's, an export's): types checked, an
    unknown key is an error."""
    return from_dict(ModelConfig, dict(d), "model.")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON types (what checkpoints, summaries and W&B store)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ---------------------------------------------------------------- validation

def config_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (what ``key=value`` overrides may name)."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def check_checkpoint_metric(cfg: PretrainConfig) -> None:
    """Zero-shot AUROC needs labelled validation data: fail before Ray, not at the first
    validation of the run."""
    if cfg.train.checkpoint_metric == "val/zeroshot_auroc" and data_has_labels(cfg.data) is False:
        raise ConfigError(f"train.checkpoint_metric=val/zeroshot_auroc needs PTB-XL labels in the "
                          f"validation data (data.root={cfg.data.root!r} has none); use e.g. "
                          f"val/recall_at_10 or val/loss_rhythm with train.checkpoint_mode=min")


def validate_pretrain_config(cfg: PretrainConfig) -> None:
    problems = (train_problems(cfg.train) + deepspeed_problems(cfg.deepspeed)
                + data_problems(cfg.data) + run_problems(cfg.run) + loss_problems(cfg.loss))
    if cfg.train.compile and cfg.deepspeed.zero_stage == 3:   # ZeRO-3's gather hooks vs dynamo
        problems.append("train.compile needs deepspeed.zero_stage 0, 1 or 2")
    if cfg.train.elastic:
        problems += elastic_problems(cfg)
    raise_if(problems)


def elastic_problems(cfg: PretrainConfig) -> list[str]:
    """What an elastic run (a train.num_workers range) cannot resize, said before Ray starts."""
    where = f"train.num_workers={list(cfg.train.worker_range)} (an elastic run)"
    problems = []
    if cfg.deepspeed.zero_stage == 3:
        # DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load gives every optimizer param
        # group the hyperparameters of the first: our no-decay group (biases, norms) would
        # be decayed after a resize (measured: docs/cluster.md, "elastic runs").
        problems.append(f"{where} resizes ZeRO stages 0, 1 and 2; deepspeed.zero_stage=3 "
                        f"cannot resize (its optimizer state does not load exactly on another "
                        f"world size): use deepspeed.zero_stage=2 or a fixed train.num_workers")
    if cfg.deepspeed.offload_optimizer:
        problems.append(f"{where}: deepspeed.offload_optimizer is not supported (a resize of "
                        f"offloaded optimizer state is untested)")
    if cfg.data.materialize:
        problems.append(f"{where}: data.materialize=true keeps one fixed slice per worker; "
                        f"add data.materialize=false (each epoch's records are dealt per world size)")
    return problems


