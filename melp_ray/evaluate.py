"""Evaluate a MELP model: zero-shot classification, linear probing, ECG<->report retrieval.

    python -m melp_ray.evaluate --checkpoint RUN_OR_CKPT_OR_EXPORT --dataset ptb-xl \\
        --root /data/ptb-xl --task super --mode zeroshot --out results/zs_super
    python -m melp_ray.evaluate ... --mode linear --fraction 0.01 --out results/lp_1pct
    python -m melp_ray.evaluate ... --mode retrieval --out results/retrieval

Everything that can be checked without Ray (paths, the checkpoint, folds, prompts, option
combinations) is checked first, so a typo fails in a second, not after the cluster starts.
Embeddings are computed with Ray Data batch inference (``melp_ray.eval.inference``): the
records are read with wfdb and min-max normalised on Ray Data workers and encoded by an
actor pool (one GPU per actor when the cluster has GPUs). Records that cannot be read are
counted and named in results.json under "records", never silently dropped.

Splits: PTB-XL uses its ``strat_fold`` (default train 1-8, val 9, test 10). CPSC2018 and
Chapman-Shaoxing ship no folds, so each record gets a fixed pseudo-fold 1-10 from a hash of
its record id (``physionet_fold``): the same fold options then work on every dataset and
the split never changes between runs or machines.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("ptb-xl", "cpsc2018", "chapman")
MODES = ("zeroshot", "linear", "retrieval")
PTBXL_TASKS = ("super", "sub", "form", "rhythm")
N_PSEUDO_FOLDS = 10
DEFAULT_FOLDS = {"train": "1-8", "val": "9", "test": "10"}
DEFAULT_CHAPMAN_MIN_COUNT = 10


class EvalError(ValueError):
    """Bad arguments or unusable data, found before any work starts."""


# ---------------------------------------------------------------- what to evaluate

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
    settings: dict[str, Any] = field(default_factory=dict)


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


def _ptbxl_records(root: str, task: str | None, sample_rate: int
                   ) -> tuple[list[EvalRecord], list[str]]:
    from melp_ray.data.ptbxl import class_names, list_ptbxl

    classes = class_names(task, root) if task else []
    records = [EvalRecord(record_id=ref.record_id, path=os.path.join(root, ref.path),
                          fold=ref.strat_fold, report=ref.report,
                          labels=_multi_hot(ref.labels[task], classes) if task else None)
               for ref in list_ptbxl(root, sample_rate=sample_rate)]
    return records, classes


def _physionet_records(dataset: str, root: str, min_count: int
                       ) -> tuple[list[EvalRecord], list[str]]:
    from melp_ray.data import physionet

    listed = physionet.list_physionet_records(root)
    if dataset == "cpsc2018":
        classes = list(physionet.CPSC2018_CLASSES)
        label = physionet.cpsc2018_labels
    else:  # Chapman-Shaoxing: the SNOMED codes frequent in this data (see physionet.py)
        classes = physionet.frequent_dx_classes(listed, min_count=min_count)
        if not classes:
            raise EvalError(f"no SNOMED code occurs in >= {min_count} records under {root}; "
                            "lower --min-count")
        label = functools.partial(physionet.labels_from_codes, classes=classes)
    records = [EvalRecord(record_id=rec.record_id, path=str(rec.header_path),
                          fold=physionet_fold(rec.record_id), labels=label(rec.dx_codes))
               for rec in listed]
    return records, classes


def _checkpoint_info(path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
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
                        "model_type melp)") from None
    return "training checkpoint", config["model"], config.get("data", {})


def build_plan(args: argparse.Namespace) -> Plan:
    """Check every argument against the data and the checkpoint; no Ray, no model weights."""
    _check_option_combinations(args)
    root = _check_root(args.dataset, args.root)
    kind, _, data_cfg = _checkpoint_info(args.checkpoint)
    sample_rate = args.sample_rate or data_cfg.get("sample_rate")
    seconds = args.seconds or data_cfg.get("seconds")
    if not sample_rate or not seconds:
        raise EvalError(f"the {kind} does not record its input sample rate/length; "
                        "pass --sample-rate and --seconds")
    _check_length(sample_rate, seconds)

    task = None
    if args.dataset == "ptb-xl" and args.mode != "retrieval":
        task = args.task or "super"
    if task is not None:
        records, classes = _ptbxl_records(root, task, int(sample_rate))
    elif args.dataset == "ptb-xl":
        records, classes = _ptbxl_records(root, None, int(sample_rate))
    else:
        records, classes = _physionet_records(args.dataset, root, args.min_count)

    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):  # results are aligned by record id
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise EvalError(f"--root {root}: record ids are not unique (e.g. {dupes})")
    split_names = ("train", "val", "test") if args.mode == "linear" else ("test",)
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

    prompts = None
    if args.mode == "zeroshot":
        prompts = _resolve_prompts(args.dataset, root, classes, args.prompts)
    if args.mode == "linear":
        _check_probe_labels(splits, classes)

    plan = Plan(mode=args.mode, dataset=args.dataset, root=root, out=Path(args.out),
                checkpoint=args.checkpoint, checkpoint_kind=kind, sample_rate=int(sample_rate),
                seconds=float(seconds), task=task, class_names=classes, splits=splits,
                folds=folds, excluded=excluded, prompts=prompts)
    plan.settings = {
        "mode": args.mode, "dataset": args.dataset, "root": root, "task": task,
        "checkpoint": args.checkpoint, "checkpoint_kind": kind,
        "random_init": args.random_init, "sample_rate": plan.sample_rate,
        "seconds": plan.seconds, "folds": folds,
        "n_records": {s: len(v) for s, v in splits.items()},
        "batch_size": args.batch_size, "seed": args.seed,
        **({"bootstrap": args.bootstrap} if args.mode != "retrieval" else {}),
        **({"fraction": args.fraction} if args.mode == "linear" else {}),
        **({"prompts_file": args.prompts} if args.mode == "zeroshot" else {}),
        **({"min_count": args.min_count} if args.dataset == "chapman" else {}),
    }
    return plan


def _check_option_combinations(args) -> None:
    only = [("--fraction", args.fraction is not None, "linear"),
            ("--train-folds", args.train_folds is not None, "linear"),
            ("--val-folds", args.val_folds is not None, "linear"),
            ("--prompts", args.prompts is not None, "zeroshot")]
    for option, given, mode in only:
        if given and args.mode != mode:
            raise EvalError(f"{option} only applies to --mode {mode}")
    if args.task is not None and args.dataset != "ptb-xl":
        raise EvalError(f"--task selects a PTB-XL label set; {args.dataset} has one fixed "
                        "label set (leave --task out)")
    if args.task is not None and args.mode == "retrieval":
        raise EvalError("--task has no effect on --mode retrieval (leave it out)")
    if args.mode == "retrieval" and args.dataset != "ptb-xl":
        raise EvalError(f"--mode retrieval needs free-text reports; {args.dataset} has none "
                        "(use --dataset ptb-xl)")
    if args.min_count is not None and args.dataset != "chapman":
        raise EvalError("--min-count only applies to --dataset chapman")
    if args.min_count is None:
        args.min_count = DEFAULT_CHAPMAN_MIN_COUNT
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise EvalError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise EvalError(f"--prompts {args.prompts} is not a file")
    for option, value, low in (("--batch-size", args.batch_size, 1),
                               ("--bootstrap", args.bootstrap, 0),
                               ("--actors", args.actors, 1)):
        if value is not None and value < low:
            raise EvalError(f"{option} must be >= {low}, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a folder")


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
    e.g. a record with only non-diagnostic statements has no superclass). Retrieval: a
    record with an empty report (nothing to retrieve).
    """
    kept = []
    for r in records:
        if mode == "retrieval":
            reason = None if r.report.strip() else "empty_report"
        else:
            reason = None if r.labels.any() else "no_label"
        if reason:
            excluded.setdefault(reason, []).append(r.record_id)
        else:
            kept.append(r)
    return kept


