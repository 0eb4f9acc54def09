"""python -m melp_ray.benchmark: one real benchmark run of the tiny checkpoint on the bundled
PTB-XL sample and a CODE-15% fixture (shared by the assertions through a module fixture),
and the suite checks that fail before Ray starts."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tracking_fixture import read_tensorboard_scalars, wandb_offline_runs

from melp_ray import benchmark
from melp_ray.eval_plan.bench_report import column_label

REPO = Path(__file__).resolve().parents[1]
# The bundled sample has folds 1-6: probe on 1-4, stop on 5, score on 6.
FOLDS = {"train": "1-4", "val": "5", "test": "6"}
TASKS = ["super", "rhythm"]
FRACTIONS = [0.1, 1.0]


def _suite(tmp_path: Path, **datasets) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"bootstrap": 50, "fractions": FRACTIONS, "seeds": [0],
                                    "datasets": datasets}))
    return path


def _ptbxl(**extra) -> dict:
    return {"root": None, "tasks": TASKS, "folds": FOLDS, **extra}


# ---------------------------------------------------------------- checks before Ray

@pytest.mark.parametrize("datasets, message", [
    ({"ptb-xl": _ptbxl(taks=["super"])}, r"datasets.ptb-xl: unknown keys \['taks'\]"),
    ({"mimic": {"root": "/x"}}, "datasets.mimic: unknown dataset"),
    ({"ptb-xl": _ptbxl(tasks=["superclass"])}, r"tasks: \['superclass'\] not in"),
    ({"ptb-xl": _ptbxl(fractions=[0, 0.5])}, r"fraction must be a number in \(0, 1\]"),
    ({"cpsc2018": {"tasks": ["super"], "root": "/x"}}, "'tasks' selects PTB-XL label sets"),
    ({"ptb-xl": _ptbxl(folds={"test": "9-10"})}, "--test-folds 9,10: no record"),
])
def test_bad_suites_exit_2_with_the_reason(config_only_export, tmp_path, capsys, datasets,
                                           message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--checkpoint", str(config_only_export), "--suite",
                        str(_suite(tmp_path, **datasets)), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_bucket_out_is_refused_not_taken_for_a_local_path(config_only_export, tmp_path,
                                                             capsys, monkeypatch):
    """The tables are written with local paths: an s3:// --out exits 2 naming it and
    creates nothing (it once would have become a local folder named ``s3:``)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--checkpoint", str(config_only_export), "--suite",
                        str(_suite(tmp_path, **{"ptb-xl": _ptbxl()})), "--out", "s3://bucket/bench"])
    assert exit_info.value.code == 2
    assert "--out s3://bucket/bench: this command writes a local folder" in capsys.readouterr().err
    assert os.listdir(cwd) == []


@pytest.mark.slow   # a subprocess: ~30 s of imports on a busy 2-CPU machine
def test_missing_checkpoint_exits_2_before_ray_starts(tmp_path):
    """In a fresh process whose RAY_ADDRESS answers nothing: reaching Ray would fail with
    Ray's address error, not the checkpoint's."""
    suite = _suite(tmp_path, **{"ptb-xl": _ptbxl()})
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "melp_ray.benchmark", "--checkpoint",
                           str(tmp_path / "nope"), "--suite", str(suite), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--checkpoint" in done.stderr and "does not exist" in done.stderr
    assert "127.0.0.1:1" not in done.stderr


def test_shipped_suite_plans_every_task_on_the_bundled_sample(config_only_export, tmp_path):
    from melp_ray.eval_plan.benchmark import expand_runs, plan_benchmark
    from melp_ray.data.sources import bundled_root

    bench = plan_benchmark(str(config_only_export), benchmark.DEFAULT_SUITE, tmp_path)
    assert bench.skipped == []
    assert bench.suite.datasets[0].root == bundled_root()
    plans = bench.plans["ptb-xl"]
    assert sorted((p.task, p.mode) for p in plans) == sorted(
        (t, m) for t in ("super", "sub", "form", "rhythm") for m in ("zeroshot", "linear"))
    assert len(expand_runs(bench, "ptb-xl", "random_init")) == 4 + 4 * 3


