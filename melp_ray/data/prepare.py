"""A raw ECG root -> Parquet shards, with Ray Data (``python -m melp_ray.prepare``).

How it works (docs/data.md has the formats):
1. The driver lists the root (csv files only), rejects rows whose report is unusable,
   gives each subject a split (hash of seed + subject), shuffles each split with the seed
   (``--order shuffled``, the default: MIMIC lists its records by subject, and a shard of
   one subject's near-identical reports would put false negatives in every contrastive
   batch) and cuts it into chunks of ``--shard-size`` records.
2. Ray Data runs one task per chunk that is not done yet: read + validate + resample
   each record, write ``OUT/<split>/part-NNNNN.parquet`` and then a small state json,
   both atomically. A chunk whose state (and shard) exist is skipped, so a killed run
   resumes where it stopped and produces the same bytes.
3. The driver merges the states into ``OUT/manifest.json`` and checks that every
   record seen is either kept or rejected under a named reason.
The root must be visible to every node (a shared file system) on a cluster; OUT may be
one too, or an object store URI (s3://, gs://) reached through pyarrow filesystems.
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

from melp_ray.utils import storage
from melp_ray.data import shards
from melp_ray.data.leads import LEADS
from melp_ray.data.records import RecordRef, load_signal, n_samples_for
from melp_ray.data.rejections import MANIFEST_REJECTION_REASONS, REJECTION_REASONS, RecordRejected
from melp_ray.data.sources import (DATASETS, MANIFEST, DataRootError, RecordListing, scan_records,
                                   split_for_subject)

FORMAT_VERSION = 1
ORDERS = ("shuffled", "listing")
CPUS_PER_CHUNK = 1.0   # one chunk per CPU: two per CPU measured 15-48 % slower on 2 cores


@dataclass(frozen=True)
class PrepareSettings:
    dataset: str
    root: str
    out: str
    sample_rate: int = 500
    seconds: float = 10.0
    shard_size: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    min_report_words: int | None = None   # None: the dataset's default (MIMIC 4, PTB-XL 1)
    order: str = "shuffled"               # shuffled (seeded, per split) | listing (the source's order)
    ecg_encoding: str = "float32"         # float32 | float16 | int16 (per-lead scale): shards.py

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the output; a resumed run must match it exactly."""
        return {k: v for k, v in asdict(self).items() if k != "out"}


class PrepareError(RuntimeError):
    """The output folder cannot be (re)used with these settings."""


# ---------------------------------------------------------------- planning (driver)
def plan_chunks(refs: list[RecordRef], settings: PrepareSettings) -> list[dict[str, Any]]:
    """Assign a split per subject, order each split (seeded shuffle or listing order) and
    cut it into fixed chunks. The same settings always give the same chunks (resume)."""
    by_split: dict[str, list[RecordRef]] = {split: [] for split in shards.SPLITS}
    for ref in refs:
        by_split[split_for_subject(ref.subject_id, settings.val_fraction, settings.seed)].append(ref)
    chunks = []
    for split, split_refs in by_split.items():
        if settings.order == "shuffled":
            random.Random(f"{settings.seed}:{split}").shuffle(split_refs)  # str seed: stable across runs
        for index, start in enumerate(range(0, len(split_refs), settings.shard_size)):
            members = split_refs[start:start + settings.shard_size]
            chunks.append({"split": split, "index": index, "records": [ref.to_row() for ref in members]})
    return chunks


def _read_state(out: str, chunk: dict[str, Any]) -> dict[str, Any] | None:
    path = storage.join(out, shards.state_relpath(chunk["split"], chunk["index"]))
    return storage.read_json(path) if storage.is_file(path) else None