def _resolve_prompts(dataset: str, root: str, classes: list[str], prompt_file: str | None):
    from melp_ray.data import physionet
    from melp_ray.eval import prompts as P

    if dataset == "ptb-xl":
        defaults = P.ptbxl_descriptions(Path(root) / "scp_statements.csv")
    elif dataset == "cpsc2018":
        defaults = physionet.CPSC2018_DESCRIPTIONS
    else:
        defaults = physionet.SNOMED_DESCRIPTIONS
    try:
        return P.resolve_prompts(classes, defaults, prompt_file)
    except (KeyError, ValueError) as err:
        raise EvalError(f"prompts: {err}") from None


def _check_probe_labels(splits: dict[str, list[EvalRecord]], classes: list[str]) -> None:
    from melp_ray.eval.metrics import scorable_classes

    for split in ("val", "test"):
        y = np.stack([r.labels for r in splits[split]])
        if not scorable_classes(y).any():
            raise EvalError(f"--{split}-folds: no class has both positive and negative records "
                            f"({len(y)} records), so AUROC is undefined; use more folds")


# ---------------------------------------------------------------- models

def build_model(checkpoint: str, random_init: bool = False, seed: int = 0):
    """The MELP to evaluate; picklable via functools.partial for the Ray actors.

    ``random_init``: the same architecture (the checkpoint's ModelConfig), seeded, no
    trained weights loaded; the baseline that shows what pretraining bought.
    """
    import torch

    from melp_ray.checkpoint import load_model
    from melp_ray.config import model_config_from_dict

    if not random_init:
        return load_model(checkpoint).eval()
    from melp_ray.model import MELP

    kind, model_cfg, _ = _checkpoint_info(checkpoint)
    if kind == "exported folder":
        # An export names its text tower relative to the folder; hf.py resolves it.
        from melp_ray.hf import MELPHFConfig, runtime_model_config

        cfg = runtime_model_config(MELPHFConfig.from_pretrained(checkpoint))
    else:
        cfg = model_config_from_dict(model_cfg)
    with torch.random.fork_rng(devices=[]):  # same weights in every actor, global RNG untouched
        torch.manual_seed(seed)
        model = MELP(cfg)
    return model.eval()


