"""The evaluation modes (zero-shot, linear probe, retrieval, report generation) and their
result files.

``evaluate(args)`` checks the arguments (``build_plan``), starts Ray and runs the mode: each
``run_*`` embeds the records it needs, scores them and writes OUT/results.json and
OUT/results.md (plus OUT/roc.png and OUT/scores.npz for classification), with every
record accounted for under "records": used, rejected while loading (named, with the
reason), or left out before loading.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from melp_ray.eval.embeddings import build_model, drop_rejected, embed_records
from melp_ray.eval_plan.plan import EvalRecord, Plan, build_plan

# (records, {column: (model method, input column)}) -> columns by record_id, with "rejected"
Embed = Callable[[list[EvalRecord], dict[str, tuple[str, str]]], dict[str, np.ndarray]]


def evaluate(args: argparse.Namespace, embed: Embed | None = None) -> dict[str, Any]:
    """Check the arguments, run the mode on Ray, write OUT/results.*; returns results.json.

    ``embed(records, outputs)`` supplies the embeddings (e.g. an ``EmbeddingTable`` computed
    once for several modes); by default each mode runs its own inference pass."""
    plan = build_plan(args)
    from melp_ray.utils.ray_connect import quiet_data_progress_bars
    from melp_ray.utils.ray_connect import init_ray

    init_ray(verbose=getattr(args, "verbose", False))
    quiet_data_progress_bars()
    model_fn = functools.partial(build_model, plan.checkpoint, args.random_init, args.seed)
    if embed is None:
        embed = functools.partial(embed_records, plan, model_fn=model_fn,
                                  batch_size=args.batch_size, actors=args.actors)
    run = {"zeroshot": run_zeroshot, "linear": run_linear, "retrieval": run_retrieval,
           "generation": run_generation}
    with output_folder(args.out) as plan.out:
        return run[plan.mode](plan, model_fn, embed, args, {})


@contextlib.contextmanager
def output_folder(out: str):
    """The local folder the result files are written to: ``out`` itself, or for a URI
    (``s3://``, ``gs://``) a temporary folder copied there once every file is written."""
    from melp_ray.utils import storage

    if not storage.is_uri(out):
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="melp_eval_") as tmp:
        yield Path(tmp)
        storage.copy_folder(tmp, out)


def _labels(records: list[EvalRecord], ids) -> np.ndarray:
    by_id = {r.record_id: r.labels for r in records}
    return np.stack([by_id[str(i)] for i in ids])


def run_zeroshot(plan: Plan, model_fn, embed: Embed, args, accounting) -> dict[str, Any]:
    import torch

    from melp_ray.eval.zero_shot import evaluate_zero_shot, prompt_embeddings

    model = model_fn()   # in the driver: only the class prompts (a few strings) go through it
    with torch.inference_mode():
        prompt_emb = prompt_embeddings(
            lambda texts: model.encode_reports(texts).float().numpy(), plan.prompts)
    test = plan.splits["test"]
    data = embed(test, {"ecg_emb": ("encode_ecg", "ecg")})
    data = drop_rejected(data, accounting.setdefault("test", {}))
    _require_rows(data, "test")
    y = _labels(test, data["record_id"])
    result = evaluate_zero_shot(data["ecg_emb"], prompt_emb, y, plan.class_names,
                                n_bootstrap=args.bootstrap, seed=args.seed)
    result["prompts"] = dict(zip(plan.class_names, plan.prompts))
    return _write_classification(plan, result, y, result.pop("scores"), accounting)


def run_linear(plan: Plan, model_fn, embed: Embed, args, accounting) -> dict[str, Any]:
    from melp_ray.eval.linear_probe import ProbeConfig, train_linear_probe

    # One inference pass over all three splits (one actor pool start), split afterwards.
    everything = [r for split in ("train", "val", "test") for r in plan.splits[split]]
    data = embed(everything, {"ecg_feat": ("ecg_features", "ecg")})
    row_of = {rid: i for i, rid in enumerate(data["record_id"])}
    features, labels = {}, {}
    for split in ("train", "val", "test"):
        records = plan.splits[split]
        rows = np.array([row_of[r.record_id] for r in records])
        part = drop_rejected({k: v[rows] for k, v in data.items()},
                               accounting.setdefault(split, {}))
        _require_rows(part, split)
        features[split], labels[split] = part["ecg_feat"], _labels(records, part["record_id"])
    probe = train_linear_probe(features["train"], labels["train"], features["val"],
                               labels["val"], features["test"], labels["test"],
                               class_names=plan.class_names, fraction=args.fraction or 1.0,
                               config=ProbeConfig(seed=args.seed), n_bootstrap=args.bootstrap)
    return _write_classification(plan, probe.to_dict(), labels["test"], probe.test_scores,
                                 accounting)


