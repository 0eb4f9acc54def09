"""Report files: results.json keys, Markdown table, ROC figure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from melp_ray.eval.metrics import recall_at_k
from melp_ray.eval_plan.report import write_classification_report, write_retrieval_report
from melp_ray.eval.zero_shot import evaluate_zero_shot


def test_classification_report_writes_three_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(80, 3))
    y[:, 2] = 0  # an unscorable class must be reported as skipped, not crash the plot
    y[0, :2], y[1, :2] = 0, 1
    ecg, prompts = y + rng.normal(size=(80, 3)), np.eye(3)
    classes = ["NORM", "MI", "HYP"]
    with pytest.warns(UserWarning, match="HYP"):
        result = evaluate_zero_shot(ecg, prompts, y, classes, n_bootstrap=100)
    settings = {"task": "ptbxl_super", "checkpoint": "none", "seed": 0}
    paths = write_classification_report(tmp_path, "zero-shot ptbxl_super", result, y,
                                        result["scores"], classes, settings)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["macro_auroc"] == result["macro_auroc"]
    assert data["settings"] == settings and data["skipped"] == ["HYP"]
    assert set(data["per_class"]) == {"NORM", "MI"} and len(data["ci"]) == 2
    md = (tmp_path / "results.md").read_text()
    assert "| NORM |" in md and "**macro**" in md and "95% CI" in md and "HYP" in md
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(paths) == {"json", "md", "roc", "scores"}
    saved = np.load(paths["scores"])   # plain arrays: loads without pickle
    assert np.array_equal(saved["y_true"], y) and np.allclose(saved["scores"], result["scores"])
    assert saved["class_names"].tolist() == classes


def test_retrieval_report_has_recall_keys(tmp_path):
    sim = np.random.default_rng(1).normal(size=(30, 30)) + 3 * np.eye(30)
    write_retrieval_report(tmp_path, recall_at_k(sim), {"split": "val"})
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"recall@1", "recall@5", "recall@10"} <= set(data)
    assert data["settings"] == {"split": "val"}
    assert "recall@10" in (tmp_path / "results.md").read_text()
