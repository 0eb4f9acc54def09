"""What to evaluate: the command line checked against the data and the checkpoint.

``build_plan`` turns the parsed arguments into a ``Plan``: the records of each split with
their labels (and reports), the class names and prompts, and the settings written to
results.json. Everything that can be checked without Ray (paths, the checkpoint, folds,
prompts, option combinations) is checked here and raises ``EvalError``, so a typo fails in
a second, not after the cluster starts; the checks of the options themselves (which go
together, bounds, --root, --out, lengths) live in ``melp_ray.eval_plan.plan_checks``. No Ray, no
model weights.

Splits: PTB-XL uses its ``strat_fold`` (default train 1-8, val 9, test 10); the other
datasets a pseudo-fold 1-10 per record (``datasets.physionet_fold``). ``--split-dir``
replaces the folds with the reference's split CSVs (``melp_ray.eval.splits``): records,
labels and classes as listed. The records themselves are listed by ``melp_ray.eval.datasets``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from melp_ray.eval import datasets as D
# Re-exported: callers import these from the plan.
from melp_ray.eval.datasets import EvalError, EvalRecord, Plan, physionet_fold  # noqa: F401
from melp_ray.eval.embeddings import checkpoint_info
from melp_ray.eval_plan.plan_checks import (REPORT_MODES, check_crop, check_disjoint, check_length,
                                       check_option_combinations, check_root, fmt_folds,
                                       parse_folds)

# shards: a prepare output; manifest: your own files + ecg_manifest.csv (docs/data.md)
DATASETS = ("ptb-xl", "cpsc2018", "chapman", "code-15", "shards", "manifest")
MODES = ("zeroshot", "linear", "retrieval", "generation")
PTBXL_TASKS = ("super", "sub", "form", "rhythm")
DEFAULT_FOLDS = {"train": "1-8", "val": "9", "test": "10"}


# ---------------------------------------------------------------- the plan


def build_plan(args: argparse.Namespace) -> Plan:
    """Check every argument against the data and the checkpoint; no Ray, no model weights."""
    check_option_combinations(args)
    if args.dataset == "shards":
        from melp_ray.eval.shard_source import check_shard_root

        root, manifest = check_shard_root(args.root)
    else:
        root, manifest = check_root(args.dataset, args.root), None
    kind, _, data_cfg = checkpoint_info(args.checkpoint)
    sample_rate = args.sample_rate or data_cfg.get("sample_rate")
    seconds = args.seconds or data_cfg.get("seconds")
    if not sample_rate or not seconds:
        raise EvalError(f"the {kind} does not record its input sample rate/length; "
                        "pass --sample-rate and --seconds")
    check_length(sample_rate, seconds)
    check_crop(args.crop_seconds, sample_rate, seconds)

    task = None
    if args.dataset in ("ptb-xl", "shards", "manifest") and args.mode not in REPORT_MODES:
        task = args.task or "super"
    split_names = ("train", "val", "test") if args.mode == "linear" else ("test",)
    split_files: dict[str, str] = {}
    if args.report_split:   # records and reference reports from the file
        splits, excluded = _report_split_records(root, int(sample_rate), args.report_split)
        classes, aliases, folds, split_files = [], {}, {}, {"test": args.report_split}
    elif args.split_dir:  # records, labels and classes from the reference's split files
        splits, classes, excluded, split_files = D.split_dir_records(
            args.dataset, root, task, int(sample_rate), args.split_dir, split_names,
            args.class_names)
        aliases = D.default_aliases(args.dataset, root, task, classes)
        folds: dict[str, list[int]] = {}
    else:
        if args.dataset == "shards":
            records, classes, aliases = _shard_records(root, manifest, task)
            splits, excluded, folds = _fold_splits(records, root, args, split_names, {})
        else:
            listing = D.list_records(args.dataset, root, task, int(sample_rate), args.min_count,
                                     args.class_names)
            classes, aliases = listing.classes, listing.aliases
            splits, excluded, folds = _fold_splits(listing.records, root, args, split_names,
                                                   dict(listing.excluded))

    prompts = None
    if args.mode == "zeroshot":
        prompts = _resolve_prompts(*_prompt_source(args.dataset, root), classes, args.prompts,
                                   args.prompt_format, aliases)
    if args.mode == "linear":
        _check_probe_labels(splits, classes)

    plan = Plan(mode=args.mode, dataset=args.dataset, root=root, out=Path(args.out),
                checkpoint=args.checkpoint, checkpoint_kind=kind, sample_rate=int(sample_rate),
                seconds=float(seconds), task=task, class_names=classes, splits=splits,
                folds=folds, excluded=excluded, prompts=prompts, crop_seconds=args.crop_seconds,
                shard_sample_rate=manifest["sample_rate"] if manifest else None)
    plan.settings = {
        "mode": args.mode, "dataset": args.dataset, "root": root, "task": task,
        "checkpoint": args.checkpoint, "checkpoint_kind": kind,
        "random_init": args.random_init, "sample_rate": plan.sample_rate,
        "seconds": plan.seconds, "folds": folds,
        **({"crop_seconds": args.crop_seconds} if args.crop_seconds else {}),
        **({"shards": {"source_dataset": manifest.get("dataset"),
                       "sample_rate": manifest["sample_rate"],
                       "ecg_encoding": manifest.get("ecg_encoding", "float32")}}
           if manifest else {}),
        **({"split_files": split_files} if split_files else {}),
        "n_records": {s: len(v) for s, v in splits.items()},
        "batch_size": args.batch_size, "seed": args.seed,
        **({"bootstrap": args.bootstrap} if args.mode not in REPORT_MODES else {}),
        **({"max_new_tokens": args.max_new_tokens} if args.mode == "generation" else {}),
        **({"fraction": args.fraction} if args.mode == "linear" else {}),
        **({"prompts_file": args.prompts} if args.mode == "zeroshot" else {}),
        **({"prompt_format": _prompt_format(args)} if args.prompts else {}),
        **({"min_count": args.min_count} if args.dataset == "chapman"
           and not (args.class_names or args.split_dir) else {}),
        **({"class_names_file": args.class_names} if args.class_names else {}),
    }
    return plan


def _shard_records(root: str, manifest: dict, task: str | None
                   ) -> tuple[list[EvalRecord], list[str], dict[str, str]]:
    from melp_ray.eval import shard_source

    classes = shard_source.shard_classes(manifest, task)
    records = shard_source.shard_records(root, manifest, task, classes)
    return records, classes, {c: c for c in classes}


def _prompt_source(dataset: str, root: str) -> tuple[str, str]:
    """(dataset, root) whose default prompts apply: PTB-XL shards use PTB-XL's statements."""
    if dataset == "shards":
        from melp_ray.eval.shard_source import ptbxl_statements_root

        return "ptb-xl", ptbxl_statements_root()
    return dataset, root


