"""Class lists from the reference's ``dataset_class_names.json`` (``--class-names FILE``).

The file is one JSON object: reference task name -> list of class names, e.g.
``{"ptbxl_super_class": ["HYP", "NORM", "MI", "CD", "STTC"], ..., "icbeb": [...9],
"chapman": [...38]}``. The list of the evaluated task replaces our own class choice, in the
file's order. The reference's names differ from ours in places, so each name is matched to
a label our readers produce:

* PTB-XL: our label names (``ptbxl.class_names``) exactly, or after dropping the ``_`` that
  PTB-XL puts on some subclass names (reference ``AVB``, ``ISC``, ``NST`` = ours ``_AVB``,
  ``ISC_``, ``NST_``).
* CPSC2018 (the reference calls it ``icbeb``): ``ICBEB_TO_CPSC2018`` (AFIB = AF,
  VPC = PVC, 1AVB = I-AVB, CRBBB = RBBB, CLBBB = LBBB), or our names.
* Chapman-Shaoxing: our reader labels records by the SNOMED codes of their headers, so a
  class must be a SNOMED code. The reference's 38 classes are the dataset's acronyms
  (``AQW``, ``SR``, ...); their labels come with the reference's split CSVs
  (``--split-dir``), which carry one 0/1 column per class.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# Our dataset/task -> the reference's task key.
REFERENCE_TASK_KEYS: dict[tuple[str, str | None], str] = {
    ("ptb-xl", "super"): "ptbxl_super_class",
    ("ptb-xl", "sub"): "ptbxl_sub_class",
    ("ptb-xl", "form"): "ptbxl_form",
    ("ptb-xl", "rhythm"): "ptbxl_rhythm",
    ("cpsc2018", None): "icbeb",
    ("chapman", None): "chapman",
}

# The reference's CPSC2018 class names -> ours (``physionet_labels.CPSC2018_CLASSES``).
ICBEB_TO_CPSC2018: dict[str, str] = {
    "AFIB": "AF", "VPC": "PVC", "NORM": "NORM", "1AVB": "I-AVB", "CRBBB": "RBBB",
    "STE": "STE", "PAC": "PAC", "CLBBB": "LBBB", "STD": "STD",
}


class ClassListError(ValueError):
    """A class-names file that is malformed or does not fit the task."""


def reference_task_key(dataset: str, task: str | None) -> str:
    return REFERENCE_TASK_KEYS[(dataset, task if dataset == "ptb-xl" else None)]


def read_class_names(path: str | Path, key: str) -> list[str]:
    """The class list stored under ``key`` in a dataset_class_names.json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClassListError(f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ClassListError(f"{path}: expected a JSON object task -> list of class names")
    if key not in data:
        raise ClassListError(f"{path} has no class list for task {key!r} "
                             f"(it has {sorted(map(str, data))})")
    names = data[key]
    if not isinstance(names, list) or not names or \
            not all(isinstance(n, str) and n.strip() for n in names):
        raise ClassListError(f"{path}: {key!r} must be a non-empty list of class names, "
                             f"got {names!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ClassListError(f"{path}: {key!r} lists {duplicates} more than once")
    return [n.strip() for n in names]


def match_ptbxl_names(names: Sequence[str], ours: Sequence[str], source: str) -> dict[str, str]:
    """Reference name -> our PTB-XL label name (exact, else equal once '_' is dropped)."""
    by_bare = {n.strip("_"): n for n in ours}
    matched, unknown = {}, []
    for name in names:
        if name in ours:
            matched[name] = name
        elif name.strip("_") in by_bare:
            matched[name] = by_bare[name.strip("_")]
        else:
            unknown.append(name)
    if unknown:
        raise ClassListError(f"{source}: classes {unknown} are not labels of this PTB-XL task "
                             f"(its labels: {list(ours)})")
    return matched


def match_cpsc2018_names(names: Sequence[str], source: str) -> dict[str, str]:
    """Reference (icbeb) or our CPSC2018 name -> our class name."""
    from melp_ray.data.physionet_labels import CPSC2018_CLASSES

    known = {**ICBEB_TO_CPSC2018, **{c: c for c in CPSC2018_CLASSES}}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ClassListError(f"{source}: classes {unknown} are not CPSC2018 classes (known: "
                             f"{sorted(known)})")
    return {n: known[n] for n in names}


def check_snomed_names(names: Sequence[str], source: str) -> None:
    """Chapman classes read from headers must be SNOMED codes (all digits)."""
    acronyms = [n for n in names if not n.isdigit()]
    if acronyms:
        raise ClassListError(
            f"{source}: Chapman classes {acronyms[:5]}{' ...' if len(acronyms) > 5 else ''} "
            "are not SNOMED codes; our Chapman reader labels records by the SNOMED codes of "
            "their headers, so the reference's acronym classes need the reference's split "
            "CSVs, which carry the labels: add --split-dir")
