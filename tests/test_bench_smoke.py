"""Every benchmark script runs end to end in --smoke mode and writes the JSON it promises.

Behaviour, not speed: each script runs as its own process, and its JSON must hold the
expected keys with finite numbers. A benchmark that only needs some Ray instance runs on the
test session's (``RAY_ADDRESS`` = its address, as a user runs one on a cluster): a new
instance costs ~10 CPU-s of start-up. Those whose measure is their own instance (a CPU
count, start-up, a hang that must take its Ray with it) start a private one
(``RAY_ADDRESS=""``).

Never hang: each benchmark runs with ``MELP_BENCH_TIMEOUT_S`` (``bench/_common.watchdog``),
so one that makes no progress (no ``[bench ...]`` line) for that long prints the Python
stack of every thread and exits: 300 s per stage by default (``MELP_BENCH_SMOKE_TIMEOUT_S``;
a whole smoke run took 85 s in CI, up to 6 min on a 2-core machine at load average 15).
Should even that not fire, the test asks the process for its stack (SIGUSR1) and kills its
whole process group after 840 s in all (``MELP_BENCH_SMOKE_TOTAL_S``), before pytest's own
900 s timeout.
"""
from __future__ import annotations

import ast
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # each smoke starts its own Ray: minutes (pytest -m 'not slow' skips)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SMOKE_TIMEOUT_S = float(os.environ.get("MELP_BENCH_SMOKE_TIMEOUT_S", 300))   # one stage
SMOKE_TOTAL_S = float(os.environ.get("MELP_BENCH_SMOKE_TOTAL_S", 840))       # the whole run


@pytest.fixture(scope="session")
def session_ray_address(ray_local) -> str:
    """The GCS address of this pytest process's Ray instance (conftest's ``ray_local``).
    Its workers keep the environment this process had when it started (conftest's
    settings); they import the benchmark's modules from its driver's ``sys.path``."""
    return ray_local.get_runtime_context().gcs_address


def run_script(script: Path, *args: str, timeout: float = SMOKE_TIMEOUT_S,
               total: float = SMOKE_TOTAL_S, ray_address: str = ""
               ) -> tuple[subprocess.CompletedProcess, float]:
    """Run a benchmark script with its watchdog armed (``timeout`` s without progress); kill
    it after ``total`` s. ``ray_address``: the Ray instance it runs on (``RAY_ADDRESS``;
    "": a private one, never a cluster from the environment). Returns the process and its
    seconds."""
    # The session instance's token: conftest puts RAY_AUTH_MODE and RAY_AUTH_TOKEN in the
    # environment this inherits.
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MELP_BENCH_TIMEOUT_S": f"{timeout:g}"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    streams = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda f=f, k=k: streams[k].extend(f), daemon=True)
               for f, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for reader in readers:
        reader.start()
    note = ""
    try:
        proc.wait(timeout=total)
        seconds = time.monotonic() - start
    except subprocess.TimeoutExpired:
        seconds = time.monotonic() - start
        # Its own watchdog did not fire: ask for the stack, then stop everything it started.
        proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        note = f"\n[test] no exit {total:g} s after start: stack requested, killed\n"
    finally:
        # What it left in its process group (a stuck loader worker holding our pipes, ...)
        # gets a few seconds in all to finish writing, then goes.
        deadline = time.monotonic() + 5
        for reader in readers:
            reader.join(timeout=max(deadline - time.monotonic(), 0))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for reader in readers:
            reader.join(timeout=30)
    out, err = "".join(streams["out"]), "".join(streams["err"])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err + note), seconds


def run_bench(name: str, tmp_path: Path, *extra: str, timeout: float = SMOKE_TIMEOUT_S,
              total: float = SMOKE_TOTAL_S, ray_address: str = ""
              ) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"{name}.json"
    proc, _ = run_script(BENCH / f"{name}.py", "--out", str(out), *extra, timeout=timeout,
                         total=total, ray_address=ray_address)
    return proc, out