# ---------------------------------------------------------------- one real benchmark run

@pytest.fixture(scope="module")
def bench_run(tiny_checkpoint, code15_root, tmp_path_factory):
    from melp_ray.eval_plan.benchmark import plan_benchmark

    tmp = tmp_path_factory.mktemp("bench")
    missing = tmp / "no-cpsc2018"
    code = {"root": str(code15_root["root"]), "modes": ["zeroshot"], "folds": {"test": "1-10"}}
    suite = _suite(tmp, **{"ptb-xl": _ptbxl(), "cpsc2018": {"root": str(missing)},
                           "code-15": code})
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as env:   # W&B without a server or key
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        assert benchmark.main(["--checkpoint", tiny_checkpoint, "--suite", str(suite),
                               "--out", str(out), "--actors", "0", "--tensorboard", "--wandb",
                               "--wandb-group", "bench-test"]) == 0
    plan = plan_benchmark(tiny_checkpoint, str(suite), out)   # what the run embedded
    return {"out": out, "missing": missing, "plan": plan,
            "results": json.loads((out / "results.json").read_text())}


def test_table_has_every_row_and_column_with_the_random_baseline(bench_run):
    table = (bench_run["out"] / "table.md").read_text()
    zeroshot, linear = table.split("## Zero-shot")[1].split("## Linear probe")
    for part, columns in (
            (zeroshot, [column_label("ptb-xl", t) for t in TASKS]
             + ["CPSC2018", "CODE-15%", "mean"]),
            (linear, [column_label("ptb-xl", t, f) for t in TASKS for f in FRACTIONS]
             + [column_label("cpsc2018", None, f) for f in FRACTIONS]
             + ["mean 10%", "mean 100%"])):
        body = part.split("\n\n")[1]            # the table right under the heading
        lines = body.splitlines()
        assert lines[0] == "| " + " | ".join(["model", *columns]) + " |"
        rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines[2:]}
        assert set(rows) == {"MELP (this checkpoint)", "random init"}
        for cells in rows.values():
            assert len(cells) == len(columns)
            scored = [c for c, name in zip(cells, columns) if "CPSC2018" not in name]
            assert all(c.strip(" |")[0].isdigit() for c in scored), cells
            assert all(c.strip(" |") == "skipped" for c, name in zip(cells, columns)
                       if "CPSC2018" in name)

    with open(bench_run["out"] / "table.csv") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 2 * (len(TASKS) + 2) + 2 * (len(TASKS) + 1) * len(FRACTIONS)
    ok = [c for c in cells if c["status"] == "ok"]
    assert {c["model"] for c in ok} == {"pretrained", "random_init"}
    for c in ok:
        assert float(c["ci_low"]) <= float(c["macro_auroc"]) <= float(c["ci_high"])


def test_results_have_cis_record_counts_and_roc_plots(bench_run):
    results = bench_run["results"]
    runs = results["runs"]
    assert len(runs) == 2 * (len(TASKS) + len(TASKS) * len(FRACTIONS) + 1)
    for run in runs:
        assert run["status"] == "ok", run
        low, high = run["ci"]
        assert low <= run["macro_auroc"] <= high
        assert run["records"]["test"]["used"] == run["n_samples"] > 0
        assert (Path(run["out"]) / "roc.png").stat().st_size > 0
        settings = json.loads((Path(run["out"]) / "results.json").read_text())["settings"]
        assert settings["random_init"] is (run["model"] == "random_init")
    pretrained = {(r["task"], r["mode"], r["fraction"]): r["macro_auroc"] for r in runs
                  if r["model"] == "pretrained"}
    baseline = {(r["task"], r["mode"], r["fraction"]): r["macro_auroc"] for r in runs
                if r["model"] == "random_init"}
    assert pretrained.keys() == baseline.keys() and pretrained != baseline


