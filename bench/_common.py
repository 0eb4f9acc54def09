"""Shared plumbing of the benchmarks: arguments, machine facts, Ray (a private instance, or
the cluster at ``$RAY_ADDRESS``), tables, JSON."""
from __future__ import annotations

import argparse
import datetime as _dt
import faulthandler
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

# Before torch / ray / deepspeed are imported by any benchmark. (DS_ACCELERATOR is left
# alone: the launcher sets "cpu" for CPU runs, and GPU runs must keep CUDA.)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

TIMEOUT_ENV = "MELP_BENCH_TIMEOUT_S"
WATCHDOG_MARK = "[bench watchdog]"
BACKSTOP_S = 30      # faulthandler's own exit, should the watchdog thread never get to run
_stall_s = 0.0       # the armed watchdog's seconds (0: none); every log() line re-arms it
_deadline = 0.0
_thread = None


def watchdog(seconds: float | None = None) -> None:
    """Never hang silently.

    - a fatal signal (segfault, abort) prints the Python stack of every thread;
    - ``kill -USR1 PID`` prints it at any time and carries on (a stuck benchmark: where?);
    - with ``seconds`` (default ``$MELP_BENCH_TIMEOUT_S``; unset or 0: never), a benchmark
      that goes that long without a progress line (``log``) prints the stack of every thread
      of its own, those of its ``spawn`` children (SIGUSR1) and, when ``py-spy`` is
      installed, those of the Ray processes it started, then exits with code 1. Each
      ``log`` line starts the clock again: the limit is on one stage (a hang), not on the
      whole run (a slow machine). Should Python itself be stuck (a C call holding the GIL),
      faulthandler's C thread prints the stacks and exits ``BACKSTOP_S`` later.
    Armed when this module is imported, i.e. in every benchmark before torch or Ray. A
    ``spawn`` child of a benchmark (it imports the benchmark, hence this module) only
    registers SIGUSR1: its parent's watchdog asks it for its stack.
    """
    global _stall_s, _thread
    faulthandler.enable(all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if "--multiprocessing-fork" in sys.argv or multiprocessing.parent_process() is not None:
        return   # a spawn child (parent_process() is only set after it imported its main)
    if seconds is None:
        seconds = float(os.environ.get(TIMEOUT_ENV) or 0)
    _stall_s = max(seconds, 0.0)
    faulthandler.cancel_dump_traceback_later()
    if _stall_s:
        _rearm()
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="bench-watchdog", daemon=True)
            _thread.start()


def _rearm() -> None:
    global _deadline
    _deadline = time.monotonic() + _stall_s
    faulthandler.dump_traceback_later(_stall_s + BACKSTOP_S, exit=True)   # replaces the last


def _watch() -> None:
    while True:
        time.sleep(0.2)
        if _stall_s and time.monotonic() > _deadline:
            break
    faulthandler.dump_traceback_later(BACKSTOP_S, exit=True)   # should the dumps below hang
    print(f"\n{WATCHDOG_MARK} no progress for {_stall_s:g} s: the stack of every thread of "
          f"this process (pid {os.getpid()}), then of its child processes", file=sys.stderr,
          flush=True)
    faulthandler.dump_traceback(all_threads=True)
    try:
        dump_children()
    finally:
        sys.stderr.flush()
        os._exit(1)


def dump_children(limit_s: float = 20.0) -> None:
    """Stacks of this process's descendants: ``spawn`` children by SIGUSR1 (they registered
    faulthandler through this module), Ray's Python processes with ``py-spy`` if installed."""
    try:
        import psutil
    except ImportError:
        return
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    end = time.monotonic() + limit_s
    signalled = False
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing.spawn" in cmd or "spawn_main" in cmd:
            print(f"{WATCHDOG_MARK} spawn child pid {child.pid}: its stack (SIGUSR1)",
                  file=sys.stderr, flush=True)
            os.kill(child.pid, signal.SIGUSR1)
            signalled = True
        elif spy and cmd.startswith("ray::") and not cmd.startswith(("ray::IDLE", "ray::Dashboard",
                                                                          "ray::RuntimeEnvAgent")):
            left = end - time.monotonic()
            if left <= 1:
                break
            print(f"{WATCHDOG_MARK} {cmd.split()[0]} pid {child.pid} (py-spy dump):",
                  file=sys.stderr, flush=True)
            try:
                subprocess.run([spy, "dump", "--pid", str(child.pid)], stdout=sys.stderr,
                               stderr=sys.stderr, timeout=min(left, 10))
            except (subprocess.SubprocessError, OSError) as err:
                print(f"  (py-spy: {err})", file=sys.stderr, flush=True)
    if signalled:
        time.sleep(2)   # their handlers write to the same stderr


