"""Shard bytes, read speed and round-trip error of the three ECG encodings (``--ecg-encoding``).

    python bench/storage.py          # ../shared PTB-XL at 500 Hz (259 records) and 100 Hz (1490)
    python bench/storage.py --smoke  # bundled sample, 24 records

For each workload the real records are read once (``load_signal``, as ``prepare`` does),
then written with the real shard writer (``shards.write_shard``: Parquet, snappy) once per
encoding. Measured per encoding: shard bytes per record; read + decode rows/s of one
process (``pyarrow.parquet.read_table`` of the ``ecg`` column + ``decode_ecg`` of every
row, best of 3, the work each Ray Data read task does per shard); and the largest absolute
round-trip error in microvolts against the float32 record, with the record's peak.
No Ray: this measures the format; ``bench/ingest.py`` measures the whole Ray Data path.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C


def workloads(smoke: bool) -> list[dict]:
    from melp_ray.data.sources import bundled_root

    if smoke:
        return [{"name": "bundled@100Hz", "root": bundled_root(), "rate": 100, "limit": 24}]
    out = []
    for folder, rate in (("ptb-xl", 500), ("ptb-xl-100hz", 100)):
        if (C.SHARED_DATA / folder).is_dir():
            out.append({"name": f"{folder}@{rate}Hz", "root": str(C.SHARED_DATA / folder),
                        "rate": rate, "limit": None})
    return out or [{"name": "bundled@100Hz", "root": bundled_root(), "rate": 100, "limit": None}]


def load_records(work: dict) -> list[tuple]:
    from melp_ray.data.records import load_signal
    from melp_ray.data.rejections import RecordRejected
    from melp_ray.data.sources import list_records

    refs = list_records("ptb-xl", work["root"], limit=work["limit"], sample_rate=work["rate"])
    records = []
    for ref in refs:
        try:
            records.append((ref, load_signal(ref, work["root"], work["rate"], 10.0)))
        except RecordRejected:
            continue
    return records


def measure(records: list[tuple], encoding: str, folder: Path) -> dict:
    import pyarrow.parquet as pq
    from melp_ray.data import shards

    rows = [shards.shard_row(ref, "train", signal, encoding) for ref, signal in records]
    path = str(folder / f"{encoding}.parquet")
    shards.write_shard(rows, path)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        column = pq.read_table(path, columns=["ecg"]).column("ecg").to_pylist()
        decoded = [shards.decode_ecg(data) for data in column]
        best = min(best, time.perf_counter() - start)
    errors = [float(np.abs(d - s).max()) for d, (_, s) in zip(decoded, records)]
    return {"bytes_per_record": Path(path).stat().st_size / len(records),
            "ecg_bytes_per_record": float(np.mean([len(r["ecg"]) for r in rows])),
            "read_decode_rows_per_s": len(records) / best,
            "max_abs_error_uV": 1000 * max(errors),
            "median_max_abs_error_uV": 1000 * float(np.median(errors))}


def main() -> None:
    from melp_ray.data import shards

    args = C.parser("storage", __doc__.splitlines()[0]).parse_args()
    C.watchdog()
    info = C.machine()
    results, lines = {}, []
    for work in workloads(args.smoke):
        C.log(f"{work['name']}: reading records ...")
        records = load_records(work)
        peak = max(float(np.abs(s).max()) for _, s in records)
        per = {}
        with tempfile.TemporaryDirectory() as tmp:
            for encoding in shards.ECG_ENCODINGS:
                per[encoding] = measure(records, encoding, Path(tmp))
                C.log(f"{work['name']} {encoding}: {per[encoding]['bytes_per_record']:.0f} B/record")
        base = per["float32"]
        for encoding, r in per.items():
            r["bytes_vs_float32"] = r["bytes_per_record"] / base["bytes_per_record"]
            r["read_speed_vs_float32"] = r["read_decode_rows_per_s"] / base["read_decode_rows_per_s"]
            lines.append([work["name"], encoding, r["bytes_per_record"], r["bytes_vs_float32"],
                          r["ecg_bytes_per_record"], r["read_decode_rows_per_s"],
                          r["read_speed_vs_float32"], r["max_abs_error_uV"]])
        results[work["name"]] = {"records": len(records), "peak_mV": peak, "encodings": per}
    text = C.table(["workload", "encoding", "shard B/record", "vs float32", "ecg B/record",
                    "read+decode rows/s", "vs float32", "max error uV"], lines)
    C.finish("storage", args, {"machine": info, "workloads": results}, text)


if __name__ == "__main__":
    main()
