"""python -m melp_ray.evaluate end to end, from a real tiny pretraining checkpoint.

One real Ray Train + DeepSpeed pretraining run on the bundled PTB-XL sample (100 Hz,
folds 1-6) makes the checkpoint; every mode then runs through ``main`` on the shared
2-CPU Ray instance and its results.json is checked against values recomputed here,
in-process, with the model and the data readers directly (no Ray).

Metric correctness on constructed inputs (perfect scorer = 1.0, reversed = 0.0, recall@k
vs brute force with ties) is tested in tests/eval/test_eval_metrics.py and not repeated;
the library behind the command line in tests/eval/test_eval_plan.py (folds, Chapman
classes, the checks of build_plan), test_eval_embeddings.py (--random-init weights) and
test_eval_modes.py (report ties). The checkpoint and the Challenge-format root are
session fixtures in tests/conftest.py, shared with those tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tracking_fixture import read_tensorboard_scalars, wandb_offline_runs

from melp_ray import evaluate
from melp_ray.data.ptbxl import SUPERCLASSES, list_ptbxl
from melp_ray.text.prompts import PTBXL_SUPERCLASS_PROMPTS
from melp_ray.data.records import load_signal
from melp_ray.data.records import minmax_normalise

# The bundled sample has folds 1-6 only: probe on 1-4, stop on 5, score on 6.
LINEAR_FOLDS = ["--train-folds", "1-4", "--val-folds", "5", "--test-folds", "6"]
TEST_FOLD = 6


def _evaluate(checkpoint, root, out: Path, *options: str) -> dict:
    argv = ["--checkpoint", str(checkpoint), "--root", str(root), "--out", str(out),
            "--bootstrap", "200", *options]
    if "--actors" not in options:   # the model in this process: no actor start-up per test
        argv += ["--actors", "0"]
    if "--dataset" not in options:
        argv += ["--dataset", "ptb-xl"]
    assert evaluate.main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def direct_test_embeddings(tiny_checkpoint, bundled_ptbxl):
    """Test-fold embeddings computed in-process, without Ray: the reference side."""
    from melp_ray.hub.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    refs = [r for r in list_ptbxl(bundled_ptbxl, sample_rate=100) if r.strat_fold == TEST_FOLD]
    ecg = np.stack([minmax_normalise(load_signal(r, bundled_ptbxl, 100, 10)) for r in refs])
    # One batch of all test records, like the CLI's single inference batch (bit-equal:
    # a different batch size changes the last float bits).
    reports = [r.report for r in refs]
    with torch.inference_mode():
        ecg_emb = model.encode_ecg(torch.from_numpy(ecg)).numpy().astype(np.float64)
        text_emb = model.encode_reports(reports).numpy().astype(np.float64)
    text_by_report = {}
    for report, emb in zip(reports, text_emb):
        text_by_report.setdefault(report, emb)   # a repeated report is one candidate text
    return {"refs": refs, "model": model, "ecg_emb": ecg_emb, "text_by_report": text_by_report}


def _assert_classification_files(out: Path, results: dict) -> None:
    for name in ("results.json", "results.md", "roc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert 0.0 <= results["macro_auroc"] <= 1.0
    low, high = results["ci"]
    assert low <= results["macro_auroc"] <= high
    assert "## Records" in (out / "results.md").read_text()


# ---------------------------------------------------------------- zero-shot

@pytest.fixture(scope="module")
def zeroshot_reference(direct_test_embeddings, bundled_ptbxl):
    """Superclass zero-shot AUROC on the test fold, computed without Ray."""
    from melp_ray.eval.metrics import macro_auroc
    from melp_ray.text.prompts import ptbxl_prompts
    from melp_ray.eval.zero_shot import prompt_embeddings, zero_shot_scores

    refs, model = direct_test_embeddings["refs"], direct_test_embeddings["model"]
    keep = [i for i, r in enumerate(refs) if r.labels["super"]]
    y = np.array([[float(c in refs[i].labels["super"]) for c in SUPERCLASSES] for i in keep])
    with torch.inference_mode():
        prompts = prompt_embeddings(lambda t: model.encode_reports(t).numpy(),
                                    ptbxl_prompts(SUPERCLASSES,
                                                  bundled_ptbxl / "scp_statements.csv"))
    scores = zero_shot_scores(direct_test_embeddings["ecg_emb"][keep], prompts)
    macro, per_class = macro_auroc(y, scores, SUPERCLASSES)
    return {"macro_auroc": macro, "per_class": per_class, "n_labelled": len(keep)}


def test_zeroshot_end_to_end_matches_in_process_scores(tiny_checkpoint, bundled_ptbxl,
                                                       direct_test_embeddings,
                                                       zeroshot_reference, tmp_path):
    # The one test of the whole command through the inference actor pool (the others run
    # the model in this process, --actors 0; tests/eval/test_eval_inference.py checks both
    # give the same embeddings).
    results = _evaluate(tiny_checkpoint, bundled_ptbxl, tmp_path, "--mode", "zeroshot",
                        "--task", "super", "--test-folds", str(TEST_FOLD), "--actors", "1")
    _assert_classification_files(tmp_path, results)
    assert results["class_names"] == SUPERCLASSES
    assert results["settings"]["sample_rate"] == 100 and results["settings"]["seconds"] == 10
    assert results["settings"]["checkpoint_kind"] == "training checkpoint"
    assert results["prompts"]["MI"] == PTBXL_SUPERCLASS_PROMPTS["MI"]

    # Every test-fold record is accounted for: used, rejected while loading (none: the
    # bundled records are readable), or left out before loading for having no superclass.
    records = results["records"]
    no_label = records["excluded_before_loading"].get("no_label", [])
    assert records["test"]["rejected"] == {}
    assert records["test"]["used"] == results["n_samples"] == zeroshot_reference["n_labelled"]
    assert records["test"]["used"] + len(no_label) == len(direct_test_embeddings["refs"])

    # The same numbers recomputed without Ray from the model and the default prompts.
    assert results["macro_auroc"] == pytest.approx(zeroshot_reference["macro_auroc"], abs=1e-6)
    assert results["per_class"] == pytest.approx(zeroshot_reference["per_class"], abs=1e-6)


def test_exported_folder_gives_the_same_zeroshot_result(tiny_checkpoint, bundled_ptbxl,
                                                        zeroshot_reference, tmp_path):
    from melp_ray.hub.export import export

    export(tiny_checkpoint, str(tmp_path / "hf"))
    results = _evaluate(tmp_path / "hf", bundled_ptbxl, tmp_path / "out", "--mode", "zeroshot",
                        "--test-folds", str(TEST_FOLD))
    assert results["settings"]["checkpoint_kind"] == "exported folder"
    assert results["settings"]["sample_rate"] == 100  # read from the export's config.json
    assert results["macro_auroc"] == pytest.approx(zeroshot_reference["macro_auroc"], abs=1e-6)


@pytest.fixture(scope="module")
def bundled_shards(ray_local, bundled_ptbxl, tmp_path_factory) -> Path:
    """The whole bundled sample prepared into shards (float32: bit-equal to the records)."""
    from melp_ray.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("eval_shards") / "shards"
    assert prepare_main(["--dataset", "ptb-xl", "--root", str(bundled_ptbxl), "--out", str(out),
                         "--sample-rate", "100", "--shard-size", "64",
                         "--ecg-encoding", "float32"]) == 0
    return out


def test_zeroshot_on_prepared_shards_equals_the_wfdb_records(tiny_checkpoint, bundled_shards,
                                                             zeroshot_reference, tmp_path):
    """--dataset shards: the test fold read back from the shards (folds and labels from
    their columns, prompts from PTB-XL's statements) scores what the WFDB records score."""
    results = _evaluate(tiny_checkpoint, bundled_shards, tmp_path, "--dataset", "shards",
                        "--mode", "zeroshot", "--test-folds", str(TEST_FOLD))
    assert results["class_names"] == SUPERCLASSES
    assert results["settings"]["shards"] == {"source_dataset": "ptb-xl", "sample_rate": 100,
                                             "ecg_encoding": "float32"}
    assert results["records"]["test"]["used"] == zeroshot_reference["n_labelled"]
    assert results["macro_auroc"] == pytest.approx(zeroshot_reference["macro_auroc"], abs=1e-6)
    assert results["per_class"] == pytest.approx(zeroshot_reference["per_class"], abs=1e-6)


# ---------------------------------------------------------------- linear probe

LINEAR = ("--mode", "linear", "--task", "super", *LINEAR_FOLDS)
RETRIEVAL = ("--mode", "retrieval", "--test-folds", str(TEST_FOLD))


@pytest.fixture(scope="module")
def linear_run(tiny_checkpoint, bundled_ptbxl, tmp_path_factory) -> tuple[Path, dict]:
    """One real --mode linear run, checked here and as the own-pass side of the shared
    embedding table test below."""
    out = tmp_path_factory.mktemp("linear")
    return out, _evaluate(tiny_checkpoint, bundled_ptbxl, out, *LINEAR)


@pytest.fixture(scope="module")
def retrieval_run(tiny_checkpoint, bundled_ptbxl, tmp_path_factory) -> tuple[Path, dict]:
    """One real --mode retrieval run, shared like ``linear_run``."""
    out = tmp_path_factory.mktemp("retrieval")
    return out, _evaluate(tiny_checkpoint, bundled_ptbxl, out, *RETRIEVAL)


def test_linear_probe_beats_chance(linear_run):
    out, results = linear_run
    _assert_classification_files(out, results)
    assert results["macro_auroc"] > 0.5
    assert results["settings"]["folds"] == {"train": [1, 2, 3, 4], "val": [5], "test": [6]}
    assert results["n_train"] == results["records"]["train"]["used"]  # fraction 1.0
    assert results["fraction"] == 1.0


def test_random_init_baseline_runs_and_reports(tiny_checkpoint, bundled_ptbxl, tmp_path):
    results = _evaluate(tiny_checkpoint, bundled_ptbxl, tmp_path, "--mode", "linear",
                        "--random-init", "--fraction", "0.1", *LINEAR_FOLDS)
    _assert_classification_files(tmp_path, results)
    assert results["settings"]["random_init"] is True
    n_train = results["records"]["train"]["used"]
    # Seeded 10% subsample; may exceed ceil(0.1 n) by one positive per class (linear_probe.py).
    assert int(np.ceil(0.1 * n_train)) <= results["n_train"] <= int(np.ceil(0.1 * n_train)) + 5
    assert "random_init" in (tmp_path / "results.md").read_text()


# ---------------------------------------------------------------- retrieval

def _brute_force_recall(ecg_emb, text_emb, reports, k: int) -> float:
    """Recall@k by counting, pair by pair (mean of both directions; ties count against).

    Identical reports are one candidate text: they are scored with one vector
    (``text_emb`` is per distinct report), so their similarities tie exactly.
    """
    n = len(reports)
    sim = [[float(np.dot(ecg_emb[i], text_emb[reports[j]])) for j in range(n)]
           for i in range(n)]
    hits = []
    for i in range(n):
        ahead = sum(1 for j in range(n) if j != i and sim[i][j] >= sim[i][i])
        hits.append(ahead < k)      # ECG i -> its report
        ahead = sum(1 for j in range(n) if j != i and sim[j][i] >= sim[i][i])
        hits.append(ahead < k)      # report i -> its ECG
    return float(np.mean(hits))


def test_retrieval_recall_matches_brute_force_reference(retrieval_run, direct_test_embeddings):
    out, results = retrieval_run
    assert (out / "results.md").is_file()
    refs = [r for r in direct_test_embeddings["refs"] if r.report.strip()]
    assert results["n_pairs"] == len(refs)
    keep = [i for i, r in enumerate(direct_test_embeddings["refs"]) if r.report.strip()]
    ecg_emb = direct_test_embeddings["ecg_emb"][keep]
    text_emb = direct_test_embeddings["text_by_report"]
    for k in (1, 5, 10):
        expected = _brute_force_recall(ecg_emb, text_emb, [r.report for r in refs], k)
        assert results[f"recall@{k}"] == pytest.approx(expected, abs=1e-9), k
    assert results["recall@1"] <= results["recall@5"] <= results["recall@10"]


def test_generation_end_to_end_matches_in_process_generate(tiny_checkpoint, bundled_ptbxl,
                                                         tmp_path):
    from melp_ray.hub.checkpoint import load_model
    from melp_ray.eval.generation import generation_metrics

    results = _evaluate(tiny_checkpoint, bundled_ptbxl, tmp_path, "--mode", "generation",
                        "--test-folds", str(TEST_FOLD), "--max-new-tokens", "8")
    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    refs = {r.record_id: r for r in list_ptbxl(bundled_ptbxl, sample_rate=100)
            if r.strat_fold == TEST_FOLD and r.report.strip()}
    assert sorted(x["record_id"] for x in lines) == sorted(refs)
    ids = [x["record_id"] for x in lines]
    ecg = np.stack([minmax_normalise(load_signal(refs[i], bundled_ptbxl, 100, 10)) for i in ids])
    with torch.inference_mode():
        expected = load_model(tiny_checkpoint).eval().generate(torch.from_numpy(ecg),
                                                               max_new_tokens=8)
    assert [x["generated"] for x in lines] == expected
    assert [x["reference"] for x in lines] == [refs[i].report for i in ids]
    metrics = generation_metrics(expected, [refs[i].report for i in ids])
    for key in ("bleu1", "bleu4", "rouge_l", "n_pairs"):
        assert results[key] == pytest.approx(metrics[key])
    assert results["settings"]["max_new_tokens"] == 8


def test_split_dir_zeroshot_scores_every_listed_record(tiny_checkpoint, bundled_ptbxl,
                                                              tmp_path):
    """A reference-layout split file over the bundled sample: every listed record that
    exists is scored (records from folds 1-6 together, no fold options), the missing one
    named. That the labels are the file's is checked on the plan (tests/eval/test_eval_splits.py)."""
    import csv

    from melp_ray.data.ptbxl import read_database

    classes = ["HYP", "NORM", "MI", "CD", "STTC"]
    rows = read_database(bundled_ptbxl).head(50).to_dict("records")
    labels = np.random.default_rng(1).integers(0, 2, (len(rows), len(classes)))
    folder = tmp_path / "split"
    folder.mkdir()
    with open(folder / "ptbxl_super_class_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ecg_id", "patient_id", "strat_fold", "filename_lr", "filename_hr",
                         "super_class", *classes])
        for row, y in zip(rows, labels):
            writer.writerow([row["ecg_id"], row["patient_id"], row["strat_fold"],
                             row["filename_lr"], row["filename_hr"], "[]", *y.tolist()])
        writer.writerow([99999, 1, 10, "records100/99000/99999_lr", "x", "[]", 1, 0, 0, 0, 0])
    results = _evaluate(tiny_checkpoint, bundled_ptbxl, tmp_path / "out", "--mode", "zeroshot",
                        "--split-dir", str(folder))
    assert results["class_names"] == classes
    assert results["n_samples"] == len(rows) == results["records"]["test"]["used"]
    assert results["records"]["excluded_before_loading"] == {"missing_file": ["99999"]}
    assert results["settings"]["split_files"]["test"].endswith("ptbxl_super_class_test.csv")
    assert sorted(results["per_class"]) == sorted(classes)