def run_retrieval(plan: Plan, model_fn, embed: Embed, args, accounting) -> dict[str, Any]:
    from melp_ray.eval.metrics import recall_at_k
    from melp_ray.eval_plan.report import write_retrieval_report

    outputs = {"ecg_emb": ("encode_ecg", "ecg"), "text_emb": ("encode_reports", "report")}
    data = embed(plan.splits["test"], outputs)
    data = drop_rejected(data, accounting.setdefault("test", {}))
    _require_rows(data, "test")
    reports = {r.record_id: r.report for r in plan.splits["test"]}
    sim = report_similarity(data["ecg_emb"], [reports[str(i)] for i in data["record_id"]],
                            data["text_emb"])
    recalls = recall_at_k(sim, ks=(1, 5, 10))
    write_retrieval_report(plan.out, recalls, plan.settings, task=f"{plan.dataset} retrieval")
    return _finish(plan, {**recalls, "n_pairs": int(len(data["record_id"]))}, accounting)


def run_generation(plan: Plan, model_fn, embed: Embed, args, accounting) -> dict[str, Any]:
    """Greedy reports (``MELP.generate``, at most --max-new-tokens tokens) for the test
    records, scored against their reports; every pair goes to OUT/generations.jsonl."""
    from melp_ray.eval.generation import generation_metrics
    from melp_ray.eval_plan.report import write_generation_report

    outputs = {"generated": ("generate", "ecg", {"max_new_tokens": args.max_new_tokens})}
    data = embed(plan.splits["test"], outputs)
    data = drop_rejected(data, accounting.setdefault("test", {}))
    _require_rows(data, "test")
    reports = {r.record_id: r.report for r in plan.splits["test"]}
    ids = [str(i) for i in data["record_id"]]
    generated = [str(t) for t in data["generated"]]
    references = [reports[i] for i in ids]
    metrics = generation_metrics(generated, references)
    write_generation_report(plan.out, metrics, ids, generated, references, plan.settings)
    return _finish(plan, {}, accounting)


def report_similarity(ecg_emb: np.ndarray, texts: list[str], text_emb: np.ndarray
                      ) -> np.ndarray:
    """(N, N) cosine of ECG i and report j, identical reports giving identical columns.

    PTB-XL repeats reports verbatim ("sinus rhythm. normal ecg."), so a query often has
    several equally right candidates, and recall_at_k counts such exact ties against the
    query. A tie must stay exact: each distinct text is scored once (its first row's
    embedding) and the column copied, because the same text encoded in another batch, or
    the same dot product at another position of a matrix product, can differ in the last
    bits and turn the tie into a coin flip. Float64: the similarities of a weak model
    differ in the 4th digit, and float32 rounding would reorder near-ties.
    """
    first: dict[str, int] = {}
    rows = [first.setdefault(text, row) for row, text in enumerate(texts)]
    distinct = sorted(first.values())
    column_of = {row: col for col, row in enumerate(distinct)}
    # Both sides are L2-normalised by the model, so the dot product is the cosine.
    sim = ecg_emb.astype(np.float64) @ text_emb[distinct].astype(np.float64).T
    return sim[:, [column_of[row] for row in rows]]


def _require_rows(data: dict[str, np.ndarray], split: str) -> None:
    if len(data["record_id"]) == 0:
        raise RuntimeError(f"every record of the {split} split was rejected; see the "
                           "rejection reasons above")


def _write_classification(plan: Plan, result: dict, y, scores, accounting) -> dict[str, Any]:
    from melp_ray.eval_plan.report import write_classification_report

    name = f"{plan.dataset} {plan.task or ''} {plan.mode}".replace("  ", " ")
    write_classification_report(plan.out, name, result, y, scores, plan.class_names,
                                plan.settings)
    return _finish(plan, {}, accounting)


def _finish(plan: Plan, extra: dict[str, Any], accounting: dict) -> dict[str, Any]:
    """Add record accounting (and ``extra``) to results.json and results.md."""
    from melp_ray.eval_plan.report import RESULTS_JSON, RESULTS_MD

    records = {"excluded_before_loading": plan.excluded}
    for split, acc in accounting.items():
        records[split] = {"used": plan.settings["n_records"][split]
                          - sum(len(v) for v in acc.get("rejected", {}).values()),
                          "rejected": acc.get("rejected", {}),
                          "rejected_detail": acc.get("rejected_detail", {})}
    path = plan.out / RESULTS_JSON
    results = json.loads(path.read_text())
    results.update(extra)
    results["records"] = records
    path.write_text(json.dumps(results, indent=2) + "\n")

    lines = ["", "## Records", "", "| split | used | rejected |", "|---|---|---|"]
    for split in plan.splits:
        rejected = records[split]["rejected"]
        reasons = ", ".join(f"{len(ids)} {reason}" for reason, ids in rejected.items())
        lines.append(f"| {split} | {records[split]['used']} | "
                     f"{sum(len(v) for v in rejected.values())}"
                     f"{f' ({reasons})' if reasons else ''} |")
    if plan.excluded:
        lines += ["", "Left out before loading: " + ", ".join(
            f"{len(ids)} {reason}" for reason, ids in plan.excluded.items())]
    with open(plan.out / RESULTS_MD, "a") as f:
        f.write("\n".join(lines) + "\n")
    return results
