"""Evaluate a MELP model: zero-shot classification, linear probing, ECG<->report retrieval,
report generation (BLEU/ROUGE-L/METEOR).

    python -m melp_ray.evaluate --checkpoint RUN_OR_CKPT_OR_EXPORT --dataset ptb-xl \\
        --root /data/ptb-xl --task super --mode zeroshot --out results/zs_super
    python -m melp_ray.evaluate ... --mode linear --fraction 0.01 --out results/lp_1pct
    python -m melp_ray.evaluate ... --mode retrieval --out results/retrieval

This module is the command line only (its options: ``melp_ray.eval_plan.options``). The
work lives in ``melp_ray.eval_plan``: ``plan`` checks the arguments against the data and the
checkpoint before Ray starts (an ``EvalError`` is reported as a usage error, exit code 2),
``modes`` runs zero-shot / linear / retrieval / generation and writes OUT/results.*; the
records are read and encoded with Ray Data by ``melp_ray.eval.embeddings``.
"""
from __future__ import annotations

import json
import sys

from melp_ray.utils import storage
from melp_ray.eval_plan.modes import evaluate
from melp_ray.eval_plan.options import make_parser
from melp_ray.eval_plan.plan import EvalError
from melp_ray.eval_plan.tracking import evaluation_scalars, evaluation_table, log_results


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        results = evaluate(args)
    except EvalError as err:
        parser.error(str(err))  # exit code 2, usage + message, before Ray starts
    headline = {"retrieval": ("recall@1", "recall@5", "recall@10"),
                "generation": ("bleu1", "bleu4", "rouge_l", "meteor")
                }.get(args.mode, ("macro_auroc", "ci"))
    print(json.dumps({k: results.get(k) for k in headline}))
    log_results(args, job_type="evaluate", scalars=evaluation_scalars(results),
                table=evaluation_table(results), config=results["settings"],
                text_file=storage.join(args.out, "results.md"), random_init=args.random_init)
    print(f"[melp_ray] wrote {storage.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