# ---------------------------------------------------------------- CPSC2018

def test_cpsc2018_zeroshot_names_rejected_records(tiny_checkpoint, challenge_root, tmp_path,
                                                  monkeypatch):
    from melp_ray.data.physionet_labels import CPSC2018_CLASSES

    monkeypatch.setenv("WANDB_MODE", "offline")   # W&B without a server or key
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = _evaluate(tiny_checkpoint, challenge_root, tmp_path, "--dataset", "cpsc2018",
                        "--mode", "zeroshot", "--test-folds", "1-10",
                        "--tensorboard", "--wandb", "--wandb-group", "eval-test")
    _assert_classification_files(tmp_path, results)
    assert results["class_names"] == list(CPSC2018_CLASSES)
    test = results["records"]["test"]
    assert test["rejected"] == {"wrong_length": ["SHORT"], "flat_signal": ["ZERO"]}
    assert test["rejected_detail"]["SHORT"].startswith("wrong_length: 500 samples at 100 Hz")
    assert results["n_samples"] == test["used"]
    no_label = results["records"]["excluded_before_loading"].get("no_label", [])
    assert test["used"] + 2 + len(no_label) == 62
    assert "wrong_length" in (tmp_path / "results.md").read_text()
    _assert_results_tracked(tmp_path, results)


