"""The canonical 12-lead order and the name-based mapping of a source's leads onto it.

Sources disagree on lead order (MIMIC-IV-ECG stores aVF before aVL) and on spelling
(PTB-XL writes "AVR"), so leads are always matched by *name*, never by position.
"""
from __future__ import annotations

from collections.abc import Sequence

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF",
                          "V1", "V2", "V3", "V4", "V5", "V6")

# lower-cased spelling -> canonical name ("AVR", "avr", "aVR" all mean aVR)
_BY_KEY = {name.lower(): name for name in LEADS}


class LeadMappingError(ValueError):
    """A source's lead names cannot be mapped onto LEADS (a lead is missing or repeated)."""


def canonical_lead_name(name: str) -> str | None:
    """The canonical spelling of one lead name, or None when it is not one of the 12 leads."""
    return _BY_KEY.get(str(name).strip().lower())


def lead_indices(source_names: Sequence[str]) -> list[int]:
    """Column index in the source for each lead of LEADS, in LEADS order.

    ``signal[:, lead_indices(names)]`` reorders a (samples, leads) source array to the
    canonical order. Extra source leads (e.g. a 15-lead record) are ignored; a missing
    lead, or a lead that appears twice, raises LeadMappingError.
    """
    position: dict[str, int] = {}
    duplicates: list[str] = []
    for index, raw_name in enumerate(source_names):
        name = canonical_lead_name(raw_name)
        if name is None:
            continue
        if name in position:
            duplicates.append(name)
        position[name] = index
    if duplicates:
        raise LeadMappingError(f"duplicate leads {sorted(set(duplicates))} in {list(source_names)}")
    missing = [name for name in LEADS if name not in position]
    if missing:
        raise LeadMappingError(f"missing leads {missing} in {list(source_names)}")
    return [position[name] for name in LEADS]
