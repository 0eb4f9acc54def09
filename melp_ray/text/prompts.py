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
* CODE-15%: ``CODE15_PROMPTS`` (its six classes, named as in the dataset's CSVs).
* CPSC2018: ``CPSC2018_DESCRIPTIONS``; Chapman-Shaoxing (SNOMED codes as classes):
  ``SNOMED_DESCRIPTIONS`` (both in ``melp_ray.data.physionet_labels``).

Prompt files
------------
* ours ("melp_ray"): YAML or JSON, ``class -> prompt | [prompts]``; each entry overrides
  the default of its class.
* the reference's CKEPE_prompt.json ("ckepe"): ``class -> one description string`` of
  comma-separated phrases. Scored as the reference scores it: the whole string,
  lower-cased, is one text (not split at the commas). It must name every class.
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

# CODE-15% / CODE-test: the six abnormalities of Ribeiro et al., lower-case like the reports.
CODE15_PROMPTS: dict[str, list[str]] = {
    "1dAVb": ["first degree av block", "first degree atrioventricular block",
              "prolonged pr interval"],
    "RBBB": ["right bundle branch block", "complete right bundle branch block"],
    "LBBB": ["left bundle branch block", "complete left bundle branch block"],
    "SB": ["sinus bradycardia", "sinus rhythm with slow heart rate"],
    "AF": ["atrial fibrillation", "atrial fibrillation with irregular ventricular response"],
    "ST": ["sinus tachycardia", "sinus rhythm with fast heart rate"],
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
    from melp_ray.data.physionet_labels import CPSC2018_CLASSES, CPSC2018_DESCRIPTIONS

    return prompts_for_classes(CPSC2018_CLASSES if classes is None else classes,
                               CPSC2018_DESCRIPTIONS, source="CPSC2018_DESCRIPTIONS")


def snomed_prompts(codes: Sequence[str]) -> Prompts:
    """Default prompts for SNOMED-coded classes (Chapman-Shaoxing)."""
    from melp_ray.data.physionet_labels import SNOMED_DESCRIPTIONS

    return prompts_for_classes(codes, SNOMED_DESCRIPTIONS, source="SNOMED_DESCRIPTIONS")


PROMPT_FORMATS = ("auto", "melp_ray", "ckepe")


def _parse_prompt_text(path: Path, text: str):
    import yaml

    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot parse prompt file {path}: line {exc.lineno} column "
                         f"{exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse prompt file {path}: {exc}") from None


def detect_prompt_format(path: str | Path, data) -> str:
    """"ckepe" for a JSON object whose every value is one string, else "melp_ray".

    The reference's CKEPE_prompt.json is such an object (class code -> one description of
    comma-separated phrases); our own files are YAML, or map a class to a list of prompts.
    The two readings of a JSON ``class -> string`` file differ only in lower-casing.
    """
    if (Path(path).suffix.lower() == ".json" and isinstance(data, dict)
            and data and all(isinstance(v, str) for v in data.values())):
        return "ckepe"
    return "melp_ray"


def _ckepe_prompts(path: Path, data) -> dict[str, list[str]]:
    """The reference's scoring: the whole description, lower-cased, is ONE text per class
    (``scripts/zeroshot/test_zeroshot.py`` lower-cases it and encodes it as one string; the
    commas are not split on)."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"CKEPE prompt file {path} must hold a non-empty JSON object "
                         "class -> description string")
    bad = {str(k): v for k, v in data.items() if not isinstance(v, str) or not v.strip()}
    if bad:
        cls, value = next(iter(bad.items()))
        raise ValueError(f"CKEPE prompt file {path}: class {cls!r} must map to one non-empty "
                         f"description string, got {value!r}")
    return {str(cls): [text.lower()] for cls, text in data.items()}


def load_prompt_file(path: str | Path, fmt: str = "auto") -> dict[str, list[str]]:
    """Read a prompt file: ``class -> list of prompts`` in class-file order.

    ``fmt``: "melp_ray" (YAML or JSON mapping ``class -> prompt string | list of prompt
    strings``, used as written), "ckepe" (the reference's CKEPE_prompt.json, see
    ``_ckepe_prompts``) or "auto" (``detect_prompt_format``).
    """
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {PROMPT_FORMATS}")
    path = Path(path)
    data = _parse_prompt_text(path, path.read_text(encoding="utf-8"))
    if fmt == "auto":
        fmt = detect_prompt_format(path, data)
    if fmt == "ckepe":
        return _ckepe_prompts(path, data)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"prompt file {path} must hold a non-empty mapping class -> prompt(s)")
    return {str(cls): _as_prompt_list(str(cls), value) for cls, value in data.items()}


def prompt_file_format(path: str | Path, fmt: str = "auto") -> str:
    """The format ``load_prompt_file`` reads ``path`` as (for results.json)."""
    if fmt != "auto":
        return fmt
    path = Path(path)
    return detect_prompt_format(path, _parse_prompt_text(path, path.read_text(encoding="utf-8")))


def resolve_prompts(classes: Sequence[str], defaults: Mapping[str, str | Sequence[str]]
                    | None = None, prompt_file: str | Path | None = None,
                    prompt_format: str = "auto") -> Prompts:
    """Prompts in class order.

    A melp_ray-format file overrides ``defaults`` per class. A CKEPE file must cover every
    class itself: the reference's prompts mixed with our defaults would be neither
    protocol, so a class missing from it raises ``MissingPromptError`` naming the class.
    """
    table: dict[str, str | Sequence[str]] = dict(defaults or {})
    source = "the default prompts"
    if prompt_file is not None:
        from_file = load_prompt_file(prompt_file, prompt_format)
        if prompt_file_format(prompt_file, prompt_format) == "ckepe":
            return prompts_for_classes(classes, from_file, source=f"CKEPE file {prompt_file}")
        table.update(from_file)
        source = f"{prompt_file} or the default prompts" if defaults else str(prompt_file)
    return prompts_for_classes(classes, table, source=source)