# ---------------------------------------------------------------- Ray Data side

def read_record(dataset: str, path: str, sample_rate: int, seconds: float) -> np.ndarray:
    """One record as float32 (12, sample_rate*seconds) in mV; raises RecordRejected."""
    from melp_ray.data.records import RecordRef, RecordRejected, UNREADABLE, fit_signal, load_signal

    if dataset == "ptb-xl":
        ref = RecordRef(record_id="", subject_id="", dataset=dataset, path=path, report="")
        return load_signal(ref, None, sample_rate, seconds)
    from melp_ray.data.physionet import PhysioNetFormatError, load_physionet_signal

    try:
        signal, fs = load_physionet_signal(path)
    except (PhysioNetFormatError, OSError) as err:
        raise RecordRejected(UNREADABLE, str(err)) from None
    return fit_signal(signal, fs, sample_rate, seconds)


def load_batch(batch: dict[str, np.ndarray], dataset: str, sample_rate: int,
               seconds: float) -> dict[str, np.ndarray]:
    """Ray Data map_batches: paths -> normalised signals, plus why a record was rejected.

    A rejected record keeps its row (zeros as signal, the reason in ``rejected``) so one
    pass both encodes the good records and names the bad ones; the driver drops it.
    """
    from melp_ray.data.records import RecordRejected, n_samples_for
    from melp_ray.data.stream import minmax_normalise

    n = n_samples_for(sample_rate, seconds)
    signals, reasons = [], []
    for path in batch["path"]:
        try:
            signals.append(minmax_normalise(read_record(dataset, str(path), sample_rate,
                                                        seconds)))
            reasons.append("")
        except RecordRejected as err:
            signals.append(np.zeros((12, n), dtype=np.float32))
            reasons.append(str(err))
    out = {k: v for k, v in batch.items() if k != "path"}
    out["ecg"] = np.stack(signals)
    out["rejected"] = np.array(reasons, dtype=object)
    return out


