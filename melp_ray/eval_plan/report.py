"""Result files of an evaluation run.

Classification (zero-shot, linear probe): ``OUT/results.json``, ``OUT/results.md`` (per-class
table + macro with CI) and ``OUT/roc.png`` (per-class ROC curves + macro average).
Retrieval: ``OUT/results.json`` and ``OUT/results.md``. Generation: those two plus
``OUT/generations.jsonl`` (record_id, reference, generated per line).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from melp_ray.eval.metrics import scorable_classes

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCORES_NPZ = "scores.npz"
ROC_PNG = "roc.png"
_MAX_LEGEND_CLASSES = 25  # beyond this a legend hides the plot


def _jsonable(value):
    """numpy scalars/arrays -> Python; NaN -> None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json(out_dir: Path, payload: dict) -> Path:
    path = out_dir / RESULTS_JSON
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4f}"


def _settings_lines(settings: Mapping) -> list[str]:
    return ["", "## Settings", "", "```json", json.dumps(_jsonable(settings), indent=2), "```"]


def classification_markdown(task: str, macro: float, ci: Sequence[float],
                            per_class: Mapping[str, float], skipped: Sequence[str],
                            settings: Mapping) -> str:
    low, high = ci
    lines = [f"# {task}", "", "| class | AUROC |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in per_class.items()]
    lines += [f"| {name} | skipped (single label value) |" for name in skipped]
    lines += [f"| **macro** | **{_fmt(macro)}** (95% CI {_fmt(low)}-{_fmt(high)}) |"]
    return "\n".join(lines + _settings_lines(settings)) + "\n"


def plot_roc(path: Path, y_true: np.ndarray, scores: np.ndarray,
             class_names: Sequence[str], title: str) -> Path:
    """Per-class ROC curves plus the macro average (mean TPR on a common FPR grid)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, roc_curve

    grid = np.linspace(0.0, 1.0, 201)
    tprs = []
    fig, ax = plt.subplots(figsize=(7, 6))
    for c in np.flatnonzero(scorable_classes(y_true)):
        fpr, tpr, _ = roc_curve(y_true[:, c], scores[:, c])
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, lw=1, alpha=0.6, label=f"{class_names[c]} ({auc(fpr, tpr):.3f})")
    if tprs:
        mean_tpr = np.mean(tprs, axis=0)
        mean_tpr[0] = 0.0
        ax.plot(grid, mean_tpr, color="black", lw=2.5,
                label=f"macro average ({auc(grid, mean_tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    if len(tprs) <= _MAX_LEGEND_CLASSES:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_classification_report(out_dir: str | Path, task: str, result: Mapping,
                                y_true, scores, class_names: Sequence[str],
                                settings: Mapping) -> dict[str, Path]:
    """Write results.json / results.md / roc.png / scores.npz for a zero-shot or linear-probe
    result. scores.npz holds ``y_true``, ``scores`` (one row per test record, in the order
    of the evaluation) and ``class_names``: what a paired comparison of two models needs.

    ``result`` needs ``macro_auroc``, ``per_class`` and ``ci`` (``skipped`` optional); any
    other JSON-able entries are kept in results.json, array-valued ones (scores) dropped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2 or y.shape[1] != len(class_names):
        raise ValueError(f"y_true {y.shape}, scores {s.shape} and {len(class_names)} class "
                         "names do not match")
    summary = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
    summary.setdefault("skipped", [])
    payload = {"task": task, **summary, "class_names": list(class_names),
               "n_samples": int(y.shape[0]), "settings": dict(settings)}
    md = classification_markdown(task, result["macro_auroc"], list(result["ci"]),
                                 result["per_class"], summary["skipped"], settings)
    (out / RESULTS_MD).write_text(md)
    np.savez(out / SCORES_NPZ, y_true=y, scores=s, class_names=np.asarray(class_names))
    return {"json": _write_json(out, payload), "md": out / RESULTS_MD, "scores": out / SCORES_NPZ,
            "roc": plot_roc(out / ROC_PNG, y, s, list(class_names), title=task)}


def write_retrieval_report(out_dir: str | Path, recalls: Mapping[str, float],
                           settings: Mapping, task: str = "retrieval") -> dict[str, Path]:
    """Write results.json / results.md for ``metrics.recall_at_k`` output."""
    required = ("recall@1", "recall@5", "recall@10")
    missing = [k for k in required if k not in recalls]
    if missing:
        raise ValueError(f"retrieval results lack {missing} (compute ks=(1, 5, 10))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {task}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in recalls.items()]
    (out / RESULTS_MD).write_text("\n".join(lines + _settings_lines(settings)) + "\n")
    payload = {"task": task, **recalls, "settings": dict(settings)}
    return {"json": _write_json(out, payload), "md": out / RESULTS_MD}


GENERATIONS_JSONL = "generations.jsonl"


def write_generation_report(out_dir: str | Path, metrics: Mapping, record_ids: Sequence[str],
                            generated: Sequence[str], references: Sequence[str],
                            settings: Mapping, task: str = "ptb-xl report generation"
                            ) -> dict[str, Path]:
    """results.json / results.md with BLEU-1/4, ROUGE-L, METEOR; every pair as JSON lines."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / GENERATIONS_JSONL, "w") as f:
        for rid, ref, gen in zip(record_ids, references, generated):
            f.write(json.dumps({"record_id": rid, "reference": ref, "generated": gen}) + "\n")
    lines = [f"# {task}", "", "| metric | value |", "|---|---|"]
    for name in ("bleu1", "bleu4", "rouge_l", "meteor"):
        value = metrics.get(name)
        lines.append(f"| {name} | {'not computed' if value is None else _fmt(value)} |")
    if metrics.get("meteor_unavailable"):
        lines += ["", f"METEOR: {metrics['meteor_unavailable']}"]
    (out / RESULTS_MD).write_text("\n".join(lines + _settings_lines(settings)) + "\n")
    payload = {"task": task, **metrics, "settings": dict(settings)}
    return {"json": _write_json(out, payload), "md": out / RESULTS_MD,
            "generations": out / GENERATIONS_JSONL}
