"""Fixtures for planning an evaluation without Ray or model weights (the config-only export
they use is in tests/conftest.py, shared with tests/test_benchmark.py)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def plan_args(config_only_export, bundled_ptbxl, tmp_path):
    """``plan_args(*options)``: parsed command line for the bundled PTB-XL sample."""
    from melp_ray.evaluate import make_parser

    def parse(*options: str, dataset: str = "ptb-xl", root: Path | None = None):
        return make_parser().parse_args(
            ["--checkpoint", str(config_only_export), "--dataset", dataset,
             "--root", str(root or bundled_ptbxl), "--out", str(tmp_path / "out"), *options])
    return parse
