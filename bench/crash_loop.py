"""Do training workers crash? N short real pretraining runs, each crash counted and located (#30).

    python bench/crash_loop.py --runs 8 --steps 150                  # the shipped small config
    python bench/crash_loop.py --runs 8 --label omp1 --env OMP_NUM_THREADS=1
    python bench/crash_loop.py --runs 8 --label before --pythonpath /work/wt/segv-before
    python bench/crash_loop.py --smoke                               # tiny config, 1 run, 3 steps

Each run is a fresh ``python -m melp_ray.pretrain`` process (its own local Ray instance under
its own ``RAY_TMPDIR``, so its worker logs are its own) on the 1,490-record 100 Hz PTB-XL set
with the shipped ``small`` config and ``run.max_failures`` (default 0: the first worker
death ends the run, which is what is counted). Every process of the run has
``PYTHONFAULTHANDLER=1``: a fatal signal prints the Python stack of *every* thread (Ray
itself only enables the current thread's). After the run, the run's output and every Ray log
file of its session are scanned for fatal signals ("Fatal Python error", Ray's
"*** SIGSEGV received" / "SIGABRT" handler lines) and the stack dumps go into the JSON.
While the run trains, one RayTrainWorker is inspected once: its thread count and names and
which allocators / OpenMP / BLAS runtimes it has mapped (``/proc/PID/maps``); and every
second each worker's thread ids and names are noted, so that the thread a crash report names
(Ray's handler prints ``E PID TID``) can be named. Core dumps are on for the run's processes
(``RLIMIT_CORE``): a crashed worker's core gets a native backtrace of the crashing thread and of
all threads (``gdb -batch``), kept in the JSON; the core itself is then deleted.

With ``--lock FILE`` (default the machine's heavy-job lock) each run takes that lock for
itself, so other jobs of the shared machine can go between runs: do not also run this
script under ``flock`` on the same file. Not a CI test: a full loop takes N x a few minutes.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import _common as C
from melp_ray.config_sections import KEEP_FREED_MEMORY_ENV

REPO = Path(__file__).resolve().parent.parent
GUARD_SOURCE = REPO / "bench" / "native" / "freed_guard.c"
FATAL_MARKERS = ("Fatal Python error", "*** SIGSEGV", "*** SIGABRT", "*** SIGBUS", "*** SIGFPE",
                 "Segmentation fault")
# What a mapped library's name says it is (checked on a live RayTrainWorker).
RUNTIME_LIBS = ("jemalloc", "tcmalloc", "mimalloc", "gomp", "iomp", "openblas", "mkl",
                "deepspeed", "shm_comm", "gloo")
TAIL_LINES = 60
BACKTRACE_LINES = 400
# After the backtraces, in the crashing thread (glibc has debug info here): its tcache's
# free-list heads and counts and the registers where malloc stopped, i.e. the bad pointer
# and, XORed with its slot's address >> 12 (glibc's safe-linking), the value written there.
TCACHE_FORENSICS = ("-ex", "frame function __libc_malloc", "-ex", "p *tcache",
                    "-ex", "info registers")
# Ray's C++ failure handler: "[date time,ms E PID TID] logging.cc:...: *** SIGABRT received"
RAY_HANDLER_LINE = re.compile(r"\bE (\d+) (\d+)\] logging\.cc:\d+: \*\*\* (SIG\w+) received")


def parse_args():
    p = C.parser("crash_loop", __doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8, help="how many runs")
    p.add_argument("--steps", type=int, default=150, help="train.max_steps of each run")
    p.add_argument("--config", default="small", help="the pretrain config")
    p.add_argument("--root", default=str(C.SHARED_DATA / "ptb-xl-100hz"), help="data.root")
    p.add_argument("--max-failures", type=int, default=0,
                   help="run.max_failures (0: a worker death ends the run)")
    p.add_argument("--label", default="default", help="names the JSON (crash_loop_LABEL.json)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of every run (a hypothesis: OMP_NUM_THREADS=1, ...)")
    p.add_argument("--pythonpath", default=str(REPO),
                   help="the melp_ray checkout the runs import (e.g. an older commit's worktree)")
    p.add_argument("--run-timeout", type=float, default=900, help="seconds before a run is killed")
    p.add_argument("--lock", default="/tmp/melp-heavy.lock",
                   help="lock file each run holds ('' for none)")
    p.add_argument("--workdir", default="/tmp/melp_crash", help="Ray temp dirs and run folders")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the Ray logs and run folder of runs that did not crash")
    p.add_argument("--guard", action="store_true",
                   help="preload bench/native/freed_guard.c into the training workers: writes "
                        "into freed small blocks and double frees are reported with stacks")
    p.add_argument("--guard-max", type=int, default=56,
                   help="with --guard: quarantine freed blocks of at most this many usable bytes")
    p.add_argument("overrides", nargs="*", help="extra key=value pretrain overrides")
    args = p.parse_args()
    if args.out == str(C.RESULTS_DIR / "crash_loop.json"):
        args.out = str(C.RESULTS_DIR / f"crash_loop_{args.label}.json")
    return args


@contextlib.contextmanager
def heavy_lock(path: str):
    if not path:
        yield 0.0
        return
    start = time.perf_counter()
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - start
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_command(args, name: str, store: Path) -> list[str]:
    if args.smoke:
        config, root = "tiny", None
        steps = ["train.max_steps=3", "train.log_every=1", "train.val_every=0",
                 "train.checkpoint_every=3"]
    else:
        config, root = args.config, args.root
        steps = [f"train.max_steps={args.steps}", "train.log_every=10"]
    cmd = [sys.executable, "-m", "melp_ray.pretrain", "--config", config, *steps,
           f"run.max_failures={args.max_failures}", f"run.storage_path={store}",
           f"run.name={name}", *guard_overrides(args, store.parent / "guard"), *args.overrides]
    return cmd + ([f"data.root={root}"] if root else [])


def build_guard(workdir: str) -> str:
    """Compile the freed-block guard (a few seconds; gcc is on the machine)."""
    out = Path(workdir, "freed_guard.so")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(GUARD_SOURCE)],
                   check=True)
    return str(out)


def guard_overrides(args, folder: Path) -> list[str]:
    """train.worker_env for a guarded run: the shipped variables plus the preload (the
    training workers only: that is where the crashes are)."""
    if not args.guard_so:
        return []
    env = {**KEEP_FREED_MEMORY_ENV, "LD_PRELOAD": args.guard_so, "FREED_GUARD_DIR": str(folder),
           "FREED_GUARD_MAX": str(args.guard_max)}
    return [f"train.worker_env.{k}='{v}'" for k, v in env.items()]


def guard_reports(folder: Path) -> tuple[int, list[dict], dict[int, int]]:
    """(guarded processes, every report, each process's latest quarantine window in ms) from
    a guarded run's folder."""
    logs = sorted(folder.glob("*.log"))
    reports, windows = [], {}
    for log in logs:
        text = log.read_text(errors="replace")
        for block in text.split("\n== ")[1:]:
            reports.append({"pid": int(log.stem), "kind": block.split(" #")[0],
                            "lines": block.splitlines()[:BACKTRACE_LINES]})
        for ms in re.findall(r"^window: .* after (\d+) ms$", text, re.M):
            windows[int(log.stem)] = int(ms)
    return len(logs), reports, windows


def run_env(args, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONFAULTHANDLER": "1", "RAY_ADDRESS": "local", "RAY_TMPDIR": str(tmp),
                "PYTHONPATH": args.pythonpath, "PYTHONUNBUFFERED": "1"})
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def train_workers(root_pid: int) -> list[int]:
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child.pid)
    return found


