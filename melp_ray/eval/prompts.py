"""Zero-shot class prompts: defaults per dataset plus user prompt files.

Every function returns prompts **in the order of the class list it is given**, one list of
strings per class (a class may have several prompts; their embeddings are averaged by
``zero_shot.prompt_embeddings``). A class without a prompt raises ``MissingPromptError``
naming all missing classes, never a silent default.

Defaults
--------
* PTB-XL: the official ``description`` column of ``scp_statements.csv`` for every SCP
  code (form and rhythm tasks, and subclasses named after a code, e.g. ``IRBBB``),
  lower-cased like the reports. Names that are not SCP codes get descriptive prompts
  defined here: the 5 superclasses (``PTBXL_SUPERCLASS_PROMPTS``) and the subclass groups
  that merge several codes (``PTBXL_SUBCLASS_GROUP_PROMPTS``, e.g. ``_AVB``).
* CPSC2018: ``CPSC2018_DESCRIPTIONS``; Chapman-Shaoxing (SNOMED codes as classes):
  ``SNOMED_DESCRIPTIONS`` (both in ``melp_ray.data.physionet``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

# Each superclass groups many statements, so its prompts name the common ones; their
# embeddings are averaged (``zero_shot.prompt_embeddings``). Lower-case, like the reports.
PTBXL_SUPERCLASS_PROMPTS: dict[str, list[str]] = {
    "NORM": ["normal ecg", "sinus rhythm, normal ecg", "normal electrocardiogram"],
    "MI": ["myocardial infarction", "anterior myocardial infarction",
           "inferior myocardial infarction", "anteroseptal myocardial infarction, age undetermined"],
    "STTC": ["st/t change", "non-specific st changes", "st segment depression",
             "t wave abnormality, t waves inverted", "st-t changes compatible with ischaemia"],
    "CD": ["conduction disturbance", "right bundle branch block", "left bundle branch block",
           "left anterior fascicular block", "first degree av block"],
    "HYP": ["hypertrophy", "left ventricular hypertrophy", "right ventricular hypertrophy",
            "left atrial enlargement"],
}

# Diagnostic subclasses that group several SCP codes and are not codes themselves.
PTBXL_SUBCLASS_GROUP_PROMPTS: dict[str, str | list[str]] = {
    "LAFB/LPFB": "left anterior or left posterior fascicular block",
    "_AVB": "atrioventricular block",
    "ISCA": "ischemic in anterior, anteroseptal, anterolateral or lateral leads",
    "ISCI": "ischemic in inferior or inferolateral leads",
    "STTC": PTBXL_SUPERCLASS_PROMPTS["STTC"],
}

Prompts = list[list[str]]


class MissingPromptError(KeyError):
    """Some classes have no prompt."""

    def __init__(self, missing: Sequence[str], source: str):
        self.missing = list(missing)
        super().__init__(f"no zero-shot prompt for classes {self.missing} in {source}; "
                         "add them to a prompt file (YAML/JSON: class -> prompt or list)")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def _as_prompt_list(cls: str, value) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"prompt for class {cls!r} must be a string or a non-empty list "
                         f"of strings, got {value!r}")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"prompts for class {cls!r} must be non-empty strings, got {values!r}")
    return [v.strip() for v in values]


def prompts_for_classes(classes: Sequence[str], table: Mapping[str, str | Sequence[str]],
                        source: str = "the prompt table") -> Prompts:
    """Look every class up in ``table``; result in class order, one list per class."""
    missing = [c for c in classes if c not in table]
    if missing:
        raise MissingPromptError(missing, source)
    return [_as_prompt_list(c, table[c]) for c in classes]


def ptbxl_descriptions(scp_statements_csv: str | Path) -> dict[str, str | list[str]]:
    """Class name -> prompt for every PTB-XL label (codes, superclasses, subclass groups)."""
    path = Path(scp_statements_csv)
    if not path.is_file():
        raise FileNotFoundError(f"scp_statements.csv not found at {path}")
    table = pd.read_csv(path, index_col=0)
    if "description" not in table.columns:
        raise ValueError(f"{path} has no 'description' column")
    descriptions = {str(code): str(text).strip().lower()
                    for code, text in table["description"].items() if pd.notna(text)}
    # Superclass prompts last: NORM is also an SCP code, and as a superclass it gets the
    # same prompts in evaluation as in pretraining's validation.
    return {**descriptions, **PTBXL_SUBCLASS_GROUP_PROMPTS, **PTBXL_SUPERCLASS_PROMPTS}


def ptbxl_prompts(classes: Sequence[str], scp_statements_csv: str | Path) -> Prompts:
    """Default prompts for any PTB-XL label set (super, sub, form, rhythm)."""
    return prompts_for_classes(classes, ptbxl_descriptions(scp_statements_csv),
                               source=str(scp_statements_csv))


def cpsc2018_prompts(classes: Sequence[str] | None = None) -> Prompts:
    """Default prompts for the CPSC2018 classes (all 9 when ``classes`` is None)."""
    from melp_ray.data.physionet import CPSC2018_CLASSES, CPSC2018_DESCRIPTIONS

    return prompts_for_classes(CPSC2018_CLASSES if classes is None else classes,
                               CPSC2018_DESCRIPTIONS, source="CPSC2018_DESCRIPTIONS")


def snomed_prompts(codes: Sequence[str]) -> Prompts:
    """Default prompts for SNOMED-coded classes (Chapman-Shaoxing)."""
    from melp_ray.data.physionet import SNOMED_DESCRIPTIONS

    return prompts_for_classes(codes, SNOMED_DESCRIPTIONS, source="SNOMED_DESCRIPTIONS")


def load_prompt_file(path: str | Path) -> dict[str, list[str]]:
    """Read a YAML or JSON mapping ``class -> prompt string | list of prompt strings``."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot parse prompt file {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"prompt file {path} must hold a non-empty mapping class -> prompt(s)")
    return {str(cls): _as_prompt_list(str(cls), value) for cls, value in data.items()}


def resolve_prompts(classes: Sequence[str], defaults: Mapping[str, str | Sequence[str]]
                    | None = None, prompt_file: str | Path | None = None) -> Prompts:
    """Prompts in class order: the prompt file's entries override ``defaults`` per class."""
    table: dict[str, str | Sequence[str]] = dict(defaults or {})
    source = "the default prompts"
    if prompt_file is not None:
        table.update(load_prompt_file(prompt_file))
        source = f"{prompt_file} or the default prompts" if defaults else str(prompt_file)
    return prompts_for_classes(classes, table, source=source)