def _assert_results_tracked(out: Path, results: dict) -> None:
    """--tensorboard / --wandb: results.json's numbers at the checkpoint's step (the tiny
    run's 30), the per-class AUROC as a W&B table, the settings as the W&B config."""
    expected = {"macro_auroc": results["macro_auroc"], "ci/low": results["ci"][0],
                "ci/high": results["ci"][1], "n_samples": results["n_samples"],
                **{f"per_class/{c}": v for c, v in results["per_class"].items()
                   if isinstance(v, float) and np.isfinite(v)}}
    assert any(key.startswith("per_class/") for key in expected)
    scalars = read_tensorboard_scalars(out / "tensorboard")
    assert set(scalars) - {"results/text_summary"} == set(expected)
    for key, value in expected.items():
        assert scalars[key] == [(30, pytest.approx(value, abs=1e-6))]   # float32 in the file

    (run,) = wandb_offline_runs(out / "wandb")
    assert run["job_type"] == "evaluate" and run["group"] == "eval-test"
    assert {k: run["config"][k] for k in ("mode", "dataset")} == {"mode": "zeroshot",
                                                                  "dataset": "cpsc2018"}
    (logged,) = run["history"]
    assert logged["_step"] == 30
    assert {k: v for k, v in logged.items() if not k.startswith(("_", "results/"))} == expected
    table = json.loads(next((out / "wandb").glob(
        "offline-run-*/files/" + logged["results/path"])).read_text())
    assert table["columns"] == ["class", "auroc"]
    assert {c: v for c, v in table["data"]} == results["per_class"]


