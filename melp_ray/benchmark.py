"""Paper-style benchmark of a MELP checkpoint beside its random-init baseline.

    python -m melp_ray.benchmark --checkpoint RUN_OR_CKPT_OR_EXPORT \\
        --suite melp_ray/configs/benchmark/ptbxl.yaml --out results/bench

Runs every task of the suite (zero-shot, linear probe at each fraction and seed) for the
checkpoint and for the same architecture with untrained weights, embedding each dataset
once per model, and writes OUT/table.md, OUT/table.csv and OUT/results.json (plus each
run's results and ROC plot under OUT/runs/). The suite file and every dataset's options
are checked before Ray starts; a problem is a usage error (exit code 2). The work lives in
``melp_ray.eval_plan.benchmark``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melp_ray.eval.datasets import EvalError
from melp_ray.eval_plan.plan_checks import check_at_least, check_output_folder
from melp_ray.eval_plan.options import add_runtime_arguments
from melp_ray.eval_plan.tracking import benchmark_scalars, benchmark_table, log_results

DEFAULT_SUITE = Path(__file__).resolve().parent / "configs" / "benchmark" / "ptbxl.yaml"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m melp_ray.benchmark",
        description="Zero-shot and linear-probe benchmark of a checkpoint and its random-init "
                    "baseline; writes OUT/table.md, OUT/table.csv, OUT/results.json.")
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint, run folder, URI, or exported folder")
    p.add_argument("--suite", default=str(DEFAULT_SUITE),
                   help="suite YAML (default: the PTB-XL suite on the bundled sample, "
                        "melp_ray/configs/benchmark/ptbxl.yaml)")
    p.add_argument("--out", required=True, help="local output folder (created)")
    add_runtime_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from melp_ray.eval_plan.benchmark import plan_benchmark, run_benchmark

    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        check_at_least("--actors", args.actors, 0)
        check_output_folder(args.out, uri_ok=False)   # the tables are written with local paths
        bench = plan_benchmark(args.checkpoint, args.suite, args.out)
    except EvalError as err:
        parser.error(str(err))   # exit code 2, before Ray starts
    for skipped in bench.skipped:
        print(f"[melp_ray] skipping {skipped['dataset']}: {skipped['reason']}")
    results = run_benchmark(bench, actors=args.actors, verbose=args.verbose)
    print(f"[melp_ray] wrote {Path(args.out) / 'table.md'}")
    log_results(args, job_type="benchmark", scalars=benchmark_scalars(results),
                table=benchmark_table(results),
                config={"checkpoint": results["checkpoint"], "suite": results["suite"],
                        **results["settings"]},
                text_file=str(Path(args.out) / "table.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
