"""validate_sweep on the shipped spaces: every one is valid against the tiny config (no Ray)."""
from __future__ import annotations

from pathlib import Path

import pytest

from melp_ray.sweeps.space import load_space
from melp_ray.sweeps.validate import validate_sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("space", sorted((REPO / "tune_spaces").glob("*.yaml")))
def test_shipped_spaces_are_valid(space, tmp_path):
    sweep = validate_sweep(load_space(space), "tiny", [f"run.storage_path={tmp_path}"])
    assert sweep.metric == "val/zeroshot_auroc"
    assert {"loss.rhythm", "loss.token", "loss.beat"} <= {p.key for p in sweep.space.params}
    assert sweep.trial_cpus() == 0.5 + 2 * 0.25            # trial + 2 train workers
