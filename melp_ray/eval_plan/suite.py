"""A benchmark suite file (YAML), read and checked completely before Ray starts.

    bootstrap: 1000             # replicates of each AUROC's CI
    fractions: [0.01, 0.1, 1.0] # linear probe: shares of the training split
    seeds: [0]                  # linear probe: subsample + probe seeds (mean reported)
    modes: [zeroshot, linear]
    datasets:
      ptb-xl:
        root: null              # null: the PTB-XL sample shipped in the package
        tasks: [super, sub, form, rhythm]
        folds: {train: 1-8, val: 9, test: 10}
      cpsc2018: {root: /data/cpsc2018, crop_seconds: 5}

Every dataset entry may override ``modes``, ``fractions`` and ``seeds`` and takes the
options of ``python -m melp_ray.evaluate`` for it: ``prompts``, ``prompt_format``,
``split_dir``, ``class_names``, ``crop_seconds``, ``min_count``, ``folds``. A relative path
is relative to the working directory, as on the evaluate command line. A root that does not
exist is not an error: the benchmark skips that dataset and names the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from melp_ray.eval_plan.plan import DATASETS, PTBXL_TASKS, EvalError

SUITE_MODES = ("zeroshot", "linear")
TOP_KEYS = {"bootstrap", "batch_size", "fractions", "seeds", "modes", "random_init_seed",
            "datasets"}
# suite key -> evaluate option; each is passed through to build_plan, which checks it.
FILE_OPTIONS = {"prompts": "--prompts", "split_dir": "--split-dir",
                "class_names": "--class-names"}
VALUE_OPTIONS = {"prompt_format": "--prompt-format", "crop_seconds": "--crop-seconds",
                 "min_count": "--min-count"}
DATASET_KEYS = {"root", "tasks", "modes", "fractions", "seeds", "folds",
                *FILE_OPTIONS, *VALUE_OPTIONS}
FOLD_SPLITS = ("train", "val", "test")


class SuiteError(EvalError):
    """A suite file that cannot be run."""


@dataclass
class DatasetSpec:
    name: str                       # one of plan.DATASETS
    root: str                       # absolute; the bundled PTB-XL sample when null
    tasks: list[str | None]         # PTB-XL label sets; [None] for one-label-set datasets
    modes: list[str]
    fractions: list[float]
    seeds: list[int]
    folds: dict[str, str] = field(default_factory=dict)     # split -> "1-8"
    options: dict[str, Any] = field(default_factory=dict)   # evaluate option -> value


@dataclass
class Suite:
    path: str
    datasets: list[DatasetSpec]
    bootstrap: int = 1000
    batch_size: int = 64
    random_init_seed: int = 0       # the baseline's weights: one seeded draw per suite


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and check ``path``; raises SuiteError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"--suite {path} is not a file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"--suite {path}: not valid YAML: {err}") from None
    where = f"--suite {path}"
    _check_keys(raw, TOP_KEYS, where)
    defaults = {"modes": _modes(raw.get("modes", list(SUITE_MODES)), f"{where}: modes"),
                "fractions": _fractions(raw.get("fractions", [0.01, 0.1, 1.0]),
                                        f"{where}: fractions"),
                "seeds": _ints(raw.get("seeds", [0]), f"{where}: seeds")}
    datasets = raw.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise SuiteError(f"{where}: 'datasets' must map dataset names ({', '.join(DATASETS)}) "
                         "to their settings")
    specs = [_dataset_spec(name, entry, defaults, f"{where}: datasets.{name}")
             for name, entry in datasets.items()]
    # The paper's column order (PTB-XL, CPSC2018, Chapman, CODE-15%), whatever the file's.
    specs.sort(key=lambda spec: DATASETS.index(spec.name))
    return Suite(path=str(path), datasets=specs,
                 bootstrap=_int(raw.get("bootstrap", 1000), f"{where}: bootstrap", low=0),
                 batch_size=_int(raw.get("batch_size", 64), f"{where}: batch_size", low=1),
                 random_init_seed=_int(raw.get("random_init_seed", 0),
                                       f"{where}: random_init_seed", low=0))


def _dataset_spec(name, entry, defaults: dict, where: str) -> DatasetSpec:
    from melp_ray.data.sources import bundled_root

    if name not in DATASETS:
        raise SuiteError(f"{where}: unknown dataset (known: {', '.join(DATASETS)})")
    entry = {} if entry is None else entry
    _check_keys(entry, DATASET_KEYS, where)
    root = entry.get("root")
    if root is None and name != "ptb-xl":
        raise SuiteError(f"{where}: 'root' is required (only ptb-xl has a bundled sample)")
    if root is not None and not isinstance(root, str):
        raise SuiteError(f"{where}: root must be a path, got {root!r}")
    tasks: list[str | None] = [None]
    if "tasks" in entry or name == "ptb-xl":
        if name != "ptb-xl":
            raise SuiteError(f"{where}: 'tasks' selects PTB-XL label sets; {name} has one")
        tasks = _strings(entry.get("tasks", list(PTBXL_TASKS)), PTBXL_TASKS, f"{where}: tasks")
    folds = entry.get("folds", {})
    if not isinstance(folds, dict):
        raise SuiteError(f"{where}: folds must map train/val/test to folds like 1-8")
    _check_keys(folds, set(FOLD_SPLITS), f"{where}: folds")
    for key in FILE_OPTIONS:
        if entry.get(key) is not None and not Path(str(entry[key])).exists():
            raise SuiteError(f"{where}: {key} {entry[key]} does not exist")
    options = {option: entry[key] for key, option in {**FILE_OPTIONS, **VALUE_OPTIONS}.items()
               if entry.get(key) is not None}
    return DatasetSpec(
        name=name, root=str(Path(os.path.expanduser(root)).absolute()) if root else bundled_root(),
        tasks=tasks,
        modes=_modes(entry.get("modes", defaults["modes"]), f"{where}: modes"),
        fractions=_fractions(entry.get("fractions", defaults["fractions"]),
                             f"{where}: fractions"),
        seeds=_ints(entry.get("seeds", defaults["seeds"]), f"{where}: seeds"),
        folds={split: str(value) for split, value in folds.items()}, options=options)


def _check_keys(mapping, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")


def _list(value, where: str) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SuiteError(f"{where}: must not be empty")
    return values


def _strings(value, allowed, where: str) -> list[str]:
    values = _list(value, where)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SuiteError(f"{where}: {bad} not in {list(allowed)}")
    return list(dict.fromkeys(values))


def _modes(value, where: str) -> list[str]:
    return _strings(value, SUITE_MODES, where)


def _fractions(value, where: str) -> list[float]:
    values = _list(value, where)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
               for v in values):
        raise SuiteError(f"{where}: each fraction must be a number in (0, 1], got {values}")
    return sorted({float(v) for v in values})


def _int(value, where: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SuiteError(f"{where}: must be a whole number >= {low}, got {value!r}")
    return value


def _ints(value, where: str) -> list[int]:
    return list(dict.fromkeys(_int(v, where, 0) for v in _list(value, where)))
