"""Linear probe on a synthetic separable problem; deterministic label-fraction subsampling."""
from __future__ import annotations

import numpy as np
import pytest

from melp_ray.eval.linear_probe import ProbeConfig, subsample_indices, train_linear_probe


def _separable(n: int, seed: int, n_classes: int = 3, n_features: int = 16):
    """Class c is on when feature c is shifted by +4 (features on different scales)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_classes)) < 0.3).astype(np.float32)
    x = rng.normal(size=(n, n_features))
    x[:, :n_classes] += 4.0 * y
    return x * rng.uniform(0.1, 50, size=n_features) + 7.0, y  # standardisation must cope


def test_probe_learns_a_separable_problem():
    splits = [_separable(n, seed) for n, seed in ((600, 0), (200, 1), (300, 2))]
    result = train_linear_probe(*splits[0], *splits[1], *splits[2], class_names=["a", "b", "c"],
                                config=ProbeConfig(max_rounds=60), n_bootstrap=200)
    assert result.macro_auroc > 0.9
    assert set(result.per_class) == {"a", "b", "c"} and result.skipped == []
    assert result.n_train == 600 and result.test_scores.shape == (300, 3)
    assert result.ci[0] <= result.macro_auroc <= result.ci[1]


def test_probe_is_deterministic_for_a_seed():
    splits = [_separable(n, seed) for n, seed in ((300, 3), (100, 4), (100, 5))]
    runs = [train_linear_probe(*splits[0], *splits[1], *splits[2], fraction=0.1,
                               config=ProbeConfig(max_rounds=10), n_bootstrap=10)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].test_scores, runs[1].test_scores)


def test_subsampling_is_deterministic_sized_and_covers_every_class():
    y = np.zeros((1000, 5), dtype=np.float32)
    y[np.random.default_rng(0).choice(1000, 300, replace=False), 0] = 1
    y[[10, 20], 1] = 1   # rare classes: a 1 % random draw would usually miss them
    y[[30], 2] = 1
    y[[30, 40, 50], 3] = 1
    # class 4 has no positive at all: nothing to cover
    for fraction, size in ((0.01, 10), (0.1, 100)):
        first = subsample_indices(y, fraction, seed=0)
        again = subsample_indices(y, fraction, seed=0)
        np.testing.assert_array_equal(first, again)
        assert len(first) == size == len(np.unique(first))
        assert (y[first, :4].sum(axis=0) > 0).all()
    assert not np.array_equal(subsample_indices(y, 0.1, seed=0), subsample_indices(y, 0.1, seed=1))
    np.testing.assert_array_equal(subsample_indices(y, 1.0, seed=3), np.arange(1000))


def test_subsampling_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fraction"):
        subsample_indices(np.zeros((10, 2)), 0.0)
