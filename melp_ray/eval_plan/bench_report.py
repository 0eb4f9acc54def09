"""The benchmark's result files: DIR/table.md (the paper's layout), DIR/table.csv (one
line per cell) and DIR/results.json (every run with its CI and record counts, the skipped
datasets with their reasons, and the inference-pass accounting).

Layout as in the MELP paper: rows are the models (the checkpoint, then its random-init
baseline), columns the tasks; zero-shot has one column per task plus the mean, the linear
probe one column per task and training fraction plus the mean per fraction. A cell is the
macro AUROC x 100 with its 95% bootstrap CI; over several probe seeds, the mean of the
seeds' AUROCs and of their CI bounds. A skipped dataset keeps its columns, marked.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from melp_ray.eval_plan.report import _jsonable

TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
RESULTS_JSON = "results.json"
MODEL_LABELS = {"pretrained": "MELP (this checkpoint)", "random_init": "random init"}
DATASET_LABELS = {"ptb-xl": "PTB-XL", "cpsc2018": "CPSC2018", "chapman": "Chapman",
                  "code-15": "CODE-15%"}
CSV_FIELDS = ("table", "model", "dataset", "task", "fraction", "macro_auroc", "ci_low",
              "ci_high", "n_seeds", "n_test", "status", "reason")


def column_label(dataset: str, task: str | None, fraction: float | None = None) -> str:
    label = DATASET_LABELS[dataset] + (f" {task}" if task else "")
    return label if fraction is None else f"{label} {fraction * 100:g}%"


def _columns(bench, mode: str) -> list[tuple[str, str | None, float | None]]:
    """(dataset, task, fraction) of every column of a table, in suite order."""
    cols = []
    for spec in bench.suite.datasets:
        if mode not in spec.modes:
            continue
        for task in spec.tasks:
            fractions = spec.fractions if mode == "linear" else [None]
            cols += [(spec.name, task, f) for f in fractions]
    return cols


def _run_row(item: dict) -> dict[str, Any]:
    results = item["results"] or {}
    row = {**item["run"], "out": item["out"],
           "status": "ok" if item["error"] is None else "failed"}
    if item["error"] is not None:
        return {**row, "error": item["error"]}
    row.update({k: results.get(k) for k in ("macro_auroc", "ci", "per_class", "skipped",
                                            "n_samples", "n_train", "best_round")
                if k in results})
    row["records"] = results.get("records")
    return row


def aggregate(rows: list[dict], bench) -> list[dict[str, Any]]:
    """One cell per (table, model, column): seeds averaged; skipped and failed marked."""
    skipped = {s["dataset"]: s["reason"] for s in bench.skipped}
    cells = []
    for mode in ("zeroshot", "linear"):
        for model in ("pretrained", "random_init"):
            for dataset, task, fraction in _columns(bench, mode):
                cell = {"table": mode, "model": model, "dataset": dataset, "task": task,
                        "fraction": fraction}
                mine = [r for r in rows if (r["mode"], r["model"], r["dataset"], r["task"],
                                            r["fraction"]) == (mode, model, dataset, task,
                                                               fraction)]
                ok = [r for r in mine if r["status"] == "ok"]
                if dataset in skipped:
                    cell.update(status="skipped", reason=skipped[dataset])
                elif len(ok) < len(mine) or not ok:
                    cell.update(status="failed", reason="; ".join(
                        r.get("error", "no run") for r in mine if r["status"] != "ok"))
                else:
                    cell.update(status="ok", n_seeds=len(ok), n_test=ok[0]["n_samples"],
                                macro_auroc=float(np.mean([r["macro_auroc"] for r in ok])),
                                ci_low=float(np.mean([r["ci"][0] for r in ok])),
                                ci_high=float(np.mean([r["ci"][1] for r in ok])))
                cells.append(cell)
    return cells


def _pct(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _cell_text(cell: dict) -> str:
    if cell["status"] != "ok":
        return cell["status"]
    return f"{_pct(cell['macro_auroc'])} [{_pct(cell['ci_low'])}, {_pct(cell['ci_high'])}]"


def _mean(cells: Sequence[dict]) -> str:
    values = [c["macro_auroc"] for c in cells if c["status"] == "ok"]
    return _pct(float(np.mean(values))) if values else "n/a"


def _table(cells: list[dict], bench, mode: str, title: str) -> list[str]:
    cols = _columns(bench, mode)
    if not cols:
        return []
    fractions = sorted({f for _, _, f in cols if f is not None})
    means = [f"mean {f * 100:g}%" for f in fractions] if mode == "linear" else ["mean"]
    header = ["model", *(column_label(*c) for c in cols), *means]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for model in ("pretrained", "random_init"):
        mine = [c for c in cells if c["table"] == mode and c["model"] == model]
        by_col = {(c["dataset"], c["task"], c["fraction"]): c for c in mine}
        row = [MODEL_LABELS[model], *(_cell_text(by_col[c]) for c in cols)]
        if mode == "linear":
            row += [_mean([c for c in mine if c["fraction"] == f]) for f in fractions]
        else:
            row.append(_mean(mine))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def benchmark_markdown(cells: list[dict], bench, embeddings: dict) -> str:
    lines = [f"# Benchmark of {bench.checkpoint}", "",
             "Macro AUROC x 100 on the test split, 95% bootstrap CI in brackets "
             f"({bench.suite.bootstrap} replicates). The random-init row is the same "
             "architecture with seeded untrained weights. Means are over the columns scored "
             "(skipped or failed columns left out). Suite: " + bench.suite.path, ""]
    lines += _table(cells, bench, "zeroshot", "Zero-shot classification")
    lines += _table(cells, bench, "linear", "Linear probe (fraction of the training split)")
    if bench.skipped:
        lines += ["## Skipped datasets", ""]
        lines += [f"- {DATASET_LABELS[s['dataset']]}: {s['reason']}" for s in bench.skipped]
        lines.append("")
    failed = [c for c in cells if c["status"] == "failed"]
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- {c['model']} {column_label(c['dataset'], c['task'], c['fraction'])}: "
                  f"{c['reason']}" for c in failed]
        lines.append("")
    lines += ["## Embeddings", "", "| dataset | model | inference passes | records |",
              "|---|---|---|---|"]
    for dataset, models in embeddings.items():
        for model, acc in models.items():
            lines.append(f"| {DATASET_LABELS[dataset]} | {model} | {acc['inference_passes']} "
                         f"| {acc['records_embedded']} |")
    lines += ["", "Per-run results, per-class AUROC and ROC plots: runs/<dataset>/<model>/"
              "<mode>/ (results.md, roc.png)."]
    return "\n".join(lines) + "\n"


def write_benchmark(bench, finished: list[dict], embeddings: dict) -> dict[str, Any]:
    """Write table.md, table.csv and results.json into bench.out; returns results.json."""
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_run_row(item) for item in finished]
    cells = aggregate(rows, bench)
    (out / TABLE_MD).write_text(benchmark_markdown(cells, bench, embeddings))
    with open(out / TABLE_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(cells)
    results = {"checkpoint": bench.checkpoint, "suite": bench.suite.path,
               "metric": "macro AUROC with a 95% percentile bootstrap CI (test split)",
               "settings": {"bootstrap": bench.suite.bootstrap,
                            "batch_size": bench.suite.batch_size,
                            "random_init_seed": bench.suite.random_init_seed},
               "cells": cells, "runs": rows, "skipped": bench.skipped,
               "embeddings": embeddings}
    results = _jsonable(results)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    return results
