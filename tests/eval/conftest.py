"""Fixtures for planning an evaluation without Ray or model weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def config_only_export(tmp_path) -> Path:
    """A folder that ``checkpoint_info`` takes for an export (config.json, model_type melp_ray)
    at 100 Hz, 10 s. It has no weights: only for ``build_plan``, which reads none."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "melp_ray", "sample_rate": 100, "seconds": 10, "melp": {}}))
    return folder


@pytest.fixture
def plan_args(config_only_export, bundled_ptbxl, tmp_path):
    """``plan_args(*options)``: parsed command line for the bundled PTB-XL sample."""
    from melp_ray.evaluate import make_parser

    def parse(*options: str, dataset: str = "ptb-xl", root: Path | None = None):
        return make_parser().parse_args(
            ["--checkpoint", str(config_only_export), "--dataset", dataset,
             "--root", str(root or bundled_ptbxl), "--out", str(tmp_path / "out"), *options])
    return parse