def chunk_is_done(out: str, chunk: dict[str, Any], settings: PrepareSettings) -> bool:
    """Its state json exists for these settings and its shard (if it kept rows) is on disk."""
    state = _read_state(out, chunk)
    if state is None:
        return False
    if state["settings"] != settings.fingerprint():
        raise PrepareError(f"{out} holds chunks prepared with other settings ({state['settings']}); "
                           f"use a new --out or delete it")
    return state["rows"] == 0 or storage.is_file(storage.join(out, state["shard"]))


def _check_output_folder(out: str, settings: PrepareSettings) -> None:
    """Refuse to mix settings in one output folder; clean temp files of a killed run.
    The first storage access of a run: an unreachable or forbidden --out fails here."""
    try:
        storage.make_dirs(out)
        settings_path = storage.join(out, shards.STATE_DIR, "settings.json")
        previous = storage.read_json(settings_path) if storage.is_file(settings_path) else None
    except OSError as err:
        raise PrepareError(f"cannot use --out {out}: {err}") from None
    if previous is not None:
        if previous != settings.fingerprint():
            raise PrepareError(f"{out} was prepared with other settings ({previous}); "
                               f"use a new --out or delete it")
    else:
        storage.write_json(settings_path, settings.fingerprint())
    shards.remove_temp_files(out)


# ---------------------------------------------------------------- one chunk (Ray task)
def process_chunk(chunk: dict[str, Any], settings: PrepareSettings) -> dict[str, Any]:
    """Load every record of a chunk, write its shard and its state json; returns the state."""
    out = settings.out
    rows, kept, subjects = [], [], set()
    rejected: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    for record in chunk["records"]:
        ref = RecordRef.from_row(record)
        try:
            signal = load_signal(ref, settings.root, settings.sample_rate, settings.seconds)
        except RecordRejected as rejection:
            rejected.setdefault(rejection.reason, []).append(ref.record_id)
            details[ref.record_id] = str(rejection)
            continue
        rows.append(shards.shard_row(ref, chunk["split"], signal, settings.ecg_encoding))
        kept.append(ref.record_id)
        subjects.add(ref.subject_id)
    shard = shards.shard_relpath(chunk["split"], chunk["index"])
    if rows:
        shards.write_shard(rows, storage.join(out, shard))
    state = {
        "split": chunk["split"], "index": chunk["index"], "shard": shard if rows else None,
        "rows": len(rows), "kept": kept, "subjects": sorted(subjects), "rejected": rejected, "details": details,
        "settings": settings.fingerprint(), "node_id": _ray_node_id(),
    }
    # Written last: its presence marks the chunk as done.
    storage.write_json(storage.join(out, shards.state_relpath(chunk["split"], chunk["index"])), state)
    return state


def _ray_node_id() -> str | None:
    """The Ray node that wrote a chunk (None outside Ray): on a cluster, which machine made
    which shard is what one needs to chase a bad shard or a slow node."""
    ray = sys.modules.get("ray")   # never imported just for this
    return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None