def _fold_splits(records: list[EvalRecord], root: str, args, split_names,
                 excluded: dict[str, list[str]]
                 ) -> tuple[dict[str, list[EvalRecord]], dict[str, list[str]],
                            dict[str, list[int]]]:
    """Records per split by fold (PTB-XL strat_fold, pseudo-fold elsewhere); ``excluded``
    (reason -> ids, left out while listing) is extended with the unusable records."""
    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):  # results are aligned by record id
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise EvalError(f"--root {root}: record ids are not unique (e.g. {dupes})")
    folds = {s: parse_folds(getattr(args, f"{s}_folds") or DEFAULT_FOLDS[s], f"--{s}-folds")
             for s in split_names}
    check_disjoint(folds)
    available = sorted({r.fold for r in records})
    splits: dict[str, list[EvalRecord]] = {}
    for split in split_names:
        in_folds = [r for r in records if r.fold in folds[split]]
        if not in_folds:
            raise EvalError(f"--{split}-folds {fmt_folds(folds[split])}: no record of {root} "
                            f"is in these folds (folds present: {fmt_folds(available)})")
        kept = _drop_unusable(in_folds, args.mode, excluded, args.dataset)
        if not kept:
            raise EvalError(f"--{split}-folds {fmt_folds(folds[split])}: every record was "
                            f"left out ({ {k: len(v) for k, v in excluded.items()} })")
        splits[split] = kept
    return splits, excluded, folds


