"""Data roots: find the shipped sample, recognise a root's layout, list its records, split.

    root = bundled_root()                      # 259 real PTB-XL records at 100 Hz
    detect_layout(root)                        # "ptb-xl" | "mimic-iv-ecg" | "manifest" | "shards"
    refs = list_records("ptb-xl", root)        # RecordRefs with a usable report
    split_for_subject(ref.subject_id, 0.1)     # "train" | "val", stable per subject
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from melp_ray.utils import storage
from melp_ray.data import manifest, mimic, ptbxl
from melp_ray.data.records import RecordRef, check_report
from melp_ray.data.rejections import DUPLICATE_RECORD_ID, RecordRejected

PTBXL = ptbxl.DATASET          # "ptb-xl"
MIMIC = mimic.DATASET          # "mimic-iv-ecg"
MANIFEST = manifest.DATASET    # "manifest": your own files + ecg_manifest.csv/.parquet
SHARDS = "shards"
DATASETS = (PTBXL, MIMIC, MANIFEST)

# Minimum report length per dataset. MIMIC follows the reference (>= 4 words); PTB-XL's
# hand-written reports are often 3 words ("sinusrhythmus normales ekg"), so any
# non-empty report is kept there.
DEFAULT_MIN_REPORT_WORDS = {PTBXL: 1, MIMIC: 4}

_LAYOUT_MARKERS = (("manifest.json", SHARDS), (ptbxl.DATABASE_CSV, PTBXL), (mimic.RECORD_LIST_CSV, MIMIC),
                   (manifest.MANIFEST_CSV, MANIFEST), (manifest.MANIFEST_PARQUET, MANIFEST))


class DataRootError(ValueError):
    """A data root that cannot be used: missing, unrecognised, or with a malformed csv."""


def bundled_root() -> str:
    """Absolute path of the PTB-XL sample shipped inside the package."""
    return str(Path(__file__).resolve().parent / "bundled" / "ptb-xl")


def detect_layout(root: str | os.PathLike) -> str:
    """"shards" (has manifest.json), "ptb-xl" (ptbxl_database.csv), "mimic-iv-ecg" (record_list.csv)
    or "manifest" (ecg_manifest.csv / ecg_manifest.parquet: your own files, data/manifest.py).

    A URI (s3://, gs://, file://) must hold prepared shards: raw roots are read with wfdb,
    which needs local files."""
    if root is not None and storage.is_uri(root):
        return _uri_layout(os.fspath(root))
    folder = _existing_folder(root)
    for marker, layout in _LAYOUT_MARKERS:
        if (folder / marker).is_file():
            return layout
    looked_for = ", ".join(f"{marker} ({layout})" for marker, layout in _LAYOUT_MARKERS)
    raise DataRootError(f"data root {folder} is not a known layout: none of {looked_for} found in it")


def _uri_layout(root: str) -> str:
    manifest = storage.join(root, "manifest.json")
    try:
        found = storage.is_file(manifest)
    except OSError as err:   # unreachable endpoint, no credentials, no such bucket
        raise DataRootError(f"cannot read data root {root}: {err}") from None
    if not found:
        raise DataRootError(f"data root {root} holds no manifest.json: a URI data root must be a folder of "
                            f"prepared shards (raw WFDB roots must be local; run `python -m melp_ray.prepare "
                            f"--root <local raw root> --out {root}` first)")
    return SHARDS


def _existing_folder(root: str | os.PathLike) -> Path:
    if root is None or str(root) == "":
        raise DataRootError("no data root given")
    folder = Path(root).expanduser()
    if not folder.exists():
        raise DataRootError(f"data root {folder} does not exist")
    if not folder.is_dir():
        raise DataRootError(f"data root {folder} is not a folder")
    return folder


@dataclass
class RecordListing:
    """The result of listing a root: usable refs, and the rows rejected from the csv alone."""

    refs: list[RecordRef]
    rejected: dict[str, list[str]] = field(default_factory=dict)   # reason -> record ids
    details: dict[str, str] = field(default_factory=dict)          # record id -> "reason: detail"

    @property
    def n_input(self) -> int:
        return len(self.refs) + sum(len(ids) for ids in self.rejected.values())


def scan_records(dataset: str, root: str | os.PathLike, limit: int | None = None,
                 min_report_words: int | None = None, sample_rate: int = 500) -> RecordListing:
    """List a raw root and reject what the csv files alone show to be unusable (reports,
    and a repeated record id: the first row with an id is kept, later ones are rejected).

    ``limit`` keeps the first N rows of the sorted listing *before* rejection, so the
    same N records are seen every time. Signals are not read here (see load_signal).
    """
    if min_report_words is None:
        min_report_words = DEFAULT_MIN_REPORT_WORDS.get(dataset, 1)
    listing = RecordListing(refs=[])
    seen: set[str] = set()
    for ref in _raw_refs(dataset, root, limit, sample_rate):
        try:
            if ref.record_id in seen:
                raise RecordRejected(DUPLICATE_RECORD_ID, f"record id {ref.record_id!r} listed before")
            seen.add(ref.record_id)
            ref.report = check_report(ref.report, min_report_words)
        except RecordRejected as rejection:
            listing.rejected.setdefault(rejection.reason, []).append(ref.record_id)
            # a duplicate's details would overwrite the first row's: name it by its row
            key = ref.record_id if rejection.reason != DUPLICATE_RECORD_ID else f"{ref.record_id} ({ref.path})"
            listing.details[key] = str(rejection)
            continue
        listing.refs.append(ref)
    return listing


def list_records(dataset: str, root: str | os.PathLike, limit: int | None = None,
                 min_report_words: int | None = None, sample_rate: int = 500) -> list[RecordRef]:
    """RecordRefs with a usable report, sorted deterministically (ecg_id / subject, study)."""
    return scan_records(dataset, root, limit, min_report_words, sample_rate).refs


def _raw_refs(dataset: str, root, limit, sample_rate) -> list[RecordRef]:
    if storage.is_uri(root):
        raise DataRootError(f"raw root {root} is a URI: raw WFDB records must be read from a local folder "
                            f"(or a shared file system); prepare them into shards with `python -m "
                            f"melp_ray.prepare --root <local folder> --out <URI>` and use the shards")
    layout = detect_layout(root)
    if dataset in (None, "auto"):
        dataset = layout
    if dataset not in DATASETS:
        raise DataRootError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if layout != dataset:
        raise DataRootError(f"data root {root} looks like {layout!r}, not {dataset!r}")
    try:
        if dataset == PTBXL:
            return ptbxl.list_ptbxl(root, sample_rate=sample_rate, limit=limit)
        if dataset == MANIFEST:
            return manifest.list_manifest(root, limit=limit)
        return mimic.list_mimic(root, limit=limit)
    except (ptbxl.PTBXLFormatError, mimic.MIMICFormatError, manifest.ManifestFormatError) as err:
        raise DataRootError(str(err)) from None
    except (ValueError, KeyError, SyntaxError) as err:   # a malformed cell (ids, scp_codes)
        raise DataRootError(f"malformed {dataset} metadata in {root}: {type(err).__name__}: {err}") from None


def split_for_subject(subject_id: str, val_fraction: float, seed: int = 0) -> str:
    """"val" for a stable ``val_fraction`` share of subjects, else "train".

    A hash of (seed, subject) decides, so every record of a subject lands on the same
    side, on every machine and in every run.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64     # uniform in [0, 1)
    return "val" if position < val_fraction else "train"


def download_ptbxl(dest: str | os.PathLike) -> str:
    """Download the full PTB-XL (about 3 GB, both rates) from PhysioNet into ``dest``."""
    import wfdb

    os.makedirs(dest, exist_ok=True)
    # dl_database fetches the waveforms named in RECORDS; the csv files come separately.
    wfdb.dl_files("ptb-xl", os.fspath(dest), [ptbxl.DATABASE_CSV, ptbxl.STATEMENTS_CSV, "LICENSE.txt"])
    wfdb.dl_database("ptb-xl", os.fspath(dest))
    return os.fspath(dest)
