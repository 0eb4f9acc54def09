"""What to evaluate: the command line checked against the data and the checkpoint.

``build_plan`` turns the parsed arguments into a ``Plan``: the records of each split with
their labels (and reports), the class names and prompts, and the settings written to
results.json. Everything that can be checked without Ray (paths, the checkpoint, folds,
prompts, option combinations) is checked here and raises ``EvalError``, so a typo fails in
a second, not after the cluster starts. No Ray, no model weights.

Splits: PTB-XL uses its ``strat_fold`` (default train 1-8, val 9, test 10). CPSC2018 and
Chapman-Shaoxing ship no folds, so each record gets a fixed pseudo-fold 1-10 from a hash of
its record id (``physionet_fold``): the same fold options then work on every dataset and
the split never changes between runs or machines. ``--split-dir`` replaces the folds with
the reference's split CSVs (``melp_ray.eval.splits``): records, labels and classes as listed.
"""
from __future__ import annotations

import argparse
import functools
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from melp_ray import storage

DATASETS = ("ptb-xl", "cpsc2018", "chapman", "shards")   # shards: a prepare output
MODES = ("zeroshot", "linear", "retrieval", "generation")
REPORT_MODES = ("retrieval", "generation")   # scored against the records' free-text reports
DEFAULT_MAX_NEW_TOKENS = 64
PTBXL_TASKS = ("super", "sub", "form", "rhythm")
N_PSEUDO_FOLDS = 10
DEFAULT_FOLDS = {"train": "1-8", "val": "9", "test": "10"}
DEFAULT_CHAPMAN_MIN_COUNT = 10


class EvalError(ValueError):
    """Bad arguments or unusable data, found before any work starts."""


@dataclass
class EvalRecord:
    """One record to evaluate, before its signal is read."""

    record_id: str
    path: str                          # absolute; WFDB record (PTB-XL) or .hea (PhysioNet)
    fold: int
    report: str = ""
    labels: np.ndarray | None = None   # multi-hot over the class list


@dataclass
class Plan:
    """The checked, resolved form of the command line."""

    mode: str
    dataset: str
    root: str
    out: Path
    checkpoint: str
    checkpoint_kind: str               # "training checkpoint" | "exported folder"
    sample_rate: int
    seconds: float
    task: str | None
    class_names: list[str]
    splits: dict[str, list[EvalRecord]]     # the splits the mode uses
    folds: dict[str, list[int]]
    excluded: dict[str, list[str]]          # reason -> record ids left out before loading
    prompts: list[list[str]] | None = None
    crop_seconds: float | None = None       # first S s of each record, zero-padded to seconds
    shard_sample_rate: int | None = None    # --dataset shards: the rate the shards hold
    settings: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- records and folds

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


def physionet_fold(record_id: str) -> int:
    """Fixed pseudo-fold 1..10 of a PhysioNet record (crc32: stable across runs and hosts)."""
    return zlib.crc32(record_id.encode()) % N_PSEUDO_FOLDS + 1


