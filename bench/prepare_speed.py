"""Records/s of ``melp_ray.prepare`` with 1 and 2 CPUs (a fresh private Ray instance each).

    python bench/prepare_speed.py          # ../shared PTB-XL: 1490 records at 100 Hz, 259 at 500 Hz
    python bench/prepare_speed.py --smoke  # bundled sample, 32 records

Each measurement prepares into a new folder (nothing to resume) and times ``prepare()``
end to end: listing, the Ray Data tasks (read + validate + resample + write Parquet) and
the manifest. Ray's own start-up is timed separately and left out, and a tiny untimed
prepare first lets the fresh instance start its worker processes. The CPU counts are
interleaved (1, 2, 1, 2, ...) so outside load hits both alike; the speed-up is 2-CPU
records/s over 1-CPU records/s (ideal 2.0).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C


def workloads(smoke: bool) -> list[dict]:
    from melp_ray.data.sources import bundled_root

    if smoke:
        return [{"name": "bundled@100Hz", "root": bundled_root(), "rate": 100, "limit": 32,
                 "shard_size": 8}]
    out = []
    big = C.SHARED_DATA / "ptb-xl-100hz"
    out.append({"name": "ptb-xl-100hz@100Hz", "root": str(big) if big.is_dir() else bundled_root(),
                "rate": 100, "limit": None, "shard_size": 64})
    both = C.SHARED_DATA / "ptb-xl"
    if both.is_dir():   # 500 Hz files: 5x the samples to read, like MIMIC-IV-ECG
        out.append({"name": "ptb-xl@500Hz", "root": str(both), "rate": 500, "limit": None,
                    "shard_size": 16})
    return out


def timed_prepare(work: dict, out: str) -> dict:
    from melp_ray.data.prepare import PrepareSettings, prepare

    start = time.perf_counter()
    manifest = prepare(PrepareSettings(dataset="ptb-xl", root=work["root"], out=out,
                                       sample_rate=work["rate"], shard_size=work["shard_size"],
                                       limit=work["limit"]))
    seconds = time.perf_counter() - start
    return {"records": manifest["input"], "kept": manifest["kept"], "seconds": seconds,
            "records_per_s": manifest["input"] / seconds}


def main(argv=None) -> int:
    p = C.parser("prepare_speed", __doc__.splitlines()[0])
    p.add_argument("--cpus", default="1,2", help="CPU counts of the Ray instances to compare")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    cpus = [int(c) for c in args.cpus.split(",")]
    repeats = 1 if args.smoke else args.repeats
    info = C.machine()
    runs: dict[str, dict[int, list]] = {}
    ray_start: dict[int, list] = {n: [] for n in cpus}
    with tempfile.TemporaryDirectory(prefix="melp-bench-prepare-") as tmp:
        for rep in range(repeats):
            for n in cpus:
                C.log(f"repeat {rep + 1}: Ray with {n} CPU(s)")
                with C.Timer() as t:
                    ray = C.start_ray(n, private=True)   # its measure: n CPUs
                ray_start[n].append(t.seconds)
                # Untimed: a fresh Ray spawns its worker processes (and they import wfdb,
                # scipy, pyarrow) on first use; a long prepare pays that once.
                if not args.smoke:
                    warm = workloads(args.smoke)[0]
                    timed_prepare({**warm, "limit": 8, "shard_size": 2}, str(Path(tmp, f"warm-{n}-{rep}")))
                for work in workloads(args.smoke):
                    out = str(Path(tmp, f"{work['name']}-{n}cpu-{rep}"))
                    runs.setdefault(work["name"], {}).setdefault(n, []).append(timed_prepare(work, out))
                ray.shutdown()

    summary = {}
    for name, by_cpu in runs.items():
        rates = {n: sum(r["records"] for r in rs) / sum(r["seconds"] for r in rs) for n, rs in by_cpu.items()}
        summary[name] = {"records_per_s": {str(n): v for n, v in rates.items()},
                         "runs": {str(n): rs for n, rs in by_cpu.items()}}
        if 1 in rates and 2 in rates:
            summary[name]["speedup_2_over_1"] = rates[2] / rates[1]
    result = {"machine": info, "cpus": cpus, "repeats": repeats, "workloads": summary,
              "ray_start_seconds": {str(n): v for n, v in ray_start.items()}}
    rows = []
    for name, s in summary.items():
        for n in cpus:
            rs = s["runs"][str(n)]
            rows.append([name, n, rs[0]["records"], sum(r["seconds"] for r in rs) / len(rs),
                         s["records_per_s"][str(n)], s.get("speedup_2_over_1", "") if n == cpus[-1] else ""])
    text = C.table(["workload", "CPUs", "records", "seconds (mean)", "records/s", "speed-up 2/1"], rows)
    C.finish("prepare_speed", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
