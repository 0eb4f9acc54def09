"""Connecting to Ray the same way from every entry point."""
from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, **init_kwargs: Any):
    """Attach to a running Ray cluster if there is one, else start a local instance.

    - already initialised in this process (e.g. by a test fixture): reuse it;
    - ``address`` or ``$RAY_ADDRESS`` given: connect there (errors if unreachable);
    - otherwise try ``address="auto"`` (a cluster started with ``ray start`` on this
      machine) and fall back to a fresh local instance when none is running.
    ``init_kwargs`` go to the local ``ray.init`` (e.g. ``num_cpus=2``). Returns the ``ray`` module.
    """
    import ray

    if ray.is_initialized():
        return ray
    common = {"ignore_reinit_error": True, "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **common)
        return ray
    try:
        ray.init(address="auto", **common)
    except ConnectionError:   # none (or several) to attach to: a private local instance
        ray.init(address="local", **common, **init_kwargs)
    return ray