def test_cpsc2018_crop_keeps_the_five_second_record(tiny_checkpoint, challenge_root, tmp_path):
    results = _evaluate(tiny_checkpoint, challenge_root, tmp_path, "--dataset", "cpsc2018",
                        "--mode", "zeroshot", "--test-folds", "1-10", "--crop-seconds", "5")
    test = results["records"]["test"]
    assert test["rejected"] == {"flat_signal": ["ZERO"]}   # SHORT (5 s) is now used
    assert results["settings"]["crop_seconds"] == 5
    no_label = results["records"]["excluded_before_loading"].get("no_label", [])
    assert test["used"] + 1 + len(no_label) == 62


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("options, message", [
    (["--mode", "zeroshot", "--root", "/no/such/root"], "--root /no/such/root is not"),
    (["--mode", "zeroshot", "--fraction", "0.1"], "--fraction only applies to --mode linear"),
    (["--mode", "zeroshot", "--train-folds", "1-4"], "--train-folds only applies"),
    (["--mode", "linear", "--prompts", "p.yaml"], "--prompts only applies to --mode zeroshot"),
    (["--mode", "retrieval", "--task", "super"], "--task has no effect"),
    (["--mode", "retrieval", "--dataset", "cpsc2018"], "needs free-text reports"),
    (["--mode", "linear", "--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--mode", "zeroshot", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_option_combinations_fail_before_any_work(bundled_ptbxl, tmp_path, capsys,
                                                      options, message):
    argv = ["--checkpoint", str(tmp_path / "no_checkpoint"), "--out", str(tmp_path / "o")]
    if "--root" not in options:
        argv += ["--root", str(bundled_ptbxl)]
    if "--dataset" not in options:
        argv += ["--dataset", "ptb-xl"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv + options)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- one inference pass, many modes

def test_modes_score_the_same_from_one_shared_embedding_table(tiny_checkpoint, bundled_ptbxl,
                                                              linear_run, retrieval_run,
                                                              tmp_path):
    """An EmbeddingTable computed once (what bench/learning.py does for probe, zero-shot and
    retrieval) gives every mode the results of its own inference pass (the module's real
    linear and retrieval runs)."""
    import functools

    from melp_ray.eval.embeddings import EmbeddingTable, build_model
    from melp_ray.eval_plan.modes import evaluate as run_mode
    from melp_ray.eval_plan.plan import build_plan

    def args_for(out, *options):
        return evaluate.make_parser().parse_args([
            "--checkpoint", str(tiny_checkpoint), "--root", str(bundled_ptbxl), "--dataset",
            "ptb-xl", "--out", str(out), "--bootstrap", "50", "--actors", "0", *options])

    plans = [build_plan(args_for(tmp_path / "plan" / m[1], *m)) for m in (LINEAR, RETRIEVAL)]
    records = [r for plan in plans for split in plan.splits.values() for r in split]
    outputs = {"ecg_feat": ("ecg_features", "ecg"), "ecg_emb": ("encode_ecg", "ecg"),
               "text_emb": ("encode_reports", "report")}
    model_fn = functools.partial(build_model, plans[0].checkpoint, False, 0)
    table = EmbeddingTable.compute(plans[0], records, outputs, model_fn, 64, 0)
    assert len(table.data["record_id"]) == len({r.record_id for r in records})

    # The point estimates and record counts do not depend on --bootstrap (200 in the runs).
    for options, (_, own) in ((LINEAR, linear_run), (RETRIEVAL, retrieval_run)):
        out = tmp_path / "shared" / options[1]
        run_mode(args_for(out, *options), embed=table)
        shared = json.loads((out / "results.json").read_text())   # as the runs' own file
        keys = ("macro_auroc", "per_class") if options is LINEAR else \
            ("recall@1", "recall@5", "recall@10", "n_pairs")
        for key in keys:
            assert shared[key] == pytest.approx(own[key], abs=1e-6), (options[1], key)
        assert shared["records"] == own["records"]