def embed_records(plan: Plan, records: list[EvalRecord], outputs: dict[str, tuple[str, str]],
                  model_fn, batch_size: int, actors: int | None) -> dict[str, np.ndarray]:
    """Embedding columns for ``records``, sorted by record_id, with a ``rejected`` column."""
    import ray.data

    from melp_ray.eval.inference import collect_columns, extract_embeddings

    items = [{"record_id": r.record_id, "path": r.path, "report": r.report} for r in records]
    blocks = max(1, min(len(items) // max(batch_size, 1), 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(load_batch, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"dataset": plan.dataset, "sample_rate": plan.sample_rate,
                                   "seconds": plan.seconds})
    ds = extract_embeddings(ds, model_fn, outputs=outputs, batch_size=batch_size,
                            concurrency=actors)
    data = collect_columns(ds, [*outputs, "rejected"], sort_by="record_id")
    if len(data["record_id"]) != len(records):
        raise RuntimeError(f"inference returned {len(data['record_id'])} rows for "
                           f"{len(records)} records")
    return data


def _split_rejected(data: dict[str, np.ndarray], accounting: dict) -> dict[str, np.ndarray]:
    """Drop rejected rows, naming them (reason -> ids) in ``accounting``."""
    rejected = np.array([bool(r) for r in data["rejected"]], dtype=bool)
    for rid, why in zip(data["record_id"][rejected], data["rejected"][rejected]):
        reason = str(why).split(":", 1)[0]
        accounting.setdefault("rejected", {}).setdefault(reason, []).append(str(rid))
        accounting.setdefault("rejected_detail", {})[str(rid)] = str(why)
    return {k: v[~rejected] for k, v in data.items() if k != "rejected"}


# ---------------------------------------------------------------- the three modes

def _labels(records: list[EvalRecord], ids) -> np.ndarray:
    by_id = {r.record_id: r.labels for r in records}
    return np.stack([by_id[str(i)] for i in ids])


def run_zeroshot(plan: Plan, model_fn, args, accounting) -> dict[str, Any]:
    import torch

    from melp_ray.eval.zero_shot import evaluate_zero_shot, prompt_embeddings

    model = model_fn()   # in the driver: only the class prompts (a few strings) go through it
    with torch.inference_mode():
        prompt_emb = prompt_embeddings(
            lambda texts: model.encode_reports(texts).float().numpy(), plan.prompts)
    test = plan.splits["test"]
    data = embed_records(plan, test, {"ecg_emb": ("encode_ecg", "ecg")}, model_fn,
                         args.batch_size, args.actors)
    data = _split_rejected(data, accounting.setdefault("test", {}))
    _require_rows(data, "test")
    y = _labels(test, data["record_id"])
    result = evaluate_zero_shot(data["ecg_emb"], prompt_emb, y, plan.class_names,
                                n_bootstrap=args.bootstrap, seed=args.seed)
    result["prompts"] = dict(zip(plan.class_names, plan.prompts))
    return _write_classification(plan, result, y, result.pop("scores"), accounting)


