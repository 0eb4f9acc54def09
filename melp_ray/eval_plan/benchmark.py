"""A paper-style benchmark: every task of a suite, for the checkpoint and its random-init
baseline, in one run.

``plan_benchmark`` reads the suite (``melp_ray.eval_plan.suite``) and builds the evaluate
``Plan`` of every (dataset, task, mode) without Ray, so any bad option fails before the
cluster starts; a dataset whose root does not exist is skipped with its reason.
``run_benchmark`` then, per dataset and model (pretrained, random init), computes the
embeddings of every record any task of that dataset uses in ONE inference pass
(``EmbeddingTable``: zero-shot embeddings and probe features together) and scores every
task, fraction and seed from it in parallel Ray tasks (``run_zeroshot`` / ``run_linear``
of ``melp_ray.eval_plan.modes``; each run's results.json, results.md, roc.png and scores.npz
come back to the driver, which writes them under OUT/runs/).
The tables are written by ``melp_ray.eval_plan.bench_report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melp_ray.eval_plan.plan import EvalError, Plan, build_plan, checkpoint_info
from melp_ray.eval_plan.suite import DatasetSpec, Suite, load_suite

MODELS = ("pretrained", "random_init")
OUTPUTS = {"zeroshot": {"ecg_emb": ("encode_ecg", "ecg")},
           "linear": {"ecg_feat": ("ecg_features", "ecg")}}


@dataclass
class Run:
    """One scoring job: a task of a dataset, in one mode, for one model (and fraction/seed)."""

    dataset: str
    task: str | None
    mode: str
    model: str
    fraction: float | None
    seed: int
    plan: Plan

    @property
    def key(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "task": self.task, "mode": self.mode,
                "model": self.model, "fraction": self.fraction, "seed": self.seed}


@dataclass
class BenchmarkPlan:
    checkpoint: str
    suite: Suite
    out: Path
    plans: dict[str, list[Plan]] = field(default_factory=dict)    # dataset -> its plans
    skipped: list[dict[str, str]] = field(default_factory=list)   # dataset, root, reason


def run_dir(out: Path, dataset: str, task: str | None, model: str, mode: str,
            fraction: float | None, seed: int) -> Path:
    name = mode if fraction is None else f"{mode}-{fraction * 100:g}pct-seed{seed}"
    return out / "runs" / (f"{dataset}-{task}" if task else dataset) / model / name


# ---------------------------------------------------------------- planning (no Ray)

def plan_benchmark(checkpoint: str, suite_path: str, out: str | Path) -> BenchmarkPlan:
    """The suite checked and every evaluate plan built; raises EvalError (or SuiteError)."""
    suite = load_suite(suite_path)
    checkpoint_info(checkpoint)   # a missing checkpoint fails even if every root is absent
    bench = BenchmarkPlan(checkpoint=checkpoint, suite=suite, out=Path(out))
    for spec in suite.datasets:
        if not Path(spec.root).exists():
            bench.skipped.append({"dataset": spec.name, "root": spec.root,
                                  "reason": f"root {spec.root} does not exist"})
            continue
        bench.plans[spec.name] = [_plan(checkpoint, suite, spec, task, mode, bench.out)
                                  for task in spec.tasks for mode in spec.modes]
    return bench


def _plan(checkpoint: str, suite: Suite, spec: DatasetSpec, task: str | None, mode: str,
          out: Path) -> Plan:
    try:
        return build_plan(_evaluate_args(checkpoint, suite, spec, task, mode, out))
    except EvalError as err:   # say which entry of the suite the option came from
        where = f"datasets.{spec.name}" + (f" task {task}" if task else "")
        raise EvalError(f"--suite {suite.path}: {where}, {mode}: {err}") from None


def _evaluate_args(checkpoint: str, suite: Suite, spec: DatasetSpec, task: str | None,
                   mode: str, out: Path) -> argparse.Namespace:
    """The evaluate command line this (dataset, task, mode) would have, parsed by its parser
    so the options mean exactly what they mean there."""
    from melp_ray.eval_plan.options import make_parser

    argv = ["--checkpoint", checkpoint, "--dataset", spec.name, "--root", spec.root,
            "--mode", mode, "--out", str(out), "--bootstrap", str(suite.bootstrap),
            "--batch-size", str(suite.batch_size)]
    if task:
        argv += ["--task", task]
    for split, folds in spec.folds.items():
        if split == "test" or mode == "linear":   # train/val folds only mean something there
            argv += [f"--{split}-folds", folds]
    for option, value in spec.options.items():
        if option in ("--prompts", "--prompt-format") and mode != "zeroshot":
            continue
        argv += [option, str(value)]
    return make_parser().parse_args(argv)


def expand_runs(bench: BenchmarkPlan, dataset: str, model: str) -> list[Run]:
    """Every scoring job of one dataset for one model, each with its own output folder."""
    spec = next(s for s in bench.suite.datasets if s.name == dataset)
    runs = []
    for plan in bench.plans[dataset]:
        grid = [(None, spec.seeds[0])] if plan.mode == "zeroshot" else \
            [(f, s) for f in spec.fractions for s in spec.seeds]
        for fraction, seed in grid:
            out = run_dir(bench.out, dataset, plan.task, model, plan.mode, fraction, seed)
            settings = {**plan.settings, "random_init": model == "random_init", "seed": seed,
                        "out": str(out),
                        **({"fraction": fraction} if fraction is not None else {})}
            if model == "random_init":
                settings["random_init_seed"] = bench.suite.random_init_seed
            runs.append(Run(dataset, plan.task, plan.mode, model, fraction, seed,
                            dataclasses.replace(plan, out=out, settings=settings)))
    return runs


# ---------------------------------------------------------------- running (Ray)

def _score(run: Run, data: dict, model_fn, bootstrap: int) -> dict[str, Any]:
    """One job in a Ray task, on any node: the mode's scoring on the shared embeddings, its
    files written to a scratch folder and returned as bytes (the driver writes them under
    OUT, so no node but the driver's needs OUT). Also returns the run's results.json (or
    the error) and the inference passes this process ran."""
    import tempfile

    from melp_ray.eval.embeddings import EmbeddingTable, inference_passes
    from melp_ray.eval_plan.modes import run_linear, run_zeroshot

    before = inference_passes()
    args = argparse.Namespace(bootstrap=bootstrap, seed=run.seed, fraction=run.fraction)
    fn = run_zeroshot if run.mode == "zeroshot" else run_linear
    with tempfile.TemporaryDirectory() as scratch:
        plan = dataclasses.replace(run.plan, out=Path(scratch))
        try:
            results, error = fn(plan, model_fn, EmbeddingTable(data), args, {}), None
        except (RuntimeError, ValueError) as err:   # e.g. every test record rejected
            results, error = None, f"{type(err).__name__}: {err}"
        files = {p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()}
    return {"run": run.key, "out": str(run.plan.out), "results": results, "error": error,
            "files": files, "inference_passes": inference_passes() - before}


def run_benchmark(bench: BenchmarkPlan, actors: int | None = None,
                  verbose: bool = False) -> dict[str, Any]:
    """Embed once per dataset and model, score every job in parallel, write the tables."""
    import ray

    from melp_ray.eval_plan import bench_report
    from melp_ray.eval.embeddings import EmbeddingTable, build_model, inference_passes
    from melp_ray.utils.ray_connect import init_ray, quiet_data_progress_bars

    init_ray(verbose=verbose)
    quiet_data_progress_bars()
    score = ray.remote(num_cpus=1)(_score)
    pending, embeddings = [], {}
    for dataset, plans in bench.plans.items():
        records = list({r.record_id: r for p in plans for split in p.splits.values()
                        for r in split}.values())
        outputs = {k: v for p in plans for k, v in OUTPUTS[p.mode].items()}
        for model in MODELS:
            model_fn = functools.partial(build_model, bench.checkpoint, model == "random_init",
                                         bench.suite.random_init_seed)
            before = inference_passes()
            table = EmbeddingTable.compute(plans[0], records, outputs, model_fn,
                                           bench.suite.batch_size, actors)
            data = ray.put(table.data)
            runs = expand_runs(bench, dataset, model)
            embeddings.setdefault(dataset, {})[model] = {
                "inference_passes": inference_passes() - before,
                "records_embedded": len(table.data["record_id"]),
                "columns": sorted(outputs), "runs_served": len(runs)}
            pending += [score.remote(run, data, model_fn, bench.suite.bootstrap)
                        for run in runs]
    finished = ray.get(pending)
    for item in finished:
        out = Path(item["out"])
        out.mkdir(parents=True, exist_ok=True)
        for name, content in item.pop("files").items():
            (out / name).write_bytes(content)
        served = embeddings[item["run"]["dataset"]][item["run"]["model"]]
        served["inference_passes_in_scoring"] = (served.get("inference_passes_in_scoring", 0)
                                                 + item["inference_passes"])
    return bench_report.write_benchmark(bench, finished, embeddings)