def _process_chunk_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map function: the chunk and settings travel as one json string."""
    task = json.loads(row["task"])
    state = process_chunk(task["chunk"], PrepareSettings(**task["settings"]))
    return {"split": state["split"], "index": state["index"], "rows": state["rows"]}


def run_chunks(chunks: list[dict[str, Any]], settings: PrepareSettings, local: bool = False) -> None:
    """Process the chunks in parallel on the Ray cluster (one Ray Data row per chunk), or
    one after the other in this process (``local``: small roots, tests; same output bytes)."""
    if not chunks:
        return
    if local:
        for chunk in chunks:
            process_chunk(chunk, settings)
        return
    import ray

    from melp_ray.utils.ray_connect import init_ray

    init_ray()
    tasks = [{"task": json.dumps({"chunk": chunk, "settings": asdict(settings)})} for chunk in chunks]
    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    dataset.map(_process_chunk_row, num_cpus=CPUS_PER_CHUNK).materialize()


# ---------------------------------------------------------------- manifest (driver)
def build_manifest(listing: RecordListing, states: list[dict[str, Any]], settings: PrepareSettings) -> dict[str, Any]:
    reasons = MANIFEST_REJECTION_REASONS if settings.dataset == MANIFEST else REJECTION_REASONS
    rejected: dict[str, list[str]] = {reason: list(listing.rejected.get(reason, [])) for reason in reasons}
    kept = 0
    shard_list = []
    splits = {split: {"records": 0, "subjects": set(), "shards": 0} for split in shards.SPLITS}
    for state in states:
        kept += state["rows"]
        for reason, ids in state["rejected"].items():
            rejected[reason].extend(ids)
        if state["rows"]:
            shard_list.append({"path": state["shard"], "split": state["split"], "rows": state["rows"]})
            splits[state["split"]]["records"] += state["rows"]
            splits[state["split"]]["shards"] += 1
            splits[state["split"]]["subjects"].update(state["subjects"])
    for split in shards.SPLITS:
        splits[split]["subjects"] = len(splits[split]["subjects"])
    n_rejected = sum(len(ids) for ids in rejected.values())
    assert listing.n_input == kept + n_rejected, (listing.n_input, kept, n_rejected)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": settings.dataset,
        "source_root": os.path.abspath(settings.root),
        "sample_rate": settings.sample_rate,
        "seconds": settings.seconds,
        "n_samples": n_samples_for(settings.sample_rate, settings.seconds),
        "n_leads": len(LEADS),
        "leads": list(LEADS),
        "ecg_encoding": settings.ecg_encoding,   # shards.py documents the three byte layouts
        "schema": shards.schema_description(),
        "input": listing.n_input,
        "kept": kept,
        "rejected": rejected,
        "rejected_counts": {reason: len(ids) for reason, ids in rejected.items()},
        "splits": splits,
        "shards": shard_list,
        "settings": settings.fingerprint(),
    }


# ---------------------------------------------------------------- entry points
def prepare(settings: PrepareSettings, local: bool = False) -> dict[str, Any]:
    """Prepare (or resume preparing) ``settings.out``; returns the manifest it wrote.
    ``local``: process the chunks in this process, without Ray (``--local``)."""
    if storage.is_uri(settings.root):
        raise DataRootError(f"--root {settings.root}: raw records are read with wfdb from a local folder "
                            f"(or a shared file system); only --out may be a URI")
    # Ray workers do not share the driver's working directory: use absolute paths.
    # A URI (s3://, gs://, file://) is never a local path: it goes through pyarrow as it is.
    settings = replace(settings, root=os.path.abspath(settings.root),
                       out=storage.normalise_storage_path(settings.out))
    if settings.dataset not in DATASETS:
        raise DataRootError(f"unknown dataset {settings.dataset!r}; expected one of {DATASETS}")
    if settings.shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if settings.order not in ORDERS:
        raise PrepareError(f"order must be one of {ORDERS}, got {settings.order!r}")
    if settings.ecg_encoding not in shards.ECG_ENCODINGS:
        raise PrepareError(f"ecg_encoding must be one of {shards.ECG_ENCODINGS}, "
                           f"got {settings.ecg_encoding!r}")
    n_samples_for(settings.sample_rate, settings.seconds)   # fails early on impossible settings
    listing = scan_records(settings.dataset, settings.root, settings.limit,
                           settings.min_report_words, settings.sample_rate)
    out = settings.out
    _check_output_folder(out, settings)
    chunks = plan_chunks(listing.refs, settings)
    pending = [chunk for chunk in chunks if not chunk_is_done(out, chunk, settings)]
    run_chunks(pending, settings, local)
    states = []
    for chunk in chunks:
        state = _read_state(out, chunk)
        if state is None or not chunk_is_done(out, chunk, settings):
            raise PrepareError(f"chunk {chunk['split']}/{chunk['index']} did not finish")
        states.append(state)
    manifest = build_manifest(listing, states, settings)
    storage.write_json(storage.join(out, shards.MANIFEST_NAME), manifest)
    return manifest