watchdog()

# No process pool may fork from a benchmark: by the time one starts, Ray (gRPC, its own
# threads, thread pools) runs in this process, and a child forked from a multi-threaded
# parent can inherit a lock some thread held and hang forever (seen: a DataLoader worker
# stuck in wfdb.rdsamp -> pandas). "spawn" starts a fresh interpreter instead; code that
# builds a pool should still name its context (``MP_CONTEXT``) rather than rely on this.
multiprocessing.set_start_method("spawn", force=True)
MP_CONTEXT = multiprocessing.get_context("spawn")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = BENCH_DIR.parent.parent / "shared" / "data"


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python bench/{name}.py", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"), help="where to write the JSON")
    p.add_argument("--smoke", action="store_true", help="a few seconds' run that checks the code path (CI)")
    p.add_argument("--num-cpus", type=int, default=2,
                   help="CPUs of the private local Ray instance (not with $RAY_ADDRESS: the cluster's)")
    return p


def data_root_100hz(smoke: bool) -> str:
    """The largest 100 Hz PTB-XL root available (the bundled 259 records in smoke mode)."""
    from melp_ray.data.sources import bundled_root

    big = SHARED_DATA / "ptb-xl-100hz"
    return str(big) if big.is_dir() and not smoke else bundled_root()




