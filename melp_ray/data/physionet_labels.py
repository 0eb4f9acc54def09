"""Label sets of the PhysioNet/CinC Challenge datasets (CPSC2018, Chapman-Shaoxing).

Kept apart from ``melp_ray.data.physionet``, which reads the Challenge files (headers,
listing, signals), because the classes and their SNOMED CT codes are a separate matter:
the ``#Dx`` codes of a listed record become multi-hot labels here, and the descriptions
here become zero-shot prompts (``melp_ray.text.prompts``).

* CPSC2018: the challenge's 9 classes. The Challenge 2020/2021 releases re-coded them with
  SNOMED CT; ``CPSC2018_CODES`` lists, per class, the code used in those releases plus the
  codes the Challenge scoring treats as equivalent (e.g. CRBBB 713427006 for RBBB, VPB
  17338001 / PVC 427172004 for the CPSC "ventricular ectopics" 164884008), so a record
  coded either way gets the same label.
* Chapman-Shaoxing: the MELP reference publishes its 38 classes (the dataset's acronyms,
  ``AQW``, ``SR``, ... in its ``prompt/dataset_class_names.json``) and their labels (its
  split CSVs ``data_split/chapman/chapman_{train,val,test}.csv``); ``melp_ray.evaluate``
  uses them with ``--class-names`` and ``--split-dir``. Without those files,
  ``frequent_dx_classes`` takes the SNOMED codes present in at least ``min_count`` records
  of the data at hand (documented, deterministic order); pass the resulting list around
  explicitly so train and test use the same classes.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from melp_ray.data.physionet import PhysioNetRecord

CPSC2018_CLASSES: tuple[str, ...] = ("NORM", "AF", "I-AVB", "LBBB", "RBBB",
                                     "PAC", "PVC", "STD", "STE")

CPSC2018_CODES: dict[str, frozenset[str]] = {
    "NORM": frozenset({"426783006"}),                          # sinus rhythm
    "AF": frozenset({"164889003"}),                            # atrial fibrillation
    "I-AVB": frozenset({"270492004"}),                         # 1st degree AV block
    "LBBB": frozenset({"164909002", "733534002"}),             # (complete) LBBB
    "RBBB": frozenset({"59118001", "713427006"}),              # (complete) RBBB
    "PAC": frozenset({"284470004", "63593006"}),               # PAC / SV premature beats
    "PVC": frozenset({"164884008", "427172004", "17338001"}),  # V ectopics / PVC / VPB
    "STD": frozenset({"429622005"}),                           # ST depression
    "STE": frozenset({"164931005"}),                           # ST elevation
}

CPSC2018_DESCRIPTIONS: dict[str, str] = {
    "NORM": "normal sinus rhythm",
    "AF": "atrial fibrillation",
    "I-AVB": "first degree atrioventricular block",
    "LBBB": "left bundle branch block",
    "RBBB": "right bundle branch block",
    "PAC": "premature atrial contraction",
    "PVC": "premature ventricular contraction",
    "STD": "st segment depression",
    "STE": "st segment elevation",
}

# SNOMED CT code -> description, for the Challenge codes common in CPSC2018 and
# Chapman-Shaoxing (wording after the Challenge's diagnosis mapping tables). Used to build
# zero-shot prompts; a code missing here needs a user prompt file.
SNOMED_DESCRIPTIONS: dict[str, str] = {
    "426783006": "sinus rhythm",
    "426177001": "sinus bradycardia",
    "427084000": "sinus tachycardia",
    "427393009": "sinus arrhythmia",
    "164889003": "atrial fibrillation",
    "164890007": "atrial flutter",
    "426761007": "supraventricular tachycardia",
    "713422000": "atrial tachycardia",
    "233896004": "atrioventricular node reentrant tachycardia",
    "233897008": "atrioventricular reentrant tachycardia",
    "426627000": "bradycardia",
    "10370003": "pacing rhythm",
    "270492004": "first degree atrioventricular block",
    "195042002": "second degree atrioventricular block",
    "54016002": "mobitz type i wenckebach atrioventricular block",
    "27885002": "complete heart block",
    "6374002": "bundle branch block",
    "164909002": "left bundle branch block",
    "733534002": "complete left bundle branch block",
    "59118001": "right bundle branch block",
    "713427006": "complete right bundle branch block",
    "713426002": "incomplete right bundle branch block",
    "445118002": "left anterior fascicular block",
    "698252002": "nonspecific intraventricular conduction disorder",
    "74390002": "wolff parkinson white pattern",
    "284470004": "premature atrial contraction",
    "63593006": "supraventricular premature beats",
    "427172004": "premature ventricular contractions",
    "17338001": "ventricular premature beats",
    "164884008": "ventricular ectopics",
    "11157007": "ventricular bigeminy",
    "251180001": "ventricular trigeminy",
    "39732003": "left axis deviation",
    "47665007": "right axis deviation",
    "251146004": "low qrs voltages",
    "164873001": "left ventricular hypertrophy",
    "89792004": "right ventricular hypertrophy",
    "164947007": "prolonged pr interval",
    "111975006": "prolonged qt interval",
    "164917005": "q wave abnormal",
    "164934002": "t wave abnormal",
    "59931005": "t wave inversion",
    "429622005": "st depression",
    "164931005": "st elevation",
    "55930002": "st changes",
    "428750005": "nonspecific st t abnormality",
    "164865005": "myocardial infarction",
    "164861001": "myocardial ischemia",
    "365413008": "poor r wave progression",
    "428417006": "early repolarization",
}


def labels_from_codes(dx_codes: Iterable[str], classes: Sequence[str],
                      code_groups: Mapping[str, Iterable[str]] | None = None) -> np.ndarray:
    """Multi-hot float32 vector over ``classes`` for one record's SNOMED codes.

    ``code_groups`` maps a class to the codes that count as it (``CPSC2018_CODES``);
    without it each class *is* a code (the Chapman-Shaoxing setup).
    """
    codes = set(dx_codes)
    out = np.zeros(len(classes), dtype=np.float32)
    for i, cls in enumerate(classes):
        members = set(code_groups[cls]) if code_groups is not None else {cls}
        out[i] = float(bool(codes & members))
    return out


def cpsc2018_labels(dx_codes: Iterable[str]) -> np.ndarray:
    """(9,) multi-hot over ``CPSC2018_CLASSES``."""
    return labels_from_codes(dx_codes, CPSC2018_CLASSES, CPSC2018_CODES)


def frequent_dx_classes(records: Iterable[PhysioNetRecord], min_count: int = 10
                        ) -> list[str]:
    """SNOMED codes present in at least ``min_count`` records, most frequent first.

    Ties are ordered by code so the list is deterministic. Our default Chapman-Shaoxing
    label list; the reference's 38 acronym classes come from its class-names file and
    split CSVs instead (``melp_ray.eval.class_lists``, ``--split-dir``).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = Counter(code for rec in records for code in set(rec.dx_codes))
    frequent = [code for code, n in counts.items() if n >= min_count]
    return sorted(frequent, key=lambda code: (-counts[code], code))
