"""report_similarity: identical reports must tie exactly, whatever their embeddings' last bits."""
from __future__ import annotations

import numpy as np

from melp_ray.eval_plan.modes import report_similarity


def test_identical_reports_give_exactly_tied_columns():
    rng = np.random.default_rng(0)
    ecg, text = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    text[2] = text[0] + 1e-9   # "a" encoded again in another batch: last bits differ
    sim = report_similarity(ecg, ["a", "b", "a", "c"], text)
    np.testing.assert_array_equal(sim[:, 0], sim[:, 2])
    np.testing.assert_allclose(sim, ecg @ text.T, atol=1e-7)