def run_linear(plan: Plan, model_fn, args, accounting) -> dict[str, Any]:
    from melp_ray.eval.linear_probe import ProbeConfig, train_linear_probe

    # One inference pass over all three splits (one actor pool start), split afterwards.
    everything = [r for split in ("train", "val", "test") for r in plan.splits[split]]
    data = embed_records(plan, everything, {"ecg_feat": ("ecg_features", "ecg")}, model_fn,
                         args.batch_size, args.actors)
    row_of = {rid: i for i, rid in enumerate(data["record_id"])}
    features, labels = {}, {}
    for split in ("train", "val", "test"):
        records = plan.splits[split]
        rows = np.array([row_of[r.record_id] for r in records])
        part = _split_rejected({k: v[rows] for k, v in data.items()},
                               accounting.setdefault(split, {}))
        _require_rows(part, split)
        features[split], labels[split] = part["ecg_feat"], _labels(records, part["record_id"])
    probe = train_linear_probe(features["train"], labels["train"], features["val"],
                               labels["val"], features["test"], labels["test"],
                               class_names=plan.class_names, fraction=args.fraction or 1.0,
                               config=ProbeConfig(seed=args.seed), n_bootstrap=args.bootstrap)
    return _write_classification(plan, probe.to_dict(), labels["test"], probe.test_scores,
                                 accounting)


def run_retrieval(plan: Plan, model_fn, args, accounting) -> dict[str, Any]:
    from melp_ray.eval.metrics import recall_at_k
    from melp_ray.eval.report import write_retrieval_report

    outputs = {"ecg_emb": ("encode_ecg", "ecg"), "text_emb": ("encode_reports", "report")}
    data = embed_records(plan, plan.splits["test"], outputs, model_fn, args.batch_size,
                         args.actors)
    data = _split_rejected(data, accounting.setdefault("test", {}))
    _require_rows(data, "test")
    reports = {r.record_id: r.report for r in plan.splits["test"]}
    sim = report_similarity(data["ecg_emb"], [reports[str(i)] for i in data["record_id"]],
                            data["text_emb"])
    recalls = recall_at_k(sim, ks=(1, 5, 10))
    write_retrieval_report(plan.out, recalls, plan.settings, task="ptb-xl retrieval")
    return _finish(plan, {**recalls, "n_pairs": int(len(data["record_id"]))}, accounting)


def report_similarity(ecg_emb: np.ndarray, texts: list[str], text_emb: np.ndarray
                      ) -> np.ndarray:
    """(N, N) cosine of ECG i and report j, identical reports giving identical columns.

    PTB-XL repeats reports verbatim ("sinus rhythm. normal ecg."), so a query often has
    several equally right candidates, and recall_at_k counts such exact ties against the
    query. A tie must stay exact: each distinct text is scored once (its first row's
    embedding) and the column copied, because the same text encoded in another batch, or
    the same dot product at another position of a matrix product, can differ in the last
    bits and turn the tie into a coin flip. Float64: the similarities of a weak model
    differ in the 4th digit, and float32 rounding would reorder near-ties.
    """
    first: dict[str, int] = {}
    rows = [first.setdefault(text, row) for row, text in enumerate(texts)]
    distinct = sorted(first.values())
    column_of = {row: col for col, row in enumerate(distinct)}
    # Both sides are L2-normalised by the model, so the dot product is the cosine.
    sim = ecg_emb.astype(np.float64) @ text_emb[distinct].astype(np.float64).T
    return sim[:, [column_of[row] for row in rows]]


def _require_rows(data: dict[str, np.ndarray], split: str) -> None:
    if len(data["record_id"]) == 0:
        raise RuntimeError(f"every record of the {split} split was rejected; see the "
                           "rejection reasons above")


def _write_classification(plan: Plan, result: dict, y, scores, accounting) -> dict[str, Any]:
    from melp_ray.eval.report import write_classification_report

    name = f"{plan.dataset} {plan.task or ''} {plan.mode}".replace("  ", " ")
    write_classification_report(plan.out, name, result, y, scores, plan.class_names,
                                plan.settings)
    return _finish(plan, {}, accounting)