def _multi_hot(names, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros(len(classes), dtype=np.float32)
    for name in names:
        if name in index:
            out[index[name]] = 1.0
    return out


def _ptbxl_records(root: str, task: str | None, sample_rate: int,
                   class_file: str | None = None
                   ) -> tuple[list[EvalRecord], list[str], dict[str, str]]:
    """Records with labels over the task's classes: ours, or a class-names file's (then
    with the map file name -> our label name)."""
    from melp_ray.data.ptbxl import class_names, list_ptbxl
    from melp_ray.eval import class_lists

    classes = class_names(task, root) if task else []
    aliases = {c: c for c in classes}
    if task and class_file:
        names = _class_file_names(class_file, "ptb-xl", task)
        aliases = _or_eval_error(class_lists.match_ptbxl_names, names, classes,
                                 f"--class-names {class_file}")
        classes = names
    name_of = {ours: name for name, ours in aliases.items()}
    records = [EvalRecord(record_id=ref.record_id, path=os.path.join(root, ref.path),
                          fold=ref.strat_fold, report=ref.report,
                          labels=_multi_hot([name_of[n] for n in ref.labels[task]
                                             if n in name_of], classes) if task else None)
               for ref in list_ptbxl(root, sample_rate=sample_rate)]
    return records, classes, aliases


def _physionet_records(dataset: str, root: str, min_count: int, class_file: str | None = None
                       ) -> tuple[list[EvalRecord], list[str], dict[str, str]]:
    from melp_ray.data import physionet
    from melp_ray.eval import class_lists

    listed = physionet.list_physionet_records(root)
    source = f"--class-names {class_file}"
    if dataset == "cpsc2018":
        classes = list(physionet.CPSC2018_CLASSES)
        aliases = {c: c for c in classes}
        if class_file:
            classes = _class_file_names(class_file, dataset, None)
            aliases = _or_eval_error(class_lists.match_cpsc2018_names, classes, source)
        label = functools.partial(
            physionet.labels_from_codes, classes=classes,
            code_groups={c: physionet.CPSC2018_CODES[aliases[c]] for c in classes})
    else:  # Chapman-Shaoxing: SNOMED codes as classes (see physionet.py)
        if class_file:
            classes = _class_file_names(class_file, dataset, None)
            _or_eval_error(class_lists.check_snomed_names, classes, source)
        else:  # the codes frequent in this data
            classes = physionet.frequent_dx_classes(listed, min_count=min_count)
        if not classes:
            raise EvalError(f"no SNOMED code occurs in >= {min_count} records under {root}; "
                            "lower --min-count")
        aliases = {c: c for c in classes}
        label = functools.partial(physionet.labels_from_codes, classes=classes)
    records = [EvalRecord(record_id=rec.record_id, path=str(rec.header_path),
                          fold=physionet_fold(rec.record_id), labels=label(rec.dx_codes))
               for rec in listed]
    return records, classes, aliases


def _class_file_names(class_file: str, dataset: str, task: str | None) -> list[str]:
    from melp_ray.eval import class_lists

    key = class_lists.reference_task_key(dataset, task)
    return _or_eval_error(class_lists.read_class_names, class_file, key)


def _or_eval_error(function, *args):
    """``function(*args)``, its ValueError (bad input file) reported as an EvalError."""
    try:
        return function(*args)
    except ValueError as err:
        raise EvalError(f"--class-names: {err}" if "--class-names" not in str(err)
                        else str(err)) from None


# ---------------------------------------------------------------- the plan

def checkpoint_info(path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, model config dict, data config dict) of a training checkpoint or an export."""
    from melp_ray import checkpoint as ckpt
    from melp_ray import storage

    local = path if storage.is_uri(path) else storage.normalise_storage_path(path)
    if not storage.is_uri(path) and not os.path.exists(local):
        raise EvalError(f"--checkpoint {path} does not exist")
    if not storage.is_uri(path) and ckpt.is_exported_folder(local):
        config = storage.read_json(storage.join(local, "config.json"))
        data = {"sample_rate": config.get("sample_rate"), "seconds": config.get("seconds")}
        return "exported folder", config.get("melp", {}), data
    try:
        config = ckpt.checkpoint_config(path)
    except FileNotFoundError as err:
        raise EvalError(f"--checkpoint: {err}, nor an exported folder (config.json with "
                        "model_type melp_ray)") from None
    return "training checkpoint", config["model"], config.get("data", {})


def build_plan(args: argparse.Namespace) -> Plan:
    """Check every argument against the data and the checkpoint; no Ray, no model weights."""
    _check_option_combinations(args)
    if args.dataset == "shards":
        from melp_ray.eval.shard_source import check_shard_root

        root, manifest = check_shard_root(args.root)
    else:
        root, manifest = _check_root(args.dataset, args.root), None
    kind, _, data_cfg = checkpoint_info(args.checkpoint)
    sample_rate = args.sample_rate or data_cfg.get("sample_rate")
    seconds = args.seconds or data_cfg.get("seconds")
    if not sample_rate or not seconds:
        raise EvalError(f"the {kind} does not record its input sample rate/length; "
                        "pass --sample-rate and --seconds")
    _check_length(sample_rate, seconds)
    _check_crop(args.crop_seconds, sample_rate, seconds)

    task = None
    if args.dataset in ("ptb-xl", "shards") and args.mode not in REPORT_MODES:
        task = args.task or "super"
    split_names = ("train", "val", "test") if args.mode == "linear" else ("test",)
    split_files: dict[str, str] = {}
    if args.report_split:   # records and reference reports from the file
        splits, excluded = _report_split_records(root, int(sample_rate), args.report_split)
        classes, aliases, folds, split_files = [], {}, {}, {"test": args.report_split}
    elif args.split_dir:  # records, labels and classes from the reference's split files
        splits, classes, excluded, split_files = _split_dir_records(
            args.dataset, root, task, int(sample_rate), args.split_dir, split_names,
            args.class_names)
        aliases = _default_aliases(args.dataset, root, task, classes)
        folds: dict[str, list[int]] = {}
    else:
        if args.dataset == "shards":
            records, classes, aliases = _shard_records(root, manifest, task)
        elif args.dataset == "ptb-xl":
            records, classes, aliases = _ptbxl_records(root, task, int(sample_rate),
                                                       args.class_names)
        else:
            records, classes, aliases = _physionet_records(args.dataset, root,
                                                           args.min_count, args.class_names)
        splits, excluded, folds = _fold_splits(records, root, args, split_names)

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


def _fold_splits(records: list[EvalRecord], root: str, args, split_names
                 ) -> tuple[dict[str, list[EvalRecord]], dict[str, list[str]],
                            dict[str, list[int]]]:
    """Records per split by fold (PTB-XL strat_fold, PhysioNet pseudo-fold)."""
    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):  # results are aligned by record id
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise EvalError(f"--root {root}: record ids are not unique (e.g. {dupes})")
    folds = {s: parse_folds(getattr(args, f"{s}_folds") or DEFAULT_FOLDS[s], f"--{s}-folds")
             for s in split_names}
    _check_disjoint(folds)
    available = sorted({r.fold for r in records})
    splits: dict[str, list[EvalRecord]] = {}
    excluded: dict[str, list[str]] = {}
    for split in split_names:
        in_folds = [r for r in records if r.fold in folds[split]]
        if not in_folds:
            raise EvalError(f"--{split}-folds {_fmt_folds(folds[split])}: no record of {root} "
                            f"is in these folds (folds present: {_fmt_folds(available)})")
        kept = _drop_unusable(in_folds, args.mode, excluded)
        if not kept:
            raise EvalError(f"--{split}-folds {_fmt_folds(folds[split])}: every record was "
                            f"left out ({ {k: len(v) for k, v in excluded.items()} })")
        splits[split] = kept
    return splits, excluded, folds


def _split_dir_records(dataset: str, root: str, task: str | None, sample_rate: int,
                       split_dir: str, split_names, class_file: str | None):
    """Records, labels and classes of each split from the reference's split CSVs.

    Every row is used with the file's labels; rows whose record is not under --root are
    left out and named under ``missing_file``. Returns (splits, classes, excluded, files).
    """
    from melp_ray.eval import class_lists
    from melp_ray.eval import splits as S

    key = class_lists.reference_task_key(dataset, task)
    files = {split: S.split_path(split_dir, key, split) for split in split_names}
    try:
        tables = {split: S.read_split_csv(path, dataset) for split, path in files.items()}
    except S.SplitFileError as err:
        raise EvalError(f"--split-dir: {err}") from None
    classes = tables[split_names[0]].classes
    for table in tables.values():
        if table.classes != classes:
            raise EvalError(f"--split-dir: {table.path} has label columns {table.classes}, "
                            f"{tables[split_names[0]].path} has {classes}")
    order = list(range(len(classes)))
    if class_file:
        names = _class_file_names(class_file, dataset, task)
        if set(names) != set(classes):
            raise EvalError(f"--class-names {class_file} lists {sorted(set(names) - set(classes))} "
                            f"not in the split files and misses {sorted(set(classes) - set(names))}")
        order = [classes.index(n) for n in names]
        classes = names
    headers = S.HeaderIndex(root)
    seen: dict[str, str] = {}
    splits: dict[str, list[EvalRecord]] = {}
    excluded: dict[str, list[str]] = {}
    for split, table in tables.items():
        kept = []
        for row in table.rows:
            record = _split_row_record(dataset, root, row, sample_rate, headers, order)
            where = f"{table.path} line {row.line}"
            if record.record_id in seen:
                raise EvalError(f"--split-dir: record {record.record_id} in {where} is also in "
                                f"{seen[record.record_id]}")
            seen[record.record_id] = where
            exists = record.path + ".hea" if dataset == "ptb-xl" else record.path
            if os.path.isfile(exists):
                kept.append(record)
            else:
                excluded.setdefault("missing_file", []).append(record.record_id)
        if not kept:
            raise EvalError(f"--split-dir: none of the {len(table.rows)} records of "
                            f"{table.path} is under --root {root}")
        splits[split] = kept
    return splits, classes, excluded, {s: str(p) for s, p in files.items()}


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


def _split_row_record(dataset: str, root: str, row, sample_rate: int, headers, order
                      ) -> EvalRecord:
    from melp_ray.eval import splits as S

    labels = row.labels[order]
    if dataset == "ptb-xl":
        record_id, path, fold = S.ptbxl_record(root, row.metadata, sample_rate)
        return EvalRecord(record_id=record_id, path=path, fold=fold, labels=labels)
    if dataset == "cpsc2018":
        record_id, path = S.cpsc2018_record(root, row.metadata, headers)
    else:
        record_id, path = S.chapman_record(root, row.metadata)
    return EvalRecord(record_id=record_id, path=path, fold=0, labels=labels)


def _default_aliases(dataset: str, root: str, task: str | None, classes: list[str]
                     ) -> dict[str, str]:
    """Class name -> our label name where one matches (for default prompts); others none."""
    from melp_ray.data.physionet import CPSC2018_CLASSES
    from melp_ray.data.ptbxl import class_names
    from melp_ray.eval.class_lists import ICBEB_TO_CPSC2018

    if dataset == "ptb-xl":
        ours = class_names(task, root)
        by_bare = {n.strip("_"): n for n in ours}
        return {c: c if c in ours else by_bare[c.strip("_")] for c in classes
                if c in ours or c.strip("_") in by_bare}
    if dataset == "cpsc2018":
        known = {**ICBEB_TO_CPSC2018, **{c: c for c in CPSC2018_CLASSES}}
        return {c: known[c] for c in classes if c in known}
    return {c: c for c in classes}


# ---------------------------------------------------------------- checks behind build_plan

def _check_option_combinations(args) -> None:
    only = [("--fraction", args.fraction is not None, "linear"),
            ("--train-folds", args.train_folds is not None, "linear"),
            ("--val-folds", args.val_folds is not None, "linear"),
            ("--prompts", args.prompts is not None, "zeroshot"),
            ("--prompt-format", args.prompt_format != "auto", "zeroshot")]
    for option, given, mode in only:
        if given and args.mode != mode:
            raise EvalError(f"{option} only applies to --mode {mode}")
    if args.dataset == "shards":
        for option, value in (("--split-dir", args.split_dir), ("--class-names", args.class_names)):
            if value is not None:
                raise EvalError(f"{option} does not apply to --dataset shards (the shards "
                                "hold their records' folds and labels)")
    if args.task is not None and args.dataset not in ("ptb-xl", "shards"):
        raise EvalError(f"--task selects a PTB-XL label set; {args.dataset} has one fixed "
                        "label set (leave --task out)")
    if args.task is not None and args.mode in REPORT_MODES:
        raise EvalError(f"--task has no effect on --mode {args.mode} (leave it out)")
    if args.mode in REPORT_MODES and args.dataset not in ("ptb-xl", "shards"):
        raise EvalError(f"--mode {args.mode} needs free-text reports; {args.dataset} has none "
                        "(use --dataset ptb-xl)")
    if args.max_new_tokens is not None and args.mode != "generation":
        raise EvalError("--max-new-tokens only applies to --mode generation")
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
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
                               ("--actors", args.actors, 1),
                               ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < low:
            raise EvalError(f"{option} must be >= {low}, got {value}")
    out = Path(args.out)
    if not storage.is_uri(args.out) and out.exists() and not out.is_dir():
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


def _check_root(dataset: str, root: str) -> str:
    from melp_ray.data.ptbxl import DATABASE_CSV, STATEMENTS_CSV

    path = Path(root).expanduser()
    if not path.is_dir():
        raise EvalError(f"--root {root} is not an existing folder")
    if dataset == "ptb-xl":
        missing = [f for f in (DATABASE_CSV, STATEMENTS_CSV) if not (path / f).is_file()]
        if missing:
            raise EvalError(f"--root {root} is not a PTB-XL folder (no {', '.join(missing)})")
    elif not any(path.rglob("*.hea")):
        raise EvalError(f"--root {root} holds no PhysioNet .hea headers for {dataset}")
    return str(path.resolve())


def _check_length(sample_rate, seconds) -> None:
    from melp_ray.data.records import n_samples_for

    try:
        n_samples_for(sample_rate, seconds)
    except ValueError as err:
        raise EvalError(f"--sample-rate/--seconds: {err}") from None


def _check_crop(crop_seconds, sample_rate, seconds) -> None:
    if crop_seconds is None:
        return
    if not 0 < crop_seconds <= seconds:
        raise EvalError(f"--crop-seconds must be in (0, --seconds={seconds}], got {crop_seconds}")
    try:
        _check_length(sample_rate, crop_seconds)
    except EvalError as err:
        raise EvalError(f"--crop-seconds: {err}") from None


def _check_disjoint(folds: dict[str, list[int]]) -> None:
    names = list(folds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(folds[a]) & set(folds[b]))
            if shared:
                raise EvalError(f"--{a}-folds and --{b}-folds share folds {_fmt_folds(shared)}")


def _fmt_folds(folds) -> str:
    return ",".join(str(f) for f in folds) or "none"


def _drop_unusable(records: list[EvalRecord], mode: str,
                   excluded: dict[str, list[str]]) -> list[EvalRecord]:
    """Leave out records the mode cannot use, named under their reason.

    Classification: a record with no label of the task (the PTB-XL benchmark convention;
    e.g. a record with only non-diagnostic statements has no superclass). Retrieval and
    generation: a record with an empty report (nothing to retrieve or score against).
    """
    kept = []
    for r in records:
        if mode in REPORT_MODES:
            reason = None if r.report.strip() else "empty_report"
        else:
            reason = None if r.labels.any() else "no_label"
        if reason:
            excluded.setdefault(reason, []).append(r.record_id)
        else:
            kept.append(r)
    return kept


def _prompt_format(args) -> str:
    from melp_ray.eval.prompts import prompt_file_format

    try:
        return prompt_file_format(args.prompts, args.prompt_format)
    except ValueError as err:
        raise EvalError(f"--prompts: {err}") from None


def _resolve_prompts(dataset: str, root: str, classes: list[str], prompt_file: str | None,
                     prompt_format: str = "auto", aliases: dict[str, str] | None = None):
    """Prompts per class; a class named after one of ours (``aliases``: name -> our label
    name, from --class-names) gets our label's default prompt."""
    from melp_ray.data import physionet
    from melp_ray.eval import prompts as P

    if dataset == "ptb-xl":
        defaults = P.ptbxl_descriptions(Path(root) / "scp_statements.csv")
    elif dataset == "cpsc2018":
        defaults = physionet.CPSC2018_DESCRIPTIONS
    else:
        defaults = physionet.SNOMED_DESCRIPTIONS
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
