"""Evaluation metrics: macro AUROC (with a bootstrap CI) and cross-modal recall@k.

Conventions
-----------
* ``y_true`` is an (N, C) 0/1 matrix, ``scores`` an (N, C) float matrix (higher = more
  likely positive). A 1-D pair is treated as a single class.
* A class whose ``y_true`` column holds only one value has no defined AUROC; it is left
  out of the macro average (named by ``skipped_classes`` and a warning) instead of
  silently becoming 0.5.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def _as_2d(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} must both be (N, C)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0/1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y.astype(np.int8), s


def _class_names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n_classes)]
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} score columns")
    return [str(c) for c in class_names]


def scorable_classes(y_true) -> np.ndarray:
    """Boolean mask of the classes that have both positives and negatives."""
    y = np.asarray(y_true)
    if y.ndim == 1:
        y = y[:, None]
    positives = y.sum(axis=0)
    return (positives > 0) & (positives < y.shape[0])


def skipped_classes(y_true, class_names: Sequence[str] | None = None) -> list[str]:
    """Names of the classes without an AUROC (a single label value in ``y_true``)."""
    y = np.asarray(y_true)
    if y.ndim == 1:
        y = y[:, None]
    names = _class_names(class_names, y.shape[1])
    return [name for name, ok in zip(names, scorable_classes(y)) if not ok]


def macro_auroc(y_true, scores, class_names: Sequence[str] | None = None
                ) -> tuple[float, dict[str, float]]:
    """Macro AUROC over the scorable classes, with ``roc_auc_score`` per class.

    Returns ``(macro, per_class)``; ``per_class`` maps class name (or column index as a
    string) -> AUROC for the scored classes only. Classes left out because ``y_true``
    holds a single value for them are named in a ``UserWarning`` and by
    ``skipped_classes``. ``macro`` is NaN when no class is scorable.
    """
    y, s = _as_2d(y_true, scores)
    names = _class_names(class_names, y.shape[1])
    keep = scorable_classes(y)
    per_class = {names[c]: float(roc_auc_score(y[:, c], s[:, c]))
                 for c in range(y.shape[1]) if keep[c]}
    skipped = [names[c] for c in range(y.shape[1]) if not keep[c]]
    if skipped:
        warnings.warn(f"AUROC undefined (single label value) for classes {skipped}; "
                      "left out of the macro average", UserWarning, stacklevel=2)
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return macro, per_class


def _weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one class under many row weightings at once.

    ``weights`` is (B, N): how often each row was drawn in each bootstrap replicate. The
    AUROC of a weighted sample is the weighted Mann-Whitney statistic
    P(score_pos > score_neg) + 0.5 P(tie); grouping rows by distinct score value makes it
    a cumulative sum, so all B replicates cost O(B N) instead of B sklearn calls.
    Equals ``roc_auc_score(y, s, sample_weight=w)`` (checked in the tests). NaN where a
    replicate drew no positive or no negative.
    """
    order = np.argsort(s, kind="stable")
    sorted_scores = s[order]
    # Start of each run of equal scores: tied rows are summed into one group.
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_sorted = weights[:, order]
    is_pos = (y[order] == 1)[None, :]
    pos_w = np.add.reduceat(np.where(is_pos, w_sorted, 0.0), group_starts, axis=1)
    neg_w = np.add.reduceat(np.where(is_pos, 0.0, w_sorted), group_starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    wins = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    pairs = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def bootstrap_macro_auroc(y_true, scores, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Macro AUROC of ``n`` row-resampled replicates (classes scorable on the full data).

    A class that a replicate happens to draw with a single label value is left out of that
    replicate's average (nan-mean); a replicate with no scorable class is NaN.
    """
    y, s = _as_2d(y_true, scores)
    keep = np.flatnonzero(scorable_classes(y))
    if keep.size == 0:
        return np.full(n, np.nan)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, y.shape[0], size=(n, y.shape[0]))
    # Row counts per replicate; resampling with replacement == integer row weights.
    flat = (np.arange(n)[:, None] * y.shape[0] + rows).ravel()
    weights = np.bincount(flat, minlength=n * y.shape[0]).reshape(n, y.shape[0]).astype(float)
    per_class = np.stack([_weighted_auroc(y[:, c], s[:, c], weights) for c in keep], axis=1)
    with warnings.catch_warnings():  # an all-NaN replicate is a valid NaN, not a problem
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(per_class, axis=1)


def bootstrap_ci(y_true, scores, n: int = 1000, seed: int = 0, alpha: float = 0.05
                 ) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval of the macro AUROC (rows resampled)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    values = bootstrap_macro_auroc(y_true, scores, n=n, seed=seed)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_bootstrap_gain(y_true, scores, baseline_scores, n: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> dict[str, float]:
    """Macro AUROC of ``scores`` minus that of ``baseline_scores`` on the same rows, with a
    *paired* percentile bootstrap interval: each replicate resamples the rows once and scores
    both on them, so the interval is that of the difference, much narrower than the two
    separate intervals (the rows' difficulty is shared). ``p_not_better``: the fraction of
    replicates where the gain is <= 0."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y, s = _as_2d(y_true, scores)
    _, b = _as_2d(y_true, baseline_scores)
    gain = macro_auroc(y, s)[0] - macro_auroc(y, b)[0]
    # Same seed, same row count: both calls draw the very same resamples.
    diffs = bootstrap_macro_auroc(y, s, n=n, seed=seed) - bootstrap_macro_auroc(y, b, n=n, seed=seed)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return {"gain": float(gain), "ci": [float("nan"), float("nan")], "p_not_better": float("nan")}
    low, high = np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"gain": float(gain), "ci": [float(low), float(high)],
            "p_not_better": float(np.mean(diffs <= 0))}


def _ranks_of_diagonal(sim: np.ndarray) -> np.ndarray:
    """0-based rank of each row's diagonal entry among that row's entries.

    Ties are broken against the true match (conservative): every other candidate scoring
    exactly the same as the true one counts as ranked ahead of it. The result therefore
    never depends on candidate order and a constant similarity matrix scores recall 0
    (for k < N) instead of a lucky 1.
    """
    true = np.diag(sim)[:, None]
    strictly_better = (sim > true).sum(axis=1)
    tied_others = (sim == true).sum(axis=1) - 1
    return strictly_better + tied_others


def recall_at_k(sim, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Cross-modal retrieval recall@k from an (N, N) similarity matrix.

    ``sim[i, j]`` = similarity of ECG ``i`` and report ``j``; the matching pair is on the
    diagonal. Keys: ``ecg_to_report/recall@k`` (query = row, rank its columns),
    ``report_to_ecg/recall@k`` (query = column, rank its rows), and ``recall@k``, the mean
    of the two directions. Ties count against the query (see ``_ranks_of_diagonal``).
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"sim must be a non-empty square (N, N) matrix, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("sim contains NaN or inf")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    ranks = {"ecg_to_report": _ranks_of_diagonal(s), "report_to_ecg": _ranks_of_diagonal(s.T)}
    out: dict[str, float] = {}
    for k in ks:
        per_direction = [float(np.mean(r < k)) for r in ranks.values()]
        for direction, value in zip(ranks, per_direction):
            out[f"{direction}/recall@{k}"] = value
        out[f"recall@{k}"] = float(np.mean(per_direction))
    return out


def mean_pairwise_cosine(emb) -> float:
    """Mean cosine similarity over the pairs of *different* rows of ``emb`` (N, D).

    Rows are L2-normalised first. A collapse detector: embeddings of different records
    that all point the same way (a model that ignores its input) give ~1; unrelated
    random directions in D dimensions give ~0.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N, D) embeddings with N >= 2, got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(x).all():
        raise ValueError("embeddings must be finite and non-zero")
    x = x / norms
    n = x.shape[0]
    total = x.sum(axis=0)
    # sum over all ordered pairs i != j of <x_i, x_j> = |sum x|^2 - sum |x_i|^2 (= n)
    return float((total @ total - n) / (n * (n - 1)))
