"""Shared test fixtures: one real local Ray instance per session, and the data roots."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before ray/deepspeed are imported anywhere in the test session.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, shared by every test of the session."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance, never a cluster some other process started.
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_TRAIN_V2_ENABLED": "1"}})
    yield ray
    # Left running for the rest of the session; pytest exit tears it down.


@pytest.fixture(scope="session")
def bundled_ptbxl() -> Path:
    """The PTB-XL sample shipped inside the package (always present)."""
    from melp_ray.data.sources import bundled_root

    return Path(bundled_root())


@pytest.fixture(scope="session")
def shared_ptbxl() -> Path:
    """The larger ../shared/data/ptb-xl set when the checkout has it, else the bundled one."""
    root = SHARED_DATA / "ptb-xl"
    if root.is_dir():
        return root
    from melp_ray.data.sources import bundled_root

    return Path(bundled_root())