def _finish(plan: Plan, extra: dict[str, Any], accounting: dict) -> dict[str, Any]:
    """Add record accounting (and ``extra``) to results.json and results.md."""
    from melp_ray.eval.report import RESULTS_JSON, RESULTS_MD

    records = {"excluded_before_loading": plan.excluded}
    for split, acc in accounting.items():
        records[split] = {"used": plan.settings["n_records"][split]
                          - sum(len(v) for v in acc.get("rejected", {}).values()),
                          "rejected": acc.get("rejected", {}),
                          "rejected_detail": acc.get("rejected_detail", {})}
    path = plan.out / RESULTS_JSON
    results = json.loads(path.read_text())
    results.update(extra)
    results["records"] = records
    path.write_text(json.dumps(results, indent=2) + "\n")

    lines = ["", "## Records", "", "| split | used | rejected |", "|---|---|---|"]
    for split in plan.splits:
        rejected = records[split]["rejected"]
        reasons = ", ".join(f"{len(ids)} {reason}" for reason, ids in rejected.items())
        lines.append(f"| {split} | {records[split]['used']} | "
                     f"{sum(len(v) for v in rejected.values())}"
                     f"{f' ({reasons})' if reasons else ''} |")
    if plan.excluded:
        lines += ["", "Left out before loading: " + ", ".join(
            f"{len(ids)} {reason}" for reason, ids in plan.excluded.items())]
    with open(plan.out / RESULTS_MD, "a") as f:
        f.write("\n".join(lines) + "\n")
    return results


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Check the arguments, run the mode on Ray, write OUT/results.*; returns results.json."""
    plan = build_plan(args)
    from melp_ray.ray_utils import quiet_data_progress_bars
    from melp_ray.ray_utils import init_ray

    init_ray()
    quiet_data_progress_bars()
    model_fn = functools.partial(build_model, plan.checkpoint, args.random_init, args.seed)
    run = {"zeroshot": run_zeroshot, "linear": run_linear, "retrieval": run_retrieval}
    return run[plan.mode](plan, model_fn, args, {})


# ---------------------------------------------------------------- command line

def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m melp_ray.evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a MELP model: zero-shot classification, linear probing on\n"
                    "frozen ECG features, or ECG<->report retrieval. Writes OUT/results.json,\n"
                    "OUT/results.md and, for classification, OUT/roc.png.",
        epilog="examples:\n"
               "  python -m melp_ray.evaluate --checkpoint RUN_DIR --dataset ptb-xl \\\n"
               "      --root /data/ptb-xl --task super --mode zeroshot --out results/zs\n"
               "  python -m melp_ray.evaluate ... --mode linear --fraction 0.01 \\\n"
               "      --train-folds 1-8 --val-folds 9 --test-folds 10 --out results/lp1\n"
               "  python -m melp_ray.evaluate ... --mode retrieval --out results/ret\n\n"
               "PTB-XL splits use strat_fold. CPSC2018/Chapman records get a fixed "
               "pseudo-fold 1-10\nfrom a hash of the record id, so the same fold options "
               "apply.")
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (any ZeRO stage), a run folder (its latest "
                        "checkpoint), a URI, or a folder from python -m melp_ray.export")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True,
                   help="dataset folder (PTB-XL: ptbxl_database.csv + records100/500; "
                        "CPSC2018/Chapman: PhysioNet Challenge .hea/.mat files)")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--out", required=True, help="output folder (created)")
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
    p.add_argument("--prompts", help="zeroshot only: YAML/JSON class -> prompt(s); overrides "
                                     "the default prompts per class")
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
    p.add_argument("--min-count", type=int,
                   help=f"chapman only: classes = SNOMED codes in >= N records (default "
                        f"{DEFAULT_CHAPMAN_MIN_COUNT})")
    p.add_argument("--actors", type=int,
                   help="inference actors (default: one per GPU, or 1 without GPUs)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        results = evaluate(args)
    except EvalError as err:
        parser.error(str(err))  # exit code 2, usage + message, before Ray starts
    headline = ("recall@1", "recall@5", "recall@10") if args.mode == "retrieval" \
        else ("macro_auroc", "ci")
    print(json.dumps({k: results.get(k) for k in headline}))
    print(f"[melp_ray] wrote {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