def failure(name: str, proc: subprocess.CompletedProcess) -> str:
    """The end of the output; for a stuck run, its progress lines (when each stage began)
    and the stack dump whole, however long the log was."""
    err = proc.stderr
    marks = [err.find(m) for m in ("[bench watchdog]", "Timeout (", "[test] no exit")]
    dump = min([m for m in marks if m >= 0], default=-1)
    if dump < 0:
        return f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{err[-5000:]}"
    progress = "\n".join(line for line in err[:dump].splitlines() if line.startswith("[bench "))
    return (f"{name} got stuck (exit {proc.returncode}); its progress lines, then where it "
            f"was:\n{progress}\n{err[dump:][:20000]}")


def smoke(name: str, tmp_path: Path, *extra: str, ray_address: str = "") -> dict:
    proc, out = run_bench(name, tmp_path, "--smoke", *extra, ray_address=ray_address)
    assert proc.returncode == 0, failure(name, proc)
    assert "| " in proc.stdout          # printed its table
    data = json.loads(out.read_text())
    assert data["benchmark"] == name and data["smoke"] is True
    for key in ("date", "torch", "ray", "deepspeed", "load_avg_start", "load_avg_end"):
        assert key in data["machine"]
    assert data["machine"]["ray_address"] == (ray_address or None)
    return data


def get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def assert_finite(data: dict, *keys: str) -> None:
    for key in keys:
        value = get(data, key)
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


def test_ingest_smoke(tmp_path, session_ray_address):
    data = smoke("ingest", tmp_path, ray_address=session_ray_address)
    assert_finite(data, "rows_per_s.shards", "rows_per_s.wfdb", "rows_per_s.reference",
                  "consumption.rows_per_s_all_workers", "pretrain.steady_input_wait_frac",
                  "ratios.ingest_over_consumption", "ratios.shards_over_reference")
    assert get(data, "rows_per_s.shards") > 0 and get(data, "rows_per_s.reference") > 0
    assert 0 <= get(data, "pretrain.steady_input_wait_frac") <= 1
    assert set(data["verdicts"].values()) <= {"PASS", "MISS"}


def test_overhead_smoke(tmp_path, session_ray_address):
    data = smoke("overhead", tmp_path, ray_address=session_ray_address)
    assert_finite(data, "bare_samples_per_s", "ours_samples_per_s", "ratio")
    assert len(data["bare"]) == 2 and data["ratio"] > 0
    assert data["verdict"] in {"PASS", "MISS"}


def test_zero_memory_smoke(tmp_path):
    # Stages 0 and 3 (the comparison the target is about): every stage runs the same code
    # with another stage number, in two fresh spawned ranks (~20 s each pair on 2 cores).
    data = smoke("zero_memory", tmp_path, "--stages", "0,3")
    assert set(data["precisions"]) == {"fp32"}          # smoke: the CPU precision only
    fp32 = data["precisions"]["fp32"]
    assert set(fp32["stages"]) == {"0", "3"}
    for stage in fp32["stages"]:
        assert_finite(fp32, f"stages.{stage}.model_states", f"stages.{stage}.peak_rss",
                      f"stages.{stage}.model_states_vs_stage0")
    assert_finite(data, "stage3_vs_stage0")
    assert data["stage3_vs_stage0"] == fp32["stage3_vs_stage0"]
    # Whatever the speed, partitioning must shrink what each rank holds.
    assert fp32["stages"]["3"]["model_states"] < fp32["stages"]["0"]["model_states"]


