"""--mode generation without Ray: the plan's checks, the inference actor's text column, and
run_generation over the bundled PTB-XL sample with an untrained tiny MELP, in-process."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from melp_ray.eval.records import load_batch
from melp_ray.eval.generation import generation_metrics
from melp_ray.eval.inference import EmbeddingExtractor
from melp_ray.eval_plan.plan import EvalError, build_plan


def tiny_melp():
    from melp_ray.model import MELP, model_config_from_preset

    torch.manual_seed(0)
    return MELP(model_config_from_preset("tiny")).eval()


def test_plan_for_generation(plan_args):
    plan = build_plan(plan_args("--mode", "generation", "--test-folds", "6"))
    assert plan.task is None and plan.class_names == []
    assert all(r.report.strip() for r in plan.splits["test"])
    assert plan.settings["max_new_tokens"] == 64
    plan = build_plan(plan_args("--mode", "generation", "--test-folds", "6",
                                "--max-new-tokens", "8"))
    assert plan.settings["max_new_tokens"] == 8
    for options, message in (
            (["--mode", "zeroshot", "--max-new-tokens", "8"], "only applies to --mode generation"),
            (["--mode", "generation", "--task", "super"], "--task has no effect on --mode generation"),
            (["--mode", "generation", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1")):
        with pytest.raises(EvalError, match=message):
            build_plan(plan_args(*options))


def test_extractor_returns_the_generated_texts():
    ecg = np.random.default_rng(0).random((2, 12, 1000)).astype(np.float32)
    extractor = EmbeddingExtractor(
        tiny_melp, outputs={"generated": ("generate", "ecg", {"max_new_tokens": 3})})
    out = extractor({"record_id": np.array(["a", "b"]), "ecg": ecg})
    assert out["generated"].dtype == object
    with torch.inference_mode():
        expected = tiny_melp().generate(torch.from_numpy(ecg), max_new_tokens=3)
    assert out["generated"].tolist() == expected


def _in_process_embed(plan, records, outputs):
    """embed_records' work without Ray: load_batch, then the actor's call, record_id order."""
    batch = {"record_id": np.array([r.record_id for r in records]),
             "path": np.array([r.path for r in records], dtype=object)}
    loaded = load_batch(batch, plan.dataset, plan.sample_rate, plan.seconds)
    out = EmbeddingExtractor(tiny_melp, outputs=outputs)(loaded)
    order = np.argsort(out["record_id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def test_run_generation_scores_every_test_report(plan_args, tmp_path):
    from melp_ray.eval_plan.modes import run_generation

    args = plan_args("--mode", "generation", "--test-folds", "6", "--max-new-tokens", "4")
    plan = build_plan(args)
    results = run_generation(plan, tiny_melp, functools.partial(_in_process_embed, plan), args, {})
    lines = [json.loads(x) for x in (plan.out / "generations.jsonl").read_text().splitlines()]
    reports = {r.record_id: r.report for r in plan.splits["test"]}
    assert sorted(x["record_id"] for x in lines) == sorted(reports)
    assert all(x["reference"] == reports[x["record_id"]] for x in lines)
    assert all(len(x["generated"].split()) <= 4 for x in lines)
    expected = generation_metrics([x["generated"] for x in lines],
                                  [x["reference"] for x in lines])
    for key in ("bleu1", "bleu4", "rouge_l", "meteor", "n_pairs"):
        assert results[key] == pytest.approx(expected[key])
    assert results["records"]["test"]["used"] == len(lines)
    assert "rouge_l" in (plan.out / "results.md").read_text()


def test_generated_texts_come_back_through_ray_data(ray_local, plan_args):
    """The real embed_records (Ray Data read + actor pool): one string per record, the same
    as generating in-process with the same seeded model."""
    import sys

    from ray import cloudpickle

    from melp_ray.eval.embeddings import embed_records

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tiny_melp for the actors
    plan = build_plan(plan_args("--mode", "generation", "--test-folds", "6"))
    records = plan.splits["test"][:6]
    outputs = {"generated": ("generate", "ecg", {"max_new_tokens": 3})}
    data = embed_records(plan, records, outputs, model_fn=tiny_melp, batch_size=4, actors=1)
    expected = _in_process_embed(plan, records, outputs)
    assert data["record_id"].tolist() == expected["record_id"].tolist()
    assert [str(t) for t in data["generated"]] == expected["generated"].tolist()