def test_code15_bad_exams_are_named_in_the_results(bench_run):
    from code15_fixture import MISSING_PART_EXAMS, N_GOOD, NAN_EXAM, ZERO_EXAM

    for run in bench_run["results"]["runs"]:
        if run["dataset"] != "code-15":
            continue
        assert run["mode"] == "zeroshot" and run["n_samples"] == N_GOOD
        assert run["records"]["test"]["rejected"] == {"nan_or_inf": [str(NAN_EXAM)],
                                                      "flat_signal": [str(ZERO_EXAM)]}
        assert run["records"]["excluded_before_loading"] == {
            "missing_file": [str(e) for e in MISSING_PART_EXAMS]}


def test_missing_root_is_skipped_with_its_reason(bench_run):
    results = bench_run["results"]
    reason = f"root {bench_run['missing']} does not exist"
    assert results["skipped"] == [{"dataset": "cpsc2018", "root": str(bench_run["missing"]),
                                   "reason": reason}]
    skipped_cells = [c for c in results["cells"] if c["dataset"] == "cpsc2018"]
    assert len(skipped_cells) == 2 * (1 + len(FRACTIONS))
    assert all(c["status"] == "skipped" and c["reason"] == reason for c in skipped_cells)
    assert f"CPSC2018: {reason}" in (bench_run["out"] / "table.md").read_text()


def test_embeddings_computed_once_per_dataset_and_model(bench_run):
    """The counter lives in embed_records (one Ray Data inference pass per call); the
    scoring tasks report their own passes, which must be none."""
    plans = bench_run["plan"].plans["ptb-xl"]
    unique = {r.record_id for p in plans for split in p.splits.values() for r in split}
    embeddings = bench_run["results"]["embeddings"]
    assert set(embeddings) == {"ptb-xl", "code-15"}
    assert {m: a["inference_passes"] for m, a in embeddings["code-15"].items()} == {
        "pretrained": 1, "random_init": 1}
    for model in ("pretrained", "random_init"):
        acc = embeddings["ptb-xl"][model]
        assert acc["inference_passes"] == 1
        assert acc["inference_passes_in_scoring"] == 0
        assert acc["records_embedded"] == len(unique)
        assert acc["runs_served"] == len(TASKS) + len(TASKS) * len(FRACTIONS)
        assert acc["columns"] == ["ecg_emb", "ecg_feat"]


def test_table_is_logged_to_tensorboard_and_wandb_at_the_checkpoint_step(bench_run):
    """--tensorboard / --wandb: each scored table cell's AUROC and CI as scalars at the
    checkpoint's step (the tiny run's 30), the table.csv rows as a W&B table."""
    cells = bench_run["results"]["cells"]
    expected = {}
    for cell in cells:
        if cell["status"] == "ok":
            column = "/".join(str(p) for p in (cell["dataset"], cell["task"], cell["fraction"])
                              if p is not None).replace("/1.0", "/1")
            for k in ("macro_auroc", "ci_low", "ci_high"):
                expected[f"{cell['table']}/{cell['model']}/{column}/{k}"] = cell[k]
    assert "linear/random_init/ptb-xl/super/0.1/macro_auroc" in expected
    scalars = read_tensorboard_scalars(bench_run["out"] / "tensorboard")
    assert set(scalars) - {"results/text_summary"} == set(expected)
    for key, value in expected.items():
        assert scalars[key] == [(30, pytest.approx(value, abs=1e-6))]   # float32 in the file

    (run,) = wandb_offline_runs(bench_run["out"] / "wandb")
    assert run["job_type"] == "benchmark" and run["group"] == "bench-test"
    assert run["config"]["bootstrap"] == 50 and run["config"]["suite"].endswith("suite.yaml")
    (logged,) = run["history"]
    assert logged["_step"] == 30
    assert {k: v for k, v in logged.items() if not k.startswith(("_", "results/"))} == expected
    table = json.loads(next((bench_run["out"] / "wandb").glob(
        "offline-run-*/files/" + logged["results/path"])).read_text())
    assert len(table["data"]) == len(cells)
    assert {row[table["columns"].index("status")] for row in table["data"]} == {"ok", "skipped"}
