"""The command-line option checks behind ``build_plan`` (``melp_ray.eval_plan.plan``).

Kept apart from the plan so that ``plan.py`` reads as what is evaluated (records, folds,
classes, prompts) while this module holds the rules on the options themselves: which
options go together, the defaults that depend on them, bounds, the --root and --out
folders, the signal length and crop, and the fold options (parsed, disjoint). Each failure raises ``EvalError``
naming the option. ``check_at_least`` and ``check_output_folder`` also serve
``melp_ray.benchmark``. No Ray, no model weights.
"""
from __future__ import annotations

from pathlib import Path

from melp_ray.utils import storage
from melp_ray.eval.datasets import EvalError

REPORT_MODES = ("retrieval", "generation")   # scored against the records' free-text reports
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_CHAPMAN_MIN_COUNT = 10


def check_option_combinations(args) -> None:
    only = [("--fraction", args.fraction is not None, "linear"),
            ("--train-folds", args.train_folds is not None, "linear"),
            ("--val-folds", args.val_folds is not None, "linear"),
            ("--prompts", args.prompts is not None, "zeroshot"),
            ("--prompt-format", args.prompt_format != "auto", "zeroshot")]
    for option, given, mode in only:
        if given and args.mode != mode:
            raise EvalError(f"{option} only applies to --mode {mode}")
    if args.dataset == "manifest" and args.split_dir is not None:
        raise EvalError("--split-dir does not apply to --dataset manifest (its folds come from "
                        "a hash of each record id)")
    if args.dataset == "shards":
        for option, value in (("--split-dir", args.split_dir), ("--class-names", args.class_names)):
            if value is not None:
                raise EvalError(f"{option} does not apply to --dataset shards (the shards "
                                "hold their records' folds and labels)")
    if args.task is not None and args.dataset not in ("ptb-xl", "shards", "manifest"):
        raise EvalError(f"--task selects a PTB-XL label set; {args.dataset} has one fixed "
                        "label set (leave --task out)")
    if args.task is not None and args.mode in REPORT_MODES:
        raise EvalError(f"--task has no effect on --mode {args.mode} (leave it out)")
    if args.mode in REPORT_MODES and args.dataset not in ("ptb-xl", "shards", "manifest"):
        raise EvalError(f"--mode {args.mode} needs free-text reports; {args.dataset} has none "
                        "(use --dataset ptb-xl)")
    if args.max_new_tokens is not None and args.mode != "generation":
        raise EvalError("--max-new-tokens only applies to --mode generation")
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if args.dataset == "code-15":
        for option, value in (("--class-names", args.class_names), ("--split-dir", args.split_dir)):
            if value is not None:  # the reference has no class list or split file for CODE
                raise EvalError(f"{option} has no CODE-15% entry in the reference; "
                                "--dataset code-15 has one fixed label set (leave it out)")
    if args.min_count is not None and args.dataset != "chapman":
        raise EvalError("--min-count only applies to --dataset chapman")
    if args.split_dir is not None:
        _check_split_dir_options(args)
    if args.report_split is not None:
        _check_report_split_options(args)
    if args.class_names is not None:
        if args.mode in REPORT_MODES:
            raise EvalError(f"--class-names has no effect on --mode {args.mode} (leave it out)")
        if not Path(args.class_names).is_file():
            raise EvalError(f"--class-names {args.class_names} is not a file")
        if args.min_count is not None:
            raise EvalError("--min-count has no effect with --class-names (the file lists "
                            "the classes)")
    if args.min_count is None:
        args.min_count = DEFAULT_CHAPMAN_MIN_COUNT
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise EvalError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise EvalError(f"--prompts {args.prompts} is not a file")
    if args.prompt_format != "auto" and args.prompts is None:
        raise EvalError("--prompt-format needs --prompts FILE")
    for option, value, low in (("--batch-size", args.batch_size, 1),
                               ("--bootstrap", args.bootstrap, 0),
                               ("--actors", args.actors, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1)):
        check_at_least(option, value, low)
    check_output_folder(args.out)


def check_at_least(option: str, value, low) -> None:
    if value is not None and value < low:
        raise EvalError(f"{option} must be >= {low}, got {value}")