def inspect_worker(pid: int) -> dict:
    """Threads and native runtimes of a live training worker."""
    info: dict = {"pid": pid}
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        threads = live_threads(pid)
    except OSError as err:
        return {"pid": pid, "error": str(err)}
    libs = sorted({line.split()[-1] for line in maps.splitlines()
                   if line.split()[-1].startswith("/") and ".so" in line.split()[-1]})
    info["runtime_libs"] = [lib for lib in libs
                            if any(key in Path(lib).name.lower() for key in RUNTIME_LIBS)]
    info["threads"] = len(threads)
    info["thread_names"] = dict(sorted(Counter(threads.values()).items()))
    with contextlib.suppress(OSError):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        info["env"] = {k: v for k, _, v in (e.decode(errors="replace").partition("=")
                                            for e in environ)
                       if k in ("LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                "MALLOC_ARENA_MAX", "PYTHONFAULTHANDLER")}
    return info


def live_threads(pid: int) -> dict[int, str]:
    """{thread id: name} of a live process (OSError once it is gone; a thread that ends while
    it is read is left out)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found[int(task.name)] = Path(task, "comm").read_text().strip()
    return found


def thread_names(pids: list[int], into: dict[int, dict[int, str]]) -> None:
    """Note each worker's {thread id: name} (threads come and go: keep every one seen)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            seen = into.setdefault(pid, {})
            for tid, name in live_threads(pid).items():
                seen.setdefault(tid, name)   # a reused id keeps its first name


def worker_cwds(pids: list[int], into: set[str]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            into.add(os.readlink(f"/proc/{pid}/cwd"))


def crashed_threads(reports: list[dict], names: dict[int, dict[int, str]]) -> list[dict]:
    """Each (pid, tid, signal) Ray's handler reported, with the thread's name when seen."""
    found = {}
    for report in reports:
        for line in report["lines"]:
            m = RAY_HANDLER_LINE.search(line)
            if m:
                pid, tid = int(m.group(1)), int(m.group(2))
                found[(pid, tid)] = {"pid": pid, "tid": tid, "signal": m.group(3),
                                     "thread_name": names.get(pid, {}).get(tid)}
    return list(found.values())


def core_backtraces(dirs: set[str], after: float) -> list[dict]:
    """gdb's backtraces of every core file written in ``dirs`` since ``after``; each core is
    deleted once read (a worker's core is gigabytes)."""
    found = []
    for folder in sorted(dirs):
        for core in Path(folder).glob("core*"):
            if not core.is_file() or core.stat().st_mtime < after:
                continue
            cmd = ["gdb", "-batch", "-nx", "-ex", "set pagination off",
                   "-ex", "info threads", "-ex", "bt 40", "-ex", "thread apply all bt 25",
                   *TCACHE_FORENSICS, sys.executable, str(core)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
            except (OSError, subprocess.TimeoutExpired) as err:
                out = f"gdb failed: {err}"
            found.append({"core": str(core), "gdb": out.splitlines()[:BACKTRACE_LINES]})
            core.unlink(missing_ok=True)
    return found


def allow_core_dumps() -> None:
    """In the run's process (before exec): core dumps on, for it and every Ray process it starts."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def fatal_blocks(text: str, source: str) -> list[dict]:
    """Each fatal-signal report in ``text``: where, and the lines that follow it."""
    lines = text.splitlines()
    blocks, skip_until = [], -1
    for i, line in enumerate(lines):
        if i <= skip_until or not any(m in line for m in FATAL_MARKERS):
            continue
        tail = lines[i:i + TAIL_LINES]
        skip_until = i + TAIL_LINES - 1
        pid = re.search(r"pid=(\d+)", line)
        blocks.append({"source": source, "pid": int(pid.group(1)) if pid else None,
                       "first_line": line.strip()[:300], "lines": tail})
    return blocks


def scan_logs(tmp: Path) -> list[dict]:
    found = []
    for path in sorted(tmp.glob("**/session_*/logs/**/*")):   # Ray adds ray/ under RAY_TMPDIR
        if not path.is_file() or path.suffix not in (".err", ".out", ".log", ""):
            continue
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            if any(m in text for m in FATAL_MARKERS):
                found += fatal_blocks(text, str(path.relative_to(tmp)))
    return found


def last_step(store: Path, name: str) -> int | None:
    path = store / name / "metrics.jsonl"
    if not path.exists():
        return None
    steps = [json.loads(line).get("step") for line in path.read_text().splitlines() if line.strip()]
    return int(steps[-1]) if steps else None


def one_run(args, index: int) -> dict:
    name = f"r{index:02d}"
    base = Path(args.workdir, args.label, name)
    shutil.rmtree(base, ignore_errors=True)
    tmp, store = base / "ray", base / "store"
    tmp.mkdir(parents=True)
    cmd = run_command(args, name, store)
    with heavy_lock(args.lock) as waited:
        C.log(f"run {index + 1}/{args.runs} ({args.label}) after {waited:.0f} s for the lock")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=args.pythonpath, env=run_env(args, tmp),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=allow_core_dumps)
        started_at = time.time()
        worker_info, seen_at = None, None
        names: dict[int, dict[int, str]] = {}
        cwds: set[str] = {args.pythonpath}
        out_lines: list[str] = []
        reader = _drain(proc, out_lines)
        while proc.poll() is None:
            elapsed = time.perf_counter() - start
            if elapsed > args.run_timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            pids = train_workers(proc.pid)
            thread_names(pids, names)
            worker_cwds(pids, cwds)
            if worker_info is None:
                if pids and seen_at is None:
                    seen_at = elapsed
                # Inspect once the worker is training (its pools and threads have started).
                if pids and elapsed - seen_at > 60 and any("step " in x for x in out_lines):
                    worker_info = inspect_worker(pids[0])
            time.sleep(1)
        proc.wait()
        reader.join(timeout=10)
        wall = time.perf_counter() - start
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)   # any Ray process the run left behind
    output = "\n".join(out_lines)
    crashes = fatal_blocks(output, "run output") + scan_logs(tmp)
    guarded, guarded_reports, windows = guard_reports(base / "guard")
    result = {"run": name, "rc": proc.returncode, "wall_s": round(wall, 1),
              "last_logged_step": last_step(store, name), "fatal_reports": crashes,
              "crashed_threads": crashed_threads(crashes, names),
              "core_backtraces": core_backtraces(cwds | {str(base)}, started_at),
              "worker_deaths": _worker_deaths(crashes),
              "restarts": output.count("Restarting") + output.count("restarting"),
              "output_tail": out_lines[-40:], "worker": worker_info,
              "guarded_processes": guarded, "guard_reports": guarded_reports,
              "guard_windows_ms": windows}
    C.log(f"run {name}: rc {proc.returncode}, {wall:.0f} s, step {result['last_logged_step']}, "
          f"{result['worker_deaths']} worker death(s)"
          + (f", {guarded} guarded processes, {len(guarded_reports)} guard reports"
             if args.guard else ""))
    if not args.keep_logs and not crashes and not guarded_reports and proc.returncode == 0:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _drain(proc, lines: list[str]):
    import threading

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _worker_deaths(reports: list[dict]) -> int:
    """Distinct dead processes: one crash is reported by faulthandler, Ray's C++ handler, the
    worker's .err file and the driver's copy of it; a pid is counted once."""
    pids = {r["pid"] for r in reports if r["pid"] is not None}
    pids |= {int(m.group(1)) for r in reports
             for m in [re.search(r"-(\d+)\.(err|out|log)$", r["source"])] if m}
    return len(pids) or (1 if reports else 0)


def crash_frame(result: dict) -> str:
    """The innermost Python frame of the first faulthandler dump's current thread."""
    for report in result["fatal_reports"]:
        lines = report["lines"]
        for i, line in enumerate(lines):
            if line.startswith(("Current thread", "Thread 0x")) and "most recent call first" in line:
                frames = [x.strip() for x in lines[i + 1:i + 4] if x.strip().startswith("File")]
                if frames and line.startswith("Current thread"):
                    return frames[0][:90]
    return "-"


def crashed_thread_names(result: dict) -> str:
    return ", ".join(f"{t['signal']} {t['thread_name'] or t['tid']}"
                     for t in result["crashed_threads"]) or "-"


def summary(args, machine: dict, results: list[dict]) -> tuple[dict, str]:
    crashed = sum(1 for r in results if r["worker_deaths"])
    rows = [[r["run"], r["rc"], r["wall_s"], r["last_logged_step"], r["worker_deaths"],
             len(r["guard_reports"]), crash_frame(r), crashed_thread_names(r)] for r in results]
    text = C.table(["run", "rc", "wall s", "last step", "worker deaths", "guard reports",
                    "crashing frame", "crashed thread"], rows)
    text += (f"\n\n{args.label}: {crashed} of {len(results)} runs lost a worker "
             f"({sum(r['worker_deaths'] for r in results)} worker deaths, "
             f"{sum(r['rc'] != 0 for r in results)} runs failed)")
    if args.guard:
        text += (f"; freed-block guard: {sum(1 for r in results if r['guard_reports'])} runs "
                 f"with reports, {sum(r['guarded_processes'] for r in results)} guarded processes")
    workers = [r["worker"] for r in results if r["worker"]]
    if workers:
        w = workers[0]
        text += (f"\nlive RayTrainWorker: {w.get('threads')} threads, runtimes "
                 f"{[Path(x).name for x in w.get('runtime_libs', [])]}, env {w.get('env')}")
    result = {"label": args.label, "runs": len(results), "runs_asked": args.runs,
              "steps": args.steps, "env": args.env,
              "pythonpath": args.pythonpath, "overrides": args.overrides,
              "max_failures": args.max_failures, "runs_with_worker_death": crashed,
              "guard": args.guard, "guard_max": args.guard_max if args.guard else None,
              "runs_with_guard_reports": sum(1 for r in results if r["guard_reports"]),
              "worker_deaths": sum(r["worker_deaths"] for r in results),
              "failed_runs": sum(r["rc"] != 0 for r in results),
              "command": " ".join(sys.argv), "machine": dict(machine), "results": results}
    return result, text


def main() -> int:
    args = parse_args()
    if args.smoke:
        args.runs = 1
    args.guard_so = build_guard(args.workdir) if args.guard else None
    machine = C.machine()
    results = []
    for i in range(args.runs):
        results.append(one_run(args, i))
        if i + 1 < args.runs:   # a loop stopped early keeps the runs it finished
            with contextlib.redirect_stdout(io.StringIO()):
                C.finish("crash_loop", args, *summary(args, machine, results))
    C.finish("crash_loop", args, *summary(args, machine, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
