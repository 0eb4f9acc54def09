"""Ray Train's torch backend for CPU workers: process groups of the one-thread gloo.

Kept apart from ``melp_ray.train.gloo`` because it imports Ray, which a config check (and a
world of one) must not.
"""
from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from melp_ray.train.gloo import ONE_THREAD_GLOO, register_one_thread_gloo


class _OneThreadGlooBackend(_TorchBackend):
    """Ray Train's torch backend, with the one-thread gloo registered in every worker first."""

    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(register_one_thread_gloo)
        super().on_start(worker_group, backend_config)


@dataclass
class OneThreadGlooConfig(TorchConfig):
    """``TorchConfig`` for CPU workers: process groups of ``ONE_THREAD_GLOO``."""

    backend: str = ONE_THREAD_GLOO

    @property
    def backend_cls(self):
        return _OneThreadGlooBackend
