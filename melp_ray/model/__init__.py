"""The MELP model (plain PyTorch, no Ray): config, model, parameter counts, and its three losses (losses).

``MELP`` and ``count_parameters`` load on first use: config readers (the CLIs' config checks,
Ray Data workers building batches) import ``melp_ray.model.config`` through this package and
must not pay for importing torch (~2 CPU-s a process).
"""
from importlib import import_module

from melp_ray.model.config import ModelConfig, model_config_from_preset

__all__ = ["MELP", "ModelConfig", "model_config_from_preset", "count_parameters"]


def __getattr__(name: str):
    if name in ("MELP", "count_parameters"):
        return getattr(import_module("melp_ray.model.melp"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
