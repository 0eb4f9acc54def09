"""The command line of ``python -m melp_ray.evaluate``: its options, defaults and help. The
benchmark builds each of its evaluations from the same parser, so both read options alike."""
from __future__ import annotations

import argparse

from melp_ray.eval_plan.plan import DATASETS, DEFAULT_FOLDS, MODES, PTBXL_TASKS
from melp_ray.eval_plan.plan_checks import DEFAULT_CHAPMAN_MIN_COUNT, DEFAULT_MAX_NEW_TOKENS
from melp_ray.eval_plan.tracking import add_tracking_arguments
from melp_ray.text.prompts import PROMPT_FORMATS


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m melp_ray.evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a MELP model: zero-shot classification, linear probing on\n"
                    "frozen ECG features, ECG<->report retrieval, or report generation\n"
                    "(BLEU/ROUGE-L/METEOR). Writes OUT/results.json,\n"
                    "OUT/results.md and, for classification, OUT/roc.png and\n"
                    "OUT/scores.npz (per-record scores).",
        epilog="examples:\n"
               "  python -m melp_ray.evaluate --checkpoint RUN_DIR --dataset ptb-xl \\\n"
               "      --root /data/ptb-xl --task super --mode zeroshot --out results/zs\n"
               "  python -m melp_ray.evaluate ... --mode linear --fraction 0.01 \\\n"
               "      --train-folds 1-8 --val-folds 9 --test-folds 10 --out results/lp1\n"
               "  python -m melp_ray.evaluate ... --mode retrieval --out results/ret\n"
               "  python -m melp_ray.evaluate ... --mode generation --out results/gen\n\n"
               "PTB-XL splits use strat_fold. CPSC2018/Chapman/CODE-15% records get a "
               "fixed pseudo-fold\n1-10 from a hash of the record id, so the same fold "
               "options apply (--test-folds 1-10\nscores every CODE-test record).")
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (any ZeRO stage), a run folder (its latest "
                        "checkpoint), a URI, or a folder from python -m melp_ray.export")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True,
                   help="dataset folder (PTB-XL: ptbxl_database.csv + records100/500; "
                        "CPSC2018/Chapman: PhysioNet Challenge .hea/.mat files; code-15: "
                        "CODE-15%% exams.csv + exams_part*.hdf5, or CODE-test "
                        "ecg_tracings.hdf5 + annotations/gold_standard.csv; shards: a "
                        "folder or s3://, gs:// URI written by python -m melp_ray.prepare; manifest: "
                        "a folder with ecg_manifest.csv/.parquet, labels from its "
                        "labels_<task> columns, docs/data.md)")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--out", required=True,
                   help="output folder (created): a local path or an s3://, gs:// URI")
    p.add_argument("--task", choices=PTBXL_TASKS,
                   help="PTB-XL label set for zeroshot/linear (default: super)")
    p.add_argument("--train-folds", help=f"linear only (default {DEFAULT_FOLDS['train']})")
    p.add_argument("--val-folds", help=f"linear only, early stopping (default "
                                       f"{DEFAULT_FOLDS['val']})")
    p.add_argument("--test-folds", help=f"folds scored (default {DEFAULT_FOLDS['test']}); "
                                        "e.g. 10, 9-10 or 1,2")
    p.add_argument("--fraction", type=float,
                   help="linear only: share of the training folds to train on, e.g. 0.01, "
                        "0.1, 1.0 (default 1.0; seeded, every class keeps a positive)")
    p.add_argument("--prompts", help="zeroshot only: YAML/JSON class -> prompt(s), overriding "
                                     "the default prompts per class; or the reference's "
                                     "CKEPE_prompt.json (class -> one description, which "
                                     "must name every class)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="how to read --prompts (default auto: a JSON object of strings "
                        "only is CKEPE, anything else melp_ray)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"generation only: greedy decoding stops after this many tokens "
                        f"(default {DEFAULT_MAX_NEW_TOKENS}; at most the model's text length - 2)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the checkpoint's architecture with untrained (seeded) "
                        "weights: the baseline that shows what pretraining bought")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch (default 64)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap replicates for the AUROC CI (default 1000; 0 = no CI)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of subsampling, probe, bootstrap and --random-init")
    p.add_argument("--sample-rate", type=int,
                   help="Hz fed to the model (default: the checkpoint's data.sample_rate)")
    p.add_argument("--seconds", type=float,
                   help="record length in s (default: the checkpoint's data.seconds)")
    p.add_argument("--crop-seconds", type=float,
                   help="keep the first S s of each record and zero-pad to --seconds (the "
                        "reference reads CPSC2018 as --crop-seconds 5 with 10 s input), so "
                        "records shorter than --seconds but >= S are kept")
    p.add_argument("--min-count", type=int,
                   help=f"chapman only: classes = SNOMED codes in >= N records (default "
                        f"{DEFAULT_CHAPMAN_MIN_COUNT})")
    p.add_argument("--class-names",
                   help="the reference's dataset_class_names.json: use its class list for "
                        "this task (ptbxl_super_class, ..., icbeb, chapman) instead of ours")
    p.add_argument("--report-split", metavar="FILE",
                   help="retrieval/generation on PTB-XL: the records scored and their "
                        "reference reports from a CSV in ptbxl_database.csv's layout (the "
                        "reference's data_split/ptbxl/report/ptbxl_test.csv, English reports) "
                        "instead of --test-folds")
    p.add_argument("--split-dir",
                   help="the reference's split CSVs DIR/<task>_{train,val,test}.csv (task: "
                        "ptbxl_super_class, ..., icbeb, chapman): records, labels and classes "
                        "come from them instead of folds")
    add_runtime_arguments(p)
    return p


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model runs, how much the libraries print, and experiment tracking: the same
    for ``evaluate`` and ``benchmark``."""
    p.add_argument("--actors", type=int,
                   help="inference actors (default: one per GPU, or 1 without GPUs); 0: "
                        "the model runs in this process (small sets, debugging)")
    p.add_argument("--verbose", action="store_true",
                   help="let Ray, DeepSpeed and transformers print at their default levels")
    add_tracking_arguments(p)
