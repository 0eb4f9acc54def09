"""python -m melp_ray.prepare: turn a raw ECG root into Parquet shards, with Ray Data.

    python -m melp_ray.prepare --dataset ptb-xl --root DIR --out OUT

How it works: ``melp_ray.data.prepare``; the formats: docs/data.md.
"""
from __future__ import annotations

import argparse
import sys

from melp_ray.data import shards
from melp_ray.data.leads import LEADS
from melp_ray.data.prepare import ORDERS, PrepareError, PrepareSettings, prepare
from melp_ray.data.sources import DATASETS, DataRootError
from melp_ray.utils import storage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.prepare",
        description="Convert a raw PTB-XL, MIMIC-IV-ECG or manifest root (ecg_manifest.csv: your own "
                    ".npy / HDF5 / EDF / WFDB files, docs/data.md) into Parquet shards (with Ray Data). "
                    "Each record is read, its leads are mapped by name to "
                    f"{', '.join(LEADS)}, it is checked (NaN/Inf, flat, length, report) and "
                    "resampled; rejected records are listed by reason in OUT/manifest.json. "
                    "Re-running with the same arguments resumes and skips finished shards. "
                    "Attaches to a running Ray cluster (ray start / RAY_ADDRESS) or starts a local one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="layout of --root")
    parser.add_argument("--root", required=True, help="dataset root (holds ptbxl_database.csv, record_list.csv or "
                                                         "ecg_manifest.csv/.parquet)")
    parser.add_argument("--out", required=True,
                        help="output folder for <split>/part-NNNNN.parquet and manifest.json: a local path or "
                             "a URI (s3://bucket/x, gs://bucket/x, file:///x; an S3-compatible endpoint via "
                             "s3://bucket/x?endpoint_override=host:port&scheme=http)")
    parser.add_argument("--sample-rate", type=int, default=500, help="target sampling rate in Hz")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="duration kept per record; shorter records are rejected, longer ones cropped")
    parser.add_argument("--shard-size", type=int, default=256, help="records listed per shard (one Ray task each)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of subjects in the val split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject split hash and of the record shuffle")
    parser.add_argument("--order", choices=ORDERS, default="shuffled",
                        help="record order across shards: a seeded shuffle of each split, or the "
                             "source's listing order (MIMIC's is by subject)")
    parser.add_argument("--ecg-encoding", choices=shards.ECG_ENCODINGS, default="float32",
                        help="bytes per sample of the stored ECG: float32 (exact), float16 or int16 "
                             "with a per-lead scale (half the size; errors in docs/data.md)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records of the listing (smoke runs)")
    parser.add_argument("--min-report-words", type=int, default=None,
                        help="reject reports with fewer words (default: 4 for mimic-iv-ecg, 1 for ptb-xl)")
    parser.add_argument("--local", action="store_true",
                        help="process the chunks one after the other in this process, without Ray "
                             "(small roots; the same shards)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = PrepareSettings(
        dataset=args.dataset, root=args.root, out=args.out, sample_rate=args.sample_rate,
        seconds=args.seconds, shard_size=args.shard_size, val_fraction=args.val_fraction,
        seed=args.seed, limit=args.limit, min_report_words=args.min_report_words, order=args.order,
        ecg_encoding=args.ecg_encoding)
    try:
        manifest = prepare(settings, local=args.local)
    except (DataRootError, PrepareError, ValueError, OSError) as err:   # OSError: storage went away
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    counts = {reason: n for reason, n in manifest["rejected_counts"].items() if n}
    print(f"prepared {manifest['kept']} of {manifest['input']} records into {len(manifest['shards'])} shards "
          f"(train {manifest['splits']['train']['records']}, val {manifest['splits']['val']['records']}); "
          f"rejected: {counts or 'none'}; manifest: {storage.join(settings.out, shards.MANIFEST_NAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
