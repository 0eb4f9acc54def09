"""Zero-shot classification: cosine similarity between ECG and class-prompt embeddings."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from melp_ray.eval.metrics import bootstrap_ci, macro_auroc, skipped_classes


def _l2_normalize(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} contains an all-zero embedding (cosine undefined)")
    return x / norms


def zero_shot_scores(ecg_emb, prompt_emb) -> np.ndarray:
    """(N, C) cosine similarity of ECG embeddings (N, D) and class embeddings (C, D).

    Both sides are re-normalised, so already-normalised inputs are fine too.
    """
    ecg = np.asarray(ecg_emb, dtype=np.float64)
    prompts = np.asarray(prompt_emb, dtype=np.float64)
    if ecg.ndim != 2 or prompts.ndim != 2 or ecg.shape[1] != prompts.shape[1]:
        raise ValueError(f"need (N, D) and (C, D) embeddings, got {ecg.shape} and {prompts.shape}")
    return _l2_normalize(ecg, "ecg_emb") @ _l2_normalize(prompts, "prompt_emb").T


def prompt_embeddings(encode_texts: Callable[[list[str]], np.ndarray],
                      prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """(C, D) class embeddings: each class's prompts encoded, normalised, averaged, renormalised.

    ``encode_texts`` maps a list of strings to (n, D) embeddings (e.g. a wrapper around
    ``MELP.encode_reports`` returning numpy). All prompts are encoded in one call.
    """
    flat = [text for class_prompts in prompts for text in class_prompts]
    if not flat or any(len(p) == 0 for p in prompts):
        raise ValueError("every class needs at least one prompt")
    emb = _l2_normalize(np.asarray(encode_texts(flat), dtype=np.float64), "prompt embeddings")
    if emb.shape[0] != len(flat):
        raise ValueError(f"encode_texts returned {emb.shape[0]} embeddings for {len(flat)} texts")
    bounds = np.cumsum([0] + [len(p) for p in prompts])
    means = np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return _l2_normalize(means, "averaged prompt embeddings")


def evaluate_zero_shot(ecg_emb, prompt_emb, y_true, class_names: Sequence[str],
                       n_bootstrap: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Zero-shot macro AUROC with a bootstrap CI.

    Returns ``{"macro_auroc", "per_class", "ci": [low, high], "skipped", "scores"}``;
    ``scores`` is the (N, C) cosine matrix (for ROC plots; drop it before JSON).
    """
    scores = zero_shot_scores(ecg_emb, prompt_emb)
    y = np.asarray(y_true)
    macro, per_class = macro_auroc(y, scores, class_names)
    low, high = bootstrap_ci(y, scores, n=n_bootstrap, seed=seed, alpha=alpha)
    return {"macro_auroc": macro, "per_class": per_class, "ci": [low, high],
            "skipped": skipped_classes(y, class_names), "scores": scores}