def test_gpu_suite_smoke_runs_the_step_and_the_ray_path(tmp_path, session_ray_address):
    """bench/gpu_suite.py --smoke: the one GPU script of #29 on CPU. Its parts are the two
    GPU benchmarks, each checked here as its own smoke was:

    - bench/gpu_step.py: the recipe's own step on a DeepSpeed engine without Ray, ZeRO 1-3,
      with the paper's optimizer settings (every parameter decayed, warm restarts): the
      combination that once failed at the first step (an empty parameter group);
    - bench/gpu_throughput.py: prepare on Ray, then the pretraining run (its one worker in
      the benchmark's process: Ray Train's own path has the pretraining tests)."""
    data = smoke("gpu_suite", tmp_path, ray_address=session_ray_address)
    step, ray_path = data["step"], data["throughput"]
    assert step["status"] == ray_path["status"] == "ok", (step, ray_path)
    step = step["result"]
    assert step["backend"] == "gloo" and step["losses_finite"] is True
    assert set(step["stages"]) == {"1", "2", "3"}
    for stage, row in step["stages"].items():
        assert_finite(step, f"stages.{stage}.samples_per_s", f"stages.{stage}.train_flops_per_sample")
        assert row["samples_per_s"] > 0 and row["param_dtypes"] == ["float32"]
    # Same seed, same batch, same steps: the three stages train the same model.
    first = step["stages"]["1"]["losses_last"]
    for stage in ("2", "3"):
        assert step["stages"][stage]["losses_last"] == pytest.approx(first, rel=1e-4)
    ray_path = ray_path["result"]
    assert ray_path["stages"]
    for stage, row in ray_path["stages"].items():
        assert_finite(ray_path, f"stages.{stage}.samples_per_s", f"stages.{stage}.mfu",
                      f"stages.{stage}.train_flops_per_sample")
        assert row["samples_per_s"] > 0
    # The Ray path over the bare step, same stage; nothing compared with the GPU "before".
    stage = min(ray_path["stages"])
    assert data["ratios"]["ray_over_step"] == pytest.approx(
        ray_path["stages"][stage]["samples_per_s"] / step["stages"][stage]["samples_per_s"])
    assert data["ratios"]["step_over_before"] is None
    assert data["before"]["gpu"] and data["before"]["samples_per_s"] > 0
    assert data["reference"]["status"].startswith("not run")


def test_gpu_throughput_refuses_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    proc, out = run_bench("gpu_throughput", tmp_path, timeout=120, total=180)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr
    assert not out.exists()


def test_reference_step_refuses_without_a_reference_checkout(tmp_path):
    """bench/reference_step.py needs checkouts of the reference (MELP, fairseq-signals),
    which CI does not have: without --reference-repo, or with a folder that holds no such
    checkouts, it exits 2 with one line and writes nothing."""
    for extra in ((), ("--reference-repo", str(tmp_path))):
        proc, out = run_bench("reference_step", tmp_path, "--smoke", *extra, timeout=120, total=180)
        assert proc.returncode == 2, failure("reference_step", proc)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("reference_step: --reference-repo") and "MELP/" in last, proc.stderr
        assert not out.exists()


REFERENCE_HELPERS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import reference_step as R
from gpu_suite import Budget, run_part

tmp = Path(sys.argv[2])
# A folder is a reference checkout when both repositories' sources are where they belong.
assert R.checkouts(str(tmp)) is None
(tmp / "MELP/src/melp/models").mkdir(parents=True)
(tmp / "MELP/src/melp/models/melp_model.py").write_text("")
assert R.checkouts(str(tmp)) is None
(tmp / "fairseq-signals/src/fairseq_signals_backbone/models").mkdir(parents=True)
assert R.checkouts(str(tmp)) == (tmp / "MELP/src", tmp / "fairseq-signals/src")

# The shared text folder: MiniLM at the reference's width 768, '.' at the reference's id 18.
folder = R.text_folder(tmp / "text", None, None)
config = json.loads((folder / "config.json").read_text())
assert {k: config[k] for k in R.WIDTH_768} == R.WIDTH_768 and config["num_hidden_layers"] == 6
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(folder)
assert tok.convert_tokens_to_ids(".") == R.REFERENCE_PERIOD_ID
assert len(tok) == config["vocab_size"]
# Our tokenisation of the bench's reports finds their sentences at that id.
from melp_ray.text.report_ids import encode_reports
from melp_ray.text.report_ids import load_report_tokenizer
reports = R.batch_reports(5)
assert all(r.endswith(".") for r in reports) and len(reports) == 5
ids = encode_reports(load_report_tokenizer(str(folder)), reports, 128)["input_ids"]
assert ids.shape == (5, 128) and all((row == R.REFERENCE_PERIOD_ID).sum() >= 1 for row in ids)

