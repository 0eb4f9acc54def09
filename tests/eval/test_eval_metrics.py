"""Metrics against definitions: perfect/reversed scorers, sklearn weights, brute-force recall."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from melp_ray.eval.metrics import (_weighted_auroc, bootstrap_ci, macro_auroc, recall_at_k,
                                   paired_bootstrap_gain, skipped_classes)


def _labels(n: int, c: int, seed: int) -> np.ndarray:
    y = np.random.default_rng(seed).integers(0, 2, size=(n, c))
    y[0], y[1] = 0, 1  # every class has both values
    return y


def test_perfect_scorer_is_one_and_reversed_is_zero():
    y = _labels(200, 4, seed=0)
    scores = y + np.random.default_rng(1).uniform(0, 0.5, size=y.shape)  # positives always higher
    macro, per_class = macro_auroc(y, scores, ["a", "b", "c", "d"])
    assert macro == 1.0 and set(per_class.values()) == {1.0}
    assert macro_auroc(y, -scores)[0] == 0.0


def test_single_valued_class_is_skipped_and_named():
    y = _labels(50, 3, seed=2)
    y[:, 1] = 0
    scores = np.random.default_rng(3).normal(size=y.shape)
    with pytest.warns(UserWarning, match="'mid'"):
        macro, per_class = macro_auroc(y, scores, ["low", "mid", "high"])
    assert set(per_class) == {"low", "high"}
    assert macro == pytest.approx(np.mean([roc_auc_score(y[:, c], scores[:, c]) for c in (0, 2)]))
    assert skipped_classes(y, ["low", "mid", "high"]) == ["mid"]


def test_vectorised_weighted_auroc_matches_sklearn_sample_weight_with_ties():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=300)
    scores = np.round(rng.normal(size=300) + y, 1)  # rounding creates many ties
    weights = rng.integers(0, 4, size=(6, 300)).astype(float)
    expected = [roc_auc_score(y, scores, sample_weight=w) for w in weights]
    np.testing.assert_allclose(_weighted_auroc(y, scores, weights), expected, rtol=1e-12)


def _noisy_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(n, 5, seed)
    scores = y + np.random.default_rng(seed + 100).normal(scale=1.0, size=y.shape)
    return y, scores


def test_bootstrap_ci_contains_point_estimate_and_narrows_with_n():
    widths = []
    for n in (100, 2000):
        y, scores = _noisy_problem(n, seed=n)
        low, high = bootstrap_ci(y, scores, n=500, seed=0)
        assert low < macro_auroc(y, scores)[0] < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # width shrinks roughly like 1/sqrt(N)


def test_bootstrap_ci_is_seeded():
    y, scores = _noisy_problem(300, seed=5)
    assert bootstrap_ci(y, scores, n=200, seed=7) == bootstrap_ci(y, scores, n=200, seed=7)


def _brute_force_recall(sim: np.ndarray, k: int) -> tuple[float, float]:
    """Plain loops: a query hits if fewer than k other candidates score >= the true one."""
    n = sim.shape[0]

    def hits(matrix):
        count = 0
        for i in range(n):
            ahead = 0
            for j in range(n):
                if j != i and matrix[i][j] >= matrix[i][i]:
                    ahead += 1
            if ahead < k:
                count += 1
        return count / n

    return hits(sim.tolist()), hits(sim.T.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    ecg = rng.integers(-1, 2, size=(40, 3)).astype(float)  # coarse values: many tied scores
    text = ecg + rng.integers(-1, 2, size=(40, 3))
    sim = ecg @ text.T
    assert len(np.unique(sim)) < sim.size / 4
    result = recall_at_k(sim, ks=(1, 5, 10))
    for k in (1, 5, 10):
        e2r, r2e = _brute_force_recall(sim, k)
        assert result[f"ecg_to_report/recall@{k}"] == pytest.approx(e2r)
        assert result[f"report_to_ecg/recall@{k}"] == pytest.approx(r2e)
        assert result[f"recall@{k}"] == pytest.approx((e2r + r2e) / 2)


def test_recall_identity_is_perfect_and_constant_is_zero():
    assert recall_at_k(np.eye(20))["recall@1"] == 1.0
    assert recall_at_k(np.ones((20, 20)), ks=(1, 5, 10))["recall@10"] == 0.0  # ties count against


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="0/1"):
        macro_auroc(np.full((4, 1), 2), np.zeros((4, 1)))


def test_mean_pairwise_cosine_detects_collapse():
    from melp_ray.eval.metrics import mean_pairwise_cosine

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    brute = np.mean([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
                     for i, a in enumerate(x) for j, b in enumerate(x) if i != j])
    assert mean_pairwise_cosine(x) == pytest.approx(brute, abs=1e-12)
    assert mean_pairwise_cosine(np.tile(x[:1], (5, 1)) * np.arange(1, 6)[:, None]) == pytest.approx(1.0)
    assert mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(np.zeros((3, 4)))


def test_paired_bootstrap_gain_is_the_interval_of_the_difference():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(150, 3))
    better = y + rng.normal(scale=0.8, size=y.shape)
    worse = y + rng.normal(scale=1.6, size=y.shape)
    out = paired_bootstrap_gain(y, better, worse, n=400, seed=0)
    assert out["gain"] == pytest.approx(macro_auroc(y, better)[0] - macro_auroc(y, worse)[0])
    low, high = out["ci"]
    assert 0 < low <= out["gain"] <= high and out["p_not_better"] == 0.0
    # Paired: narrower than what two separate intervals would allow for the difference.
    b_low, b_high = bootstrap_ci(y, better, n=400, seed=0)
    w_low, w_high = bootstrap_ci(y, worse, n=400, seed=0)
    assert high - low < (b_high - w_low) - (b_low - w_high)
    # A model against itself: zero gain, a zero-width interval, never better.
    same = paired_bootstrap_gain(y, better, better, n=100)
    assert same["gain"] == 0 and same["ci"] == [0.0, 0.0] and same["p_not_better"] == 1.0
    # Swapping the two mirrors the result.
    swapped = paired_bootstrap_gain(y, worse, better, n=400, seed=0)
    assert swapped["ci"] == pytest.approx([-high, -low]) and swapped["p_not_better"] == 1.0
