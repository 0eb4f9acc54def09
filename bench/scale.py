"""How the data side's cost grows with the data, and how many CPUs feed one GPU.

    python bench/scale.py                        # N = 1k, 5k, 20k MIMIC-layout records
    python bench/scale.py --sizes 1000,5000,10000
    python bench/scale.py --quick                # smoke: tiny sizes, seconds of each part

Measured:
- prepare, per N: ``prepare()`` end to end (listing, planning, Ray Data chunk tasks,
  manifest) of an N-record MIMIC-IV-ECG-layout root at 500 Hz, in a **fresh driver process
  per N** (so one size's peak cannot hide another's) attached to the benchmark's one private
  Ray instance (``--num-cpus``; each driver gets its own Ray workers): records/s, and the
  driver's peak RSS (``ru_maxrss`` of that process alone; Ray's workers are other
  processes) before and after the timed prepare. Connecting and a small untimed prepare
  (worker pool warm-up) come first and are not timed. The roots are real WFDB records, written by
  ``tests/fixtures/mimic_fixture.write_scaled_mimic_root`` from PTB-XL's own 500 Hz
  waveforms (../shared, else the bundled sample resampled), distinct ids, subjects and
  reports; their ``.dat`` files are hard links to one copy of each source signal, so the
  page cache holds every signal (a cold object store or disk is slower; not measured).
- ingest, per CPU at 500 Hz: rows/s one consumer receives from ``iter_torch_batches`` over
  the Parquet shards that prepare wrote, through the training path (one rank's row slices,
  ``rank_datasets``: read + decode + tokenise, the paper config's micro-batch)
  vs the reference MELP path, a torch ``DataLoader`` reading the same records' WFDB files
  (``bench/ingest.py``'s, as many workers as Ray has CPUs), each divided by those CPUs.
- CPUs per GPU = the paper model's samples/s on one GPU / shards rows/s per CPU. The
  samples/s is ``bench/results/gpu_throughput.json`` or else ``gpu_step.json`` when a real
  (non-smoke) GPU run wrote it, else an estimate: analytic training FLOPs per sample
  (``melp_ray.model.flops``) at 40 % MFU of an H100/H200's 989 TFLOP/s bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C
from melp_ray.data.shards import ECG_ENCODINGS

TARGETS = {"prepare_rate_min_over_max": 0.8, "driver_peak_rss_max_over_min": 1.2,
           "ingest_per_cpu_over_reference": 2.0, "ingest_rows_per_s_per_cpu": 1000.0,
           "ingest_over_bare_read_decode": 0.5}
FULL_SIZES = (1000, 5000, 20000)
QUICK_SIZES = (40, 120)
QUICK_SOURCES = 8   # distinct waveforms written in --quick (all of them otherwise)
ASSUMED_MFU = 0.4
REPO = C.BENCH_DIR.parent
sys.path.insert(0, str(REPO / "tests" / "fixtures"))   # the MIMIC-layout writer


# ---------------------------------------------------------------- roots

def write_root(folder: Path, n: int, templates: Path, max_sources: int | None) -> dict:
    from mimic_fixture import write_scaled_mimic_root

    start = time.perf_counter()
    write_scaled_mimic_root(folder, n, source_root=source_root(), templates=templates,
                            max_sources=max_sources)
    return {"records": n, "write_s": time.perf_counter() - start}


def source_root() -> str | None:
    """../shared PTB-XL (its 500 Hz records) when present, else None: the bundled sample."""
    shared = C.SHARED_DATA / "ptb-xl"
    return str(shared) if (shared / "records500").is_dir() else None


# ---------------------------------------------------------------- prepare, one N per process

def prepare_one(root: str, out: str, num_cpus: int, shard_size: int, warm_up: bool,
                encoding: str = "float32") -> dict:
    """In a fresh process: time ``prepare`` of ``root``; sample this driver's RSS meanwhile.
    On the parent's Ray instance (``$RAY_ADDRESS``, set by ``prepare_in_subprocess``)."""
    from melp_ray.data.prepare import PrepareSettings, prepare

    C.start_ray(num_cpus)
    if warm_up:   # untimed: Ray spawns and imports its worker processes once
        prepare(PrepareSettings(dataset="mimic-iv-ecg", root=root, out=out + "-warmup",
                                sample_rate=500, shard_size=8, limit=2 * 8 * num_cpus))
    settings = PrepareSettings(dataset="mimic-iv-ecg", root=root, out=out, sample_rate=500,
                               shard_size=shard_size, ecg_encoding=encoding)
    with RssSampler() as rss:
        start = time.perf_counter()
        manifest = prepare(settings)
        seconds = time.perf_counter() - start
    return {"records": manifest["input"], "kept": manifest["kept"],
            "shards": len(manifest["shards"]), "seconds": seconds,
            "records_per_s": manifest["input"] / seconds,
            "driver_rss_mib_start": rss.start_mib, "driver_peak_rss_mib": rss.peak_mib,
            "driver_rss_growth_mib": rss.peak_mib - rss.start_mib,
            "driver_ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class RssSampler:
    """Peak resident memory of this process (the driver; Ray's workers are other processes)
    while the block runs, sampled every 20 ms. ``ru_maxrss`` alone would also hold any
    earlier peak of the process (imports, Ray start-up, the warm-up)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start_mib = self.peak_mib = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self._sample())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._sample())


def shards_dir(work: Path, n: int, args) -> Path:
    """Where the N-record shards go: ``shards-N`` (float32), ``shards-N-int16``, ..."""
    suffix = "" if args.ecg_encoding == "float32" else f"-{args.ecg_encoding}"
    return work / f"shards-{n}{suffix}"


def prepare_in_subprocess(root: Path, out: Path, args, ray_address: str) -> dict:
    """``prepare_one`` in a new driver process on this benchmark's Ray instance: one
    instance's start-up (~10 CPU-s) instead of one per N."""
    result = out.parent / f"{out.name}.json"
    cmd = [sys.executable, __file__, "--prepare-one", str(root), str(out), str(result),
           "--num-cpus", str(args.num_cpus), "--shard-size", str(args.shard_size),
           "--ecg-encoding", args.ecg_encoding, *(["--smoke"] if args.smoke else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ray_address})
    if proc.returncode != 0:
        raise RuntimeError(f"prepare of {root} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


# ---------------------------------------------------------------- ingest at 500 Hz

def ingest_per_cpu(root: Path, shards: Path, num_cpus: int, rounds: int, quick: bool) -> dict:
    """Shards via Ray Data vs the reference DataLoader over the same train records, rows/s
    per CPU, with the paper configuration's micro-batch, rate and tokenizer."""
    import ingest as I

    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.data.rows import shard_files, split_refs
    from melp_ray.train.stream import StreamSpec, rank_datasets

    cfg = load_config(PretrainConfig, "paper", [])
    batch = cfg.train.micro_batch_size
    if quick:
        batch = 8   # a few batches out of the quick root
    spec = StreamSpec(sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                      text_model=cfg.model.text_model, max_text_length=cfg.model.max_text_length)
    files = shard_files(str(shards), "train")
    # prepare's defaults (val_fraction 0.1, seed 0): the very records in the train shards
    refs = split_refs("mimic-iv-ecg", str(root), "train", 0.1, 0, None, cfg.data.sample_rate)
    reference = I.reference_loader(refs, str(root), batch, num_cpus)
    # The training path: one rank's pipeline (row slices of the files, read by Ray Data tasks).
    paths = {"shards": lambda: I.ray_rate(rank_datasets(str(shards), "train", 1, spec)[0], batch),
             "reference": lambda: I.timed_pass(iter(reference))}
    cold = {} if quick else {name: run() for name, run in paths.items()}
    runs: dict[str, list] = {name: [] for name in paths}
    for i in range(rounds):   # interleaved: a burst of outside load hits both alike
        for name, run in paths.items():
            C.log(f"ingest round {i + 1}/{rounds}: {name}")
            runs[name].append(run())
    I.close_loader(reference)
    rate = {k: sum(r["rows"] for r in v) / sum(r["seconds"] for r in v) for k, v in runs.items()}
    bare = bare_read_decode(files, spec)
    return {"micro_batch": batch, "sample_rate": cfg.data.sample_rate, "cpus": num_cpus,
            "bare_read_decode_rows_per_cpu_s": bare,
            "train_records": len(refs), "shard_files": len(files), "passes": runs,
            "cold_passes": cold, "rows_per_s": rate,
            "rows_per_s_per_cpu": {k: v / num_cpus for k, v in rate.items()},
            "shards_over_reference": rate["shards"] / rate["reference"],
            "shards_over_bare": rate["shards"] / num_cpus / bare}


def bare_read_decode(files: list[str], spec, passes: int = 2) -> float:
    """Rows per CPU-second of reading and decoding the same shards in this one process,
    without Ray: the stream's own read task (``read_slices``: pyarrow reads each file, the
    same batches decoded, normalised, tokenised) called directly. The best of ``passes``."""
    from melp_ray.train.stream import read_slices, rows_per_yield

    whole_files = {"path": list(files), "start": [0] * len(files), "stop": [1 << 62] * len(files)}
    best = 0.0
    for _ in range(passes):
        rows, start = 0, time.process_time()
        for batch in read_slices(whole_files, spec, rows=rows_per_yield(spec)):
            rows += len(batch["ecg"])
        best = max(best, rows / (time.process_time() - start))
    return best


# ---------------------------------------------------------------- GPU side

def gpu_samples_per_s() -> dict:
    """Paper model samples/s on one GPU: measured by gpu_throughput.py (the whole path) or
    else gpu_step.py (the training step alone) if either ran on a GPU, else the FLOPs
    estimate at ``ASSUMED_MFU``."""
    for name in ("gpu_throughput.json", "gpu_step.json"):
        measured = C.RESULTS_DIR / name
        if not measured.is_file():
            continue
        data = json.loads(measured.read_text())
        rates = [r["samples_per_s"] for r in data.get("stages", {}).values()
                 if isinstance(r, dict) and r.get("samples_per_s")]
        if rates and not data.get("smoke"):
            gpu = data.get("machine", {}).get("gpu", "a GPU")
            return {"samples_per_s": max(rates),
                    "source": f"measured on {gpu} ({measured.name}, batch {data.get('batch')})"}
    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.model.flops import PEAK_FLOPS, training_flops

    cfg = load_config(PretrainConfig, "paper", [])
    flops = training_flops(cfg.model, int(cfg.data.sample_rate * cfg.data.seconds))
    peak = PEAK_FLOPS["h100-sxm-bf16"]
    return {"samples_per_s": ASSUMED_MFU * peak / flops, "train_flops_per_sample": flops,
            # FLOPs at the padded text length: the most a sample can cost (the model trims
            # each batch to its longest report), so the fewest samples/s at this MFU.
            "source": f"estimate: {flops / 1e9:.1f} GFLOP/sample (text padded) at {ASSUMED_MFU:.0%} MFU "
                      f"of {peak / 1e12:.0f} TFLOP/s (H100/H200 bf16)"}


# ---------------------------------------------------------------- driver

def verdicts(prepares: list[dict], ingest: dict) -> tuple[dict, dict]:
    rates = [p["records_per_s"] for p in prepares]
    peaks = [p["driver_peak_rss_mib"] for p in prepares]
    ratios = {"prepare_rate_min_over_max": min(rates) / max(rates),
              "driver_peak_rss_max_over_min": max(peaks) / min(peaks),
              "ingest_per_cpu_over_reference": ingest["shards_over_reference"],
              "ingest_rows_per_s_per_cpu": ingest["rows_per_s_per_cpu"]["shards"],
              "ingest_over_bare_read_decode": ingest["shards_over_bare"]}
    return ratios, {
        "prepare_rate_min_over_max": C.check(ratios["prepare_rate_min_over_max"], 0.8),
        "driver_peak_rss_max_over_min": C.check(ratios["driver_peak_rss_max_over_min"], 1.2,
                                                higher_is_better=False),
        "ingest_per_cpu_over_reference": C.check(ratios["ingest_per_cpu_over_reference"], 2.0),
        "ingest_rows_per_s_per_cpu": C.check(ratios["ingest_rows_per_s_per_cpu"], 1000.0),
        "ingest_over_bare_read_decode": C.check(ratios["ingest_over_bare_read_decode"], 0.5)}


def memory_slope(prepares: list[dict]) -> float:
    """Driver RSS growth during prepare, per record (bytes), from the smallest to the largest N."""
    a, b = prepares[0], prepares[-1]
    return ((b["driver_rss_growth_mib"] - a["driver_rss_growth_mib"]) * 2**20
            / max(b["records"] - a["records"], 1))


def report(result: dict) -> str:
    rows = [[f"prepare N={p['records']:,}", f"{p['records_per_s']:.0f} records/s "
             f"({p['seconds']:.1f} s)", f"driver RSS peak {p['driver_peak_rss_mib']:.0f} MiB "
             f"(+{p['driver_rss_growth_mib']:.1f} during prepare)", ""] for p in result["prepare"]]
    r, v, ing, gpu = result["ratios"], result["verdicts"], result["ingest"], result["gpu"]
    per_cpu = ing["rows_per_s_per_cpu"]
    rows += [
        ["prepare records/s, slowest / fastest N", r["prepare_rate_min_over_max"], ">= 0.8",
         v["prepare_rate_min_over_max"]],
        ["driver RSS peak during prepare, largest / smallest", r["driver_peak_rss_max_over_min"], "<= 1.2",
         v["driver_peak_rss_max_over_min"]],
        ["  growth per record (bytes) / at 800k records (MiB)",
         f"{result['memory_bytes_per_record']:.0f} / {result['memory_at_800k_mib']:.0f}", "", ""],
        [f"ingest 500 Hz, shards ({result['ecg_encoding']}), per CPU (batch {ing['micro_batch']}, rows/s)",
         per_cpu["shards"], ">= 1000", v["ingest_rows_per_s_per_cpu"]],
        ["bare read + decode of the same shards, one process (rows per CPU-s)",
         ing["bare_read_decode_rows_per_cpu_s"], "", ""],
        ["shards ingest / bare read + decode", r["ingest_over_bare_read_decode"], ">= 0.5",
         v["ingest_over_bare_read_decode"]],
        ["ingest 500 Hz, reference DataLoader, per CPU (rows/s)", per_cpu["reference"], "", ""],
        ["shards / reference", r["ingest_per_cpu_over_reference"], ">= 2",
         v["ingest_per_cpu_over_reference"]],
        [f"paper model samples/s per GPU ({gpu['source']})", gpu["samples_per_s"], "", ""],
        ["CPUs per GPU = samples/s / shards rows/s per CPU", result["cpus_per_gpu"], "", ""],
        ["  with the reference DataLoader instead", result["cpus_per_gpu_reference"], "", ""],
    ]
    return C.table(["measure", "value", "target", "verdict"], rows)


def main(argv=None) -> int:
    p = C.parser("scale", __doc__.splitlines()[0])
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated N (default {','.join(map(str, FULL_SIZES))}; "
                        f"--quick: {','.join(map(str, QUICK_SIZES))})")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (same as --smoke)")
    p.add_argument("--shard-size", type=int, default=256, help="prepare --shard-size")
    p.add_argument("--rounds", type=int, default=2, help="timed ingest passes of each path")
    p.add_argument("--ecg-encoding", default="float32", choices=ECG_ENCODINGS,
                   help="prepare --ecg-encoding of the shards (their folders are named after it)")
    p.add_argument("--ingest-size", type=int, default=None,
                   help="N whose root and shards the ingest comparison reads "
                        "(default: 5000 if measured, else the smallest N)")
    p.add_argument("--work", default=None, help="keep roots and shards here (default: a temp dir)")
    p.add_argument("--prepare-one", nargs=3, metavar=("ROOT", "OUT", "RESULT"),
                   help=argparse.SUPPRESS)   # the per-N child process
    args = p.parse_args(argv)
    if args.prepare_one:
        root, out, result = args.prepare_one
        Path(result).write_text(json.dumps(prepare_one(root, out, args.num_cpus, args.shard_size,
                                                       not args.smoke, args.ecg_encoding)))
        return 0
    args.smoke = args.smoke or args.quick
    if args.smoke and args.shard_size == 256:
        args.shard_size = 16
    sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else \
        list(QUICK_SIZES if args.smoke else FULL_SIZES)
    info = C.machine()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="melp-bench-scale-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    # One private instance of --num-cpus CPUs (rates per CPU: never a cluster's), that every
    # part runs on: the per-N prepare processes attach to it.
    ray = C.start_ray(args.num_cpus, private=True)
    address = ray.get_runtime_context().gcs_address
    roots, prepares = {}, []
    for n in sizes:
        C.log(f"writing a {n}-record MIMIC-layout root")
        roots[n] = write_root(work / f"root-{n}", n, work / "templates",
                              QUICK_SOURCES if args.smoke else None)
        C.log(f"prepare of {n} records (fresh process)")
        prepares.append(prepare_in_subprocess(work / f"root-{n}", shards_dir(work, n, args),
                                              args, address))
        C.log(f"  {prepares[-1]['records_per_s']:.0f} records/s, "
              f"driver peak {prepares[-1]['driver_peak_rss_mib']:.0f} MiB")
    ingest_n = args.ingest_size or (5000 if 5000 in sizes else sizes[0])
    C.log(f"ingest at 500 Hz over the {ingest_n}-record shards vs the reference DataLoader")
    ingest = ingest_per_cpu(work / f"root-{ingest_n}", shards_dir(work, ingest_n, args),
                            args.num_cpus, 1 if args.smoke else args.rounds, args.smoke)
    ray.shutdown()
    gpu = gpu_samples_per_s()
    ratios, verdict = verdicts(prepares, ingest)
    slope = memory_slope(prepares)
    result = {
        "machine": info, "sizes": sizes, "ray_cpus": args.num_cpus, "shard_size": args.shard_size,
        "ecg_encoding": args.ecg_encoding,
        "source_root": source_root() or "bundled (100 Hz resampled to 500 Hz)",
        "roots": roots, "prepare": prepares, "ingest": ingest, "ingest_records": ingest_n,
        "gpu": gpu, "memory_bytes_per_record": slope, "memory_at_800k_mib": slope * 800_000 / 2**20,
        "cpus_per_gpu": gpu["samples_per_s"] / ingest["rows_per_s_per_cpu"]["shards"],
        "cpus_per_gpu_reference": gpu["samples_per_s"] / ingest["rows_per_s_per_cpu"]["reference"],
        "ratios": ratios, "targets": TARGETS, "verdicts": verdict,
    }
    if tmp is not None:
        tmp.cleanup()
    C.finish("scale", args, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