# gpu_suite's calling convention reaches the script (its arguments and --out are taken).
part = run_part("reference_step.py", ["--smoke", "--reference-repo", str(tmp / "none")],
                tmp / "reference.json", Budget(120))
assert part["status"] == "exit 2" and "reference_step: --reference-repo" in part["tail"], part
print("ok")
"""


def test_reference_step_helpers_without_the_reference(tmp_path):
    """What bench/reference_step.py does that needs no reference checkout: recognising one,
    the text folder both models are built from, the report strings, and gpu_suite's call."""
    proc = subprocess.run([sys.executable, "-c", REFERENCE_HELPERS, str(BENCH), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


CRASH_LOOP_HELPERS = r"""
import ast, os, resource, subprocess, sys, threading
sys.path.insert(0, sys.argv[1])
import crash_loop as L

# The run's processes may dump core: the limit reaches a child (Ray's processes are its children).
child = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_CORE))"],
                       preexec_fn=L.allow_core_dumps, capture_output=True, text=True, check=True)
soft, hard = ast.literal_eval(child.stdout)
assert soft == hard == resource.getrlimit(resource.RLIMIT_CORE)[1], (soft, hard)

# Thread ids and names of a live process, read from /proc, a thread that has ended kept.
stop = threading.Event()
worker = threading.Thread(target=stop.wait); worker.start()
names = {}
L.thread_names([os.getpid()], names)
stop.set(); worker.join()
L.thread_names([os.getpid()], names)
assert names[os.getpid()][os.getpid()] and worker.native_id in names[os.getpid()], names

# A crash report of Ray's C++ handler names the process and thread; the thread gets its name.
line = "[2026-12-05 01:22:20,812 E 21964 22096] logging.cc:474: *** SIGABRT received at time=1"
report = {"lines": ["noise", line, line.replace("E 21964 22096", "E 21964 22097")]}
found = L.crashed_threads([report, report], {21964: {22096: "pt_gloo_runloop"}})
assert found == [{"pid": 21964, "tid": 22096, "signal": "SIGABRT", "thread_name": "pt_gloo_runloop"},
                 {"pid": 21964, "tid": 22097, "signal": "SIGABRT", "thread_name": None}], found
assert L.crashed_thread_names({"crashed_threads": found}) == "SIGABRT pt_gloo_runloop, SIGABRT 22097"
print("ok")
"""


def test_crash_loop_helpers_name_the_crashed_thread(tmp_path):
    """bench/crash_loop.py's parts that need no crash: core dumps on for the run's processes,
    every thread's name noted, a crash report's thread id turned into that name."""
    proc = subprocess.run([sys.executable, "-c", CRASH_LOOP_HELPERS, str(BENCH)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_freed_guard_reports_a_write_after_free_and_a_double_free(tmp_path, monkeypatch):
    """bench/native/freed_guard.c, as crash_loop.py --guard builds, preloads and reads it: a
    write into a freed block (or into one that realloc moved) is reported with the value
    written, when the block leaves quarantine or at exit; a second free of a quarantined
    block as a double free; and a Python process without either has no report."""
    monkeypatch.syspath_prepend(str(BENCH))
    import crash_loop as L

    guard = L.build_guard(str(tmp_path))
    victim = tmp_path / "victim"
    subprocess.run(["gcc", "-O0", "-o", str(victim), str(REPO / "tests/fixtures/freed_guard_victim.c")],
                   check=True)
    env = {**os.environ, "LD_PRELOAD": guard, "FREED_GUARD_DIR": str(tmp_path / "bad"),
           "FREED_GUARD_SLOTS": "1000"}
    proc = subprocess.run([str(victim)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    processes, reports, windows = L.guard_reports(tmp_path / "bad")
    assert processes == 1 and list(windows) == [int(reports[0]["pid"])], windows
    kinds = sorted(r["kind"] for r in reports)
    assert kinds == ["double free"] + ["write after free"] * 3, reports
    written = ["\n".join(r["lines"]) for r in reports if r["kind"] == "write after free"]
    for line in ("+08: 0000000000001234   <- written", "+00: 0000000000005678   <- written",
                 "+16: 0000000000009abc   <- written"):
        assert sum(line in w for w in written) == 1, (line, written)

    clean = subprocess.run([sys.executable, "-c", "import torch; print(torch.ones(3).sum())"],
                           env={**env, "FREED_GUARD_DIR": str(tmp_path / "clean")},
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert L.guard_reports(tmp_path / "clean")[:2] == (1, [])


def test_prepare_speed_smoke(tmp_path):
    data = smoke("prepare_speed", tmp_path)
    (workload,) = data["workloads"].values()
    assert_finite(workload, "records_per_s.1", "records_per_s.2", "speedup_2_over_1")


def test_storage_smoke(tmp_path):
    data = smoke("storage", tmp_path)
    (workload,) = data["workloads"].values()
    encodings = workload["encodings"]
    assert set(encodings) == {"float32", "float16", "int16"}
    for r in encodings.values():
        assert_finite(r, "bytes_per_record", "read_decode_rows_per_s", "max_abs_error_uV")
    assert encodings["float32"]["max_abs_error_uV"] == 0
    assert encodings["int16"]["ecg_bytes_per_record"] < 0.51 * encodings["float32"]["ecg_bytes_per_record"]
    assert 0 < encodings["int16"]["max_abs_error_uV"] < 5


def test_learning_loop_smoke_scores_every_eval_step_with_the_variant_knobs(tmp_path):
    proc, out = run_bench("learning_loop", tmp_path, "--smoke", "--text-lr-scale", "0.1",
                          "--ema", "0.9")
    assert proc.returncode == 0, failure("learning_loop", proc)
    assert "| " in proc.stdout
    data = json.loads(out.read_text())
    assert [r["step"] for r in data["results"]] == [0, 2, 4]    # 0 = random init, then every 2
    for r in data["results"]:
        assert_finite(r, "probe", "probe_val", "cosine", "recall10_over_chance")
        assert 0 <= r["probe"] <= 1 and -1 <= r["cosine"] <= 1
    assert all(math.isfinite(r["rhythm_loss"]) for r in data["results"][1:])
    # The text tower trains at 0.1x the learning rate, everything else at 1x.
    lrs = {g["text_tower"]: g["lr"] for g in data["param_groups"]}
    assert lrs == {True: pytest.approx(0.1 * data["lr"]), False: pytest.approx(data["lr"])}
    assert data["holdout_fold"] == 6 and data["probe_folds"]["test"] == 6


def test_scale_smoke(tmp_path):
    """bench/scale.py --quick: two tiny MIMIC-layout roots, each prepared in its own process,
    then the 500 Hz ingest comparison; 1 CPU, as its cost is Ray and worker start-up."""
    proc, out = run_bench("scale", tmp_path, "--quick", "--num-cpus", "1")
    assert proc.returncode == 0, failure("scale", proc)
    data = json.loads(out.read_text())
    assert data["benchmark"] == "scale" and data["smoke"] is True
    assert data["sizes"] == [40, 120]
    for n, run in zip(data["sizes"], data["prepare"]):
        # Every generated record is a valid study: distinct ids, 500 Hz, a usable report.
        assert run["records"] == run["kept"] == n
        assert_finite(run, "records_per_s", "driver_peak_rss_mib", "driver_rss_growth_mib")
        assert run["records_per_s"] > 0 and run["driver_peak_rss_mib"] > 50
    ingest = data["ingest"]
    assert ingest["sample_rate"] == 500 and ingest["cpus"] == 1
    assert_finite(ingest, "rows_per_s_per_cpu.shards", "rows_per_s_per_cpu.reference",
                  "shards_over_reference")
    assert min(ingest["rows_per_s_per_cpu"].values()) > 0
    assert_finite(data, "gpu.samples_per_s", "cpus_per_gpu", "cpus_per_gpu_reference",
                  "ratios.prepare_rate_min_over_max", "ratios.driver_peak_rss_max_over_min")
    assert data["cpus_per_gpu"] == pytest.approx(
        data["gpu"]["samples_per_s"] / ingest["rows_per_s_per_cpu"]["shards"])
    assert set(data["verdicts"]) == set(data["targets"])
    assert set(data["verdicts"].values()) <= {"PASS", "MISS"}


# ---------------------------------------------------------------- never hang

HUNG = """
import sys, time
sys.path.insert(0, {bench!r})
import _common as C

ray = C.start_ray(1)
print("gcs", ray.get_runtime_context().gcs_address, flush=True)
C.watchdog({seconds})          # re-armed from now: Ray's start-up is not what is timed


def stuck_waiting_forever():
    time.sleep(3600)


stuck_waiting_forever()
"""


def accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def test_gather_stress_smoke(tmp_path):
    """The #30 stress of the differentiable all-gather: both ranks exit 0 and every step's
    gradient is the known one (a collective touching freed memory would show here)."""
    data = smoke("gather_stress", tmp_path)
    assert data["exit_codes"] == [0, 0]
    assert sorted(r["rank"] for r in data["ranks"]) == [0, 1]
    assert all(r["wrong_gradients"] == 0 for r in data["ranks"])


def test_a_hung_benchmark_fails_fast_and_prints_where_it_hangs(tmp_path):
    """A benchmark stuck with Ray running (here: asleep) exits on its own short timeout with
    the stack of every thread, and its Ray instance goes away with it."""
    script = tmp_path / "hung_bench.py"
    script.write_text(HUNG.format(bench=str(BENCH), seconds=5))
    proc, seconds = run_script(script, timeout=180, total=240)   # Ray's start-up, then 5 s
    assert proc.returncode == 1, failure("hung_bench", proc)
    assert "[test] no exit" not in proc.stderr
    assert "[bench watchdog] no progress for 5 s" in proc.stderr
    dump = proc.stderr[proc.stderr.index("[bench watchdog]"):]
    assert "stuck_waiting_forever" in dump and "hung_bench.py" in dump
    assert "Timeout (" not in dump      # the watchdog thread did it, not the backstop
    gcs = proc.stdout.split("gcs ", 1)[1].split()[0]
    deadline = time.monotonic() + 30      # Ray's reaper stops the instance its driver left
    while accepts(gcs) and time.monotonic() < deadline:
        time.sleep(1)
    assert not accepts(gcs), f"Ray's GCS at {gcs} outlived its hung driver"
    print(f"hung benchmark: exited after {seconds:.1f} s (Ray start-up + 5 s)")


def test_watchdog_also_stops_a_hang_before_ray(tmp_path):
    """The timeout from the environment is armed at import, before anything else runs."""
    script = tmp_path / "hung_early.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(BENCH)!r})\nimport _common\n\n\n"
                      "def asleep_at_start():\n    time.sleep(3600)\n\n\nasleep_at_start()\n")
    proc, seconds = run_script(script, timeout=3, total=60)
    assert proc.returncode == 1 and seconds < 30, (seconds, proc.stderr[-3000:])
    assert "[bench watchdog] no progress for 3 s" in proc.stderr
    assert "asleep_at_start" in proc.stderr


STUCK_CHILD = """
import sys, time
sys.path.insert(0, {bench!r})
import _common as C


def child_stuck_here(ready):
    ready.set()           # it has imported this module: its SIGUSR1 handler is registered
    time.sleep(3600)


def parent_waits(process):
    process.join()


if __name__ == "__main__":
    ready = C.MP_CONTEXT.Event()
    child = C.MP_CONTEXT.Process(target=child_stuck_here, args=(ready,))
    child.start()
    C.log("child started")
    ready.wait(60)
    C.watchdog(3)
    parent_waits(child)
"""


def test_a_stuck_spawn_child_prints_its_stack_too(tmp_path):
    """The CI hang's shape: the driver waits on a worker process that never answers. Both
    stacks are printed: the driver's waiting frame and the child's stuck one."""
    script = tmp_path / "stuck_child.py"
    script.write_text(STUCK_CHILD.format(bench=str(BENCH)))
    proc, seconds = run_script(script, timeout=120, total=120)
    assert proc.returncode == 1 and seconds < 90, failure("stuck_child", proc)
    dump = proc.stderr[proc.stderr.index("[bench watchdog] no progress for 3 s"):]
    assert "parent_waits" in dump and "spawn child pid" in dump
    assert "child_stuck_here" in dump, dump[-3000:]


def test_the_backstop_fires_when_python_itself_is_stuck(tmp_path):
    """A C call that holds the GIL (here a catastrophic regex) starves the watchdog thread:
    faulthandler's own C thread prints the stack and exits BACKSTOP_S later."""
    script = tmp_path / "gil_held.py"
    script.write_text(f"import re, sys\nsys.path.insert(0, {str(BENCH)!r})\nimport _common as C\n"
                      "C.BACKSTOP_S = 2\nC.watchdog(2)\n\n\n"
                      "def holds_the_gil():\n    re.match(r'(a+)+$', 'a' * 64 + 'b')\n\n\n"
                      "holds_the_gil()\n")
    proc, seconds = run_script(script, timeout=2, total=60)
    assert proc.returncode == 1 and seconds < 30, (seconds, proc.stderr[-3000:])
    assert "Timeout (0:00:04)!" in proc.stderr and "holds_the_gil" in proc.stderr


def test_watchdog_limits_a_stage_not_the_whole_run(tmp_path):
    """Progress lines re-arm the watchdog: a run that keeps logging outlives its timeout; the
    first stage that goes quiet for that long is stopped, and the dump names it."""
    script = tmp_path / "slow_then_stuck.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(BENCH)!r})\nimport _common as C\n"
                      "C.watchdog(3)\n\n\n"
                      "def busy_but_progressing():\n"
                      "    for i in range(6):\n        time.sleep(1)\n        C.log(f'step {i}')\n\n\n"
                      "def quiet_stage():\n    time.sleep(3600)\n\n\n"
                      "busy_but_progressing()\nprint('past the timeout', flush=True)\nquiet_stage()\n")
    proc, seconds = run_script(script, timeout=3, total=60)
    assert "past the timeout" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 1 and seconds < 40
    dump = proc.stderr[proc.stderr.index("[bench watchdog]"):]
    assert "quiet_stage" in dump and "busy_but_progressing" not in dump
    assert "got stuck" in failure("slow_then_stuck", proc) and "step 5" in failure("slow_then_stuck", proc)


def test_benchmark_pools_spawn():
    """A benchmark runs Ray (threads) before it starts any pool, so its pools must not fork:
    the default start method and the reference DataLoader's context are "spawn"."""
    code = ("import multiprocessing, sys; sys.path.insert(0, sys.argv[1]); import _common, ingest; "
            "loader = ingest.reference_loader([], '.', batch=4, workers=2); "
            "print(multiprocessing.get_start_method(), _common.MP_CONTEXT.get_start_method(), "
            "loader.multiprocessing_context.get_start_method(), loader.persistent_workers)")
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["spawn", "spawn", "spawn", "True"]


POOLS = {"DataLoader", "Pool", "Process", "ProcessPoolExecutor"}


def forking_pools(path: Path) -> list[str]:
    """Calls in ``path`` that would start worker processes with the default start method."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name not in POOLS:
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "DataLoader":
            workers = keywords.get("num_workers")
            if workers is None or (isinstance(workers, ast.Constant) and workers.value == 0):
                continue
            ok = "multiprocessing_context" in keywords
        elif name == "ProcessPoolExecutor":
            ok = "mp_context" in keywords
        else:   # Pool / Process of the multiprocessing module itself (default start method)
            owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            ok = owner not in ("", "multiprocessing", "mp", "torch.multiprocessing")
        if not ok:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_pool_forks_with_the_default_start_method():
    """Every DataLoader with workers and every process pool in the project names its
    multiprocessing context (Ray's threads make fork unsafe in any process that runs it)."""
    files = [*BENCH.glob("*.py"), *(REPO / "melp_ray").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    assert [hit for path in files for hit in forking_pools(path)] == []