def _report_split_records(root: str, sample_rate: int, report_split: str
                          ) -> tuple[dict[str, list[EvalRecord]], dict[str, list[str]]]:
    """The test split of --report-split: every row, its report from the file; rows whose
    record is not under --root (missing_file) or whose report is empty are named."""
    from melp_ray.eval import splits as S

    try:
        rows = S.read_report_split(report_split)
    except S.SplitFileError as err:
        raise EvalError(f"--report-split: {err}") from None
    excluded: dict[str, list[str]] = {}
    records, seen = [], set()
    for line, row in enumerate(rows, start=2):
        record_id, path, fold = S.ptbxl_record(root, row, sample_rate)
        if record_id in seen:
            raise EvalError(f"--report-split {report_split}: record {record_id} appears twice "
                            f"(line {line})")
        seen.add(record_id)
        if os.path.isfile(path + ".hea"):
            records.append(EvalRecord(record_id=record_id, path=path, fold=fold,
                                      report=row["report"]))
        else:
            excluded.setdefault("missing_file", []).append(record_id)
    kept = _drop_unusable(records, "retrieval", excluded)
    if not kept:
        raise EvalError(f"--report-split: none of the {len(rows)} records of {report_split} "
                        f"is usable under --root {root} ({ {k: len(v) for k, v in excluded.items()} })")
    return {"test": kept}, excluded


def _drop_unusable(records: list[EvalRecord], mode: str, excluded: dict[str, list[str]],
                   dataset: str = "ptb-xl") -> list[EvalRecord]:
    """Leave out records the mode cannot use, named under their reason.

    Classification: a record with no label of the task (the PTB-XL benchmark convention;
    e.g. a record with only non-diagnostic statements has no superclass), except on
    CODE-15%, whose six classes are abnormalities: an exam with none of them is a negative
    of every class (most of CODE-test), as the reference scores it. Retrieval and
    generation: a record with an empty report (nothing to retrieve or score against).
    """
    kept = []
    for r in records:
        if mode in REPORT_MODES:
            reason = None if r.report.strip() else "empty_report"
        else:
            reason = None if r.labels.any() or dataset == "code-15" else "no_label"
        if reason:
            excluded.setdefault(reason, []).append(r.record_id)
        else:
            kept.append(r)
    return kept


def _prompt_format(args) -> str:
    from melp_ray.text.prompts import prompt_file_format

    try:
        return prompt_file_format(args.prompts, args.prompt_format)
    except ValueError as err:
        raise EvalError(f"--prompts: {err}") from None


def _resolve_prompts(dataset: str, root: str, classes: list[str], prompt_file: str | None,
                     prompt_format: str = "auto", aliases: dict[str, str] | None = None):
    """Prompts per class; a class named after one of ours (``aliases``: name -> our label
    name, from --class-names) gets our label's default prompt."""
    from melp_ray.data import physionet_labels
    from melp_ray.text import prompts as P

    if dataset == "ptb-xl":
        defaults = P.ptbxl_descriptions(Path(root) / "scp_statements.csv")
    elif dataset == "cpsc2018":
        defaults = physionet_labels.CPSC2018_DESCRIPTIONS
    elif dataset == "code-15":
        defaults = P.CODE15_PROMPTS
    elif dataset == "manifest":   # your own classes: the name is the prompt unless --prompts
        defaults = {c: c for c in classes}
    else:
        defaults = physionet_labels.SNOMED_DESCRIPTIONS
    defaults = {**defaults, **{name: defaults[ours] for name, ours in (aliases or {}).items()
                               if ours in defaults}}
    try:
        return P.resolve_prompts(classes, defaults, prompt_file, prompt_format)
    except (KeyError, ValueError) as err:
        raise EvalError(f"prompts: {err}") from None


def _check_probe_labels(splits: dict[str, list[EvalRecord]], classes: list[str]) -> None:
    from melp_ray.eval.metrics import scorable_classes

    for split in ("val", "test"):
        y = np.stack([r.labels for r in splits[split]])
        if not scorable_classes(y).any():
            raise EvalError(f"--{split}-folds: no class has both positive and negative records "
                            f"({len(y)} records), so AUROC is undefined; use more folds")