def check_output_folder(out: str, uri_ok: bool = True) -> None:
    """--out: a local folder (created if absent) or, for a command that copies its files
    there, an s3:// / gs:// URI; a URI is never taken for a local path."""
    if storage.is_uri(out):
        if not uri_ok:
            raise EvalError(f"--out {out}: this command writes a local folder; copy it to "
                            "the bucket afterwards")
        return
    if Path(out).exists() and not Path(out).is_dir():
        raise EvalError(f"--out {out} exists and is not a folder")


def _check_report_split_options(args) -> None:
    if args.mode not in REPORT_MODES or args.dataset != "ptb-xl":
        raise EvalError("--report-split applies to --mode retrieval or generation on "
                        "--dataset ptb-xl")
    if args.test_folds is not None or args.split_dir is not None:
        raise EvalError("--report-split lists the records: leave out --test-folds and --split-dir")
    if not Path(args.report_split).is_file():
        raise EvalError(f"--report-split {args.report_split} is not a file")


def _check_split_dir_options(args) -> None:
    if args.mode in REPORT_MODES:
        raise EvalError("--split-dir applies to zeroshot and linear; the reference's report "
                        f"split is read with --report-split FILE for {args.mode}")
    if not Path(args.split_dir).is_dir():
        raise EvalError(f"--split-dir {args.split_dir} is not a folder")
    for option in ("train_folds", "val_folds", "test_folds", "min_count"):
        if getattr(args, option) is not None:
            raise EvalError(f"--{option.replace('_', '-')} has no effect with --split-dir "
                            "(the split files list the records and classes)")


def check_root(dataset: str, root: str) -> str:
    from melp_ray.data.ptbxl import DATABASE_CSV, STATEMENTS_CSV

    path = Path(root).expanduser()
    if not path.is_dir():
        raise EvalError(f"--root {root} is not an existing folder")
    if dataset == "ptb-xl":
        missing = [f for f in (DATABASE_CSV, STATEMENTS_CSV) if not (path / f).is_file()]
        if missing:
            raise EvalError(f"--root {root} is not a PTB-XL folder (no {', '.join(missing)})")
    elif dataset == "manifest":
        from melp_ray.data.manifest import MANIFEST_CSV, MANIFEST_PARQUET, manifest_file

        if manifest_file(path) is None:
            raise EvalError(f"--root {root} is not a manifest folder (no {MANIFEST_CSV} nor "
                            f"{MANIFEST_PARQUET})")
    elif dataset == "code-15":
        from melp_ray.data import code15

        if code15.detect_layout(path) is None:
            raise EvalError(f"--root {root} is not a CODE-15% folder (no {code15.EXAMS_CSV}) "
                            f"nor CODE-test (no {code15.TEST_HDF5})")
    elif not any(path.rglob("*.hea")):
        raise EvalError(f"--root {root} holds no PhysioNet .hea headers for {dataset}")
    return str(path.resolve())


def check_length(sample_rate, seconds) -> None:
    from melp_ray.data.records import n_samples_for

    try:
        n_samples_for(sample_rate, seconds)
    except ValueError as err:
        raise EvalError(f"--sample-rate/--seconds: {err}") from None


def check_crop(crop_seconds, sample_rate, seconds) -> None:
    if crop_seconds is None:
        return
    if not 0 < crop_seconds <= seconds:
        raise EvalError(f"--crop-seconds must be in (0, --seconds={seconds}], got {crop_seconds}")
    try:
        check_length(sample_rate, crop_seconds)
    except EvalError as err:
        raise EvalError(f"--crop-seconds: {err}") from None


def parse_folds(text: str, option: str) -> list[int]:
    """"1-8" -> [1..8]; "1,2,3" and "1-3,5" work too. Sorted, unique, each >= 1."""
    folds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                folds.update(range(lo, hi + 1))
            else:
                folds.add(int(part))
        except ValueError:
            raise EvalError(f"{option} {text!r}: expected folds like 1-8 or 1,2,3") from None
    if not folds or min(folds) < 1:
        raise EvalError(f"{option} {text!r}: folds are numbered from 1")
    return sorted(folds)


def check_disjoint(folds: dict[str, list[int]]) -> None:
    names = list(folds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(folds[a]) & set(folds[b]))
            if shared:
                raise EvalError(f"--{a}-folds and --{b}-folds share folds {fmt_folds(shared)}")


def fmt_folds(folds) -> str:
    return ",".join(str(f) for f in folds) or "none"