def start_ray(num_cpus: int, private: bool = False, **kwargs):
    """The Ray instance a benchmark runs on.

    ``$RAY_ADDRESS`` set (a cluster's address, e.g. ``10.0.0.5:6379``; not "local"): attach to
    that cluster, as any Ray script does, so a benchmark measures the cluster it is run on;
    ``num_cpus`` and ``kwargs`` are then the cluster's own (logged) and an address that does
    not answer is an error (exit 2), never a fallback. Otherwise a private local instance with
    ``num_cpus`` CPUs: never a cluster that ``ray start`` left on the machine. ``private``: a
    private instance whatever ``$RAY_ADDRESS`` says, for a benchmark whose measure is the
    instance itself (its CPU count, its start-up).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "local" and not private:
        attach_ray(address)
    else:
        start_private_ray(num_cpus, **kwargs)
    from ray.data import DataContext

    import logging

    for noisy in ("ray.data", "ray.train", "ray.tune"):   # keep the tables readable
        logging.getLogger(noisy).setLevel(logging.WARNING)

    DataContext.get_current().enable_progress_bars = False
    return ray


def attach_ray(address: str) -> None:
    """Connect to the cluster at ``address`` (probed first: no minutes of Ray's retries).
    Its processes keep the environment they were started with, and they import this
    benchmark's modules from the driver's ``sys.path``, which Ray hands to its workers."""
    import ray

    from melp_ray.utils.ray_connect import fail, probe

    problem = probe(address)
    if problem:
        fail(f"error: cannot reach the Ray cluster at {address} (from RAY_ADDRESS): {problem}")
    ray.init(address=address, configure_logging=False, log_to_driver=False)
    log(f"attached to the Ray cluster at {address} (RAY_ADDRESS): "
        f"{ray.cluster_resources().get('CPU', 0):g} CPUs; --num-cpus does not apply")


def start_private_ray(num_cpus: int, **kwargs) -> None:
    # Ray starts its worker processes at nice 15. On a busy machine that alone makes them
    # several times slower than a plain process at nice 0 (measured: 4x in overhead.py),
    # so every Ray-vs-plain comparison would measure the scheduler. Same priority for all.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from melp_ray.utils.ray_connect import init_local_ray

    # Ray's processes inherit this environment (DS_ACCELERATOR, HF_HUB_OFFLINE, ...): no
    # runtime_env, which would cost each worker start about a second. Tried again when Ray's
    # fixed 30 s for the raylet runs out on a loaded machine (ray_utils.init_local_ray).
    init_local_ray(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                   log_to_driver=False, **kwargs)


def smoke_data_limit() -> None:
    """``--smoke``: this driver's Ray Data runs one task at a time. Its tasks run on worker
    processes of its own (one set per driver), each of which imports torch, transformers and
    melp_ray first (~6 CPU-s); a smoke's few records need no second one."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    options.resource_limits = options.resource_limits.copy(cpu=1)


def ray_cpus() -> int:
    """CPUs of the Ray instance this benchmark runs on (a cluster's: all its nodes')."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


def run_windows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The log windows a ``melp_ray.pretrain`` run wrote to its metrics.jsonl."""
    path = Path(summary["run_dir"], "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The windows after the first (the first holds start-up: first batch, warm-up)."""
    return windows[1:] or windows


def mean_of(windows: list[dict[str, Any]], key: str) -> float:
    return sum(w[key] for w in windows) / len(windows) if windows else float("nan")


def as_a_training_worker() -> None:
    """Run this script again (``os.execve``, same arguments) with the environment a training
    worker starts with (``train.worker_env``'s default) unless it is set already: glibc reads
    it at process start. A step measured in the script's process then runs as in a worker;
    both steps of a comparison share it. Call it from ``if __name__ == "__main__"`` only."""
    from melp_ray.config_sections import KEEP_FREED_MEMORY_ENV

    missing = {k: v for k, v in KEEP_FREED_MEMORY_ENV.items() if k not in os.environ}
    if missing:
        log(f"re-running with the training workers' environment: {missing}")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def report_token_counts(shards_root: str, text_model: str, max_length: int) -> list[int]:
    """Tokens per report (``attention_mask`` sums, as training lays them out) of every shard
    under ``shards_root``: what ``flops.mean_training_flops`` needs for a run's text widths."""
    import pyarrow.parquet as pq

    from melp_ray.text.report_ids import encode_reports, load_report_tokenizer

    reports = [r for path in sorted(Path(shards_root).rglob("*.parquet"))
               for r in pq.read_table(path, columns=["report"])["report"].to_pylist()]
    rows = encode_reports(load_report_tokenizer(text_model), [str(r) for r in reports], max_length)
    return rows["attention_mask"].sum(axis=1).tolist()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_start": load_average(),
        "ray_worker_niceness": os.environ.get("RAY_worker_niceness", "0 (set by start_ray)"),
        "ray_address": os.environ.get("RAY_ADDRESS") or None,   # None: a private instance
        # glibc's allocator settings of this process (as_a_training_worker, train.worker_env)
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }
    for module in ("torch", "ray", "deepspeed"):
        try:
            info[module] = __import__(module).__version__
        except Exception:   # noqa: BLE001 - a version we cannot read is not an error here
            info[module] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:   # noqa: BLE001
        pass
    return info


def log(message: str) -> None:
    """Progress on stderr with a timestamp (the table goes to stdout); re-arms the watchdog."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
    if _stall_s:
        _rearm()


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def check(value: float, target: float, higher_is_better: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def finish(name: str, args, result: dict[str, Any], text: str) -> None:
    """Print the table, add machine facts + load, write the JSON."""
    result = {"benchmark": name, "smoke": bool(args.smoke), **result}
    result["machine"]["load_avg_end"] = load_average()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result["machine"]
    print(f"\n== {name} ({'smoke' if args.smoke else 'full'}) on {m['host_cpus']} CPUs"
          f"{', ' + m['gpu'] if m.get('gpu') else ''}; load avg start {m['load_avg_start']} "
          f"end {m['load_avg_end']}; torch {m['torch']}, ray {m['ray']}, deepspeed {m['deepspeed']}")
    print(text)
    print(f"wrote {out}")
    sys.stdout.flush()
