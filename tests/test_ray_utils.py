"""init_ray never hangs on an address nothing answers at.

A head started with `ray start --head` that died without `ray stop` leaves Ray's address
file behind; `ray.init` then retries its GCS for many minutes. `init_ray` probes first: a
recorded address that does not answer means a warning and a private local instance within
seconds; an address the user named (argument or RAY_ADDRESS) that does not answer means
exit code 2 with a one-line message.

The decision tests replace `ray.init` with a recorder (no Ray starts); the last two run
`python -m melp_ray.pretrain` for real in a process whose Ray temp dir is private.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from melp_ray.utils import ray_connect as ray_utils
from melp_ray.utils.ray_connect import RayAddressError, host_port, init_ray, probe

REPO = Path(__file__).resolve().parents[1]


def dead_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def listener():
    """A gRPC server (stands in for a live GCS: the probe checks the HTTP/2 handshake)."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def mute_port():
    """A port that accepts TCP connections and never says a word (a reused port, a wedged
    process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def fake_ray(monkeypatch, tmp_path):
    """`ray.init` records its keyword arguments; Ray's temp dir (address file) is private."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def record(address: str) -> Path:
    path = Path(ray_utils.address_file())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(address)
    return path


# ---------------------------------------------------------------- pieces

@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)),
    ("head:6379", ("head", 6379)),
    ("[::1]:6379", ("::1", 6379)),
    ("ray://head:10001", ("head", 10001)),
    ("ray://head", ("head", 10001)),
    ("http://127.0.0.1:8265", ("127.0.0.1", 8265)),
    ("head", None),
    ("head:port", None),
    ("", None),
])
def test_host_port(address, expected):
    assert host_port(address) == expected


def test_probe(listener):
    assert probe(listener) is None
    start = time.monotonic()
    assert "refused" in probe(f"127.0.0.1:{dead_port()}")
    assert time.monotonic() - start < 2
    assert "host:port" in probe("no-port-here")


def test_probe_gives_up_on_a_port_that_accepts_but_never_answers(mute_port, monkeypatch):
    monkeypatch.setenv(ray_utils.CONNECT_TIMEOUT_ENV, "1")
    start = time.monotonic()
    assert "no gRPC server answered" in probe(mute_port)
    assert time.monotonic() - start < 3
    assert probe(f"http://{mute_port}") is None      # a dashboard URL: TCP is all we check


def test_probe_reports_a_connect_timeout(monkeypatch):
    def slow(target, timeout):
        assert timeout == 0.5
        raise TimeoutError("timed out")

    monkeypatch.setenv(ray_utils.CONNECT_TIMEOUT_ENV, "0.5")
    monkeypatch.setattr(socket, "create_connection", slow)
    assert probe("10.1.2.3:6379") == "no answer within 0.5 s"


def test_address_file_follows_ray_tmpdir(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_utils.address_file() == str(tmp_path / "ray" / "ray_current_cluster")


# ---------------------------------------------------------------- decisions

def test_no_cluster_recorded_starts_a_local_instance(fake_ray):
    init_ray(num_cpus=2)
    assert fake_ray == [{"address": "local", "ignore_reinit_error": True,
                         "configure_logging": False, "num_cpus": 2}]


def test_a_stale_address_file_falls_back_to_local_within_seconds(fake_ray, capsys):
    address = f"127.0.0.1:{dead_port()}"
    path = record(address)
    start = time.monotonic()
    init_ray(num_cpus=2)
    assert time.monotonic() - start < 5
    assert [c["address"] for c in fake_ray] == ["local"] and fake_ray[0]["num_cpus"] == 2
    err = capsys.readouterr().err
    assert "warning" in err and address in err and str(path) in err and "refused" in err
    assert "local" in err


def test_a_live_recorded_cluster_is_attached_to(fake_ray, listener, capsys):
    record(listener)
    init_ray(num_cpus=2)
    # address=None: Ray reads the same file; no num_cpus when attaching
    assert fake_ray == [{"address": None, "ignore_reinit_error": True, "configure_logging": False}]
    assert capsys.readouterr().err == ""


def test_a_recorded_cluster_that_refuses_ray_falls_back_to_local(fake_ray, listener, monkeypatch,
                                                                  capsys):
    import ray

    record(listener)
    calls = []

    def init(**kw):
        calls.append(kw["address"])
        if kw["address"] is None:
            raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.setattr(ray, "init", init)
    init_ray()
    assert calls == [None, "local"]
    assert "Failed to connect" in capsys.readouterr().err


@pytest.mark.parametrize("via", ["env", "argument"])
def test_a_named_unreachable_address_exits_2_quickly(fake_ray, monkeypatch, capsys, via):
    address = f"127.0.0.1:{dead_port()}"
    if via == "env":
        monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    with pytest.raises(RayAddressError) as exc:
        init_ray(address if via == "argument" else None)
    assert time.monotonic() - start < 5
    assert isinstance(exc.value, SystemExit) and exc.value.code == 2
    assert fake_ray == []                               # never handed to ray.init
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and address in err
    assert ("RAY_ADDRESS" if via == "env" else "address argument") in err
    assert address in str(exc.value)


def test_a_named_live_address_is_connected_to(fake_ray, listener, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", listener)
    init_ray(num_cpus=2)
    assert fake_ray == [{"address": listener, "ignore_reinit_error": True, "configure_logging": False}]


def test_ray_address_local_starts_a_local_instance(fake_ray, monkeypatch):
    record(f"127.0.0.1:{dead_port()}")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    init_ray(num_cpus=1)
    assert [c["address"] for c in fake_ray] == ["local"] and fake_ray[0]["num_cpus"] == 1


def test_ray_address_auto_with_a_stale_file_exits_2(fake_ray, monkeypatch, capsys):
    port = dead_port()
    monkeypatch.setattr(ray_utils, "auto_address", lambda: f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(RayAddressError):
        init_ray()
    assert fake_ray == [] and f"127.0.0.1:{port}" in capsys.readouterr().err


def test_an_initialised_ray_is_reused(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init called"))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{dead_port()}")
    assert init_ray() is ray


# ---------------------------------------------------------------- the real entry point

PRETRAIN = ["data.limit=96", "data.val_fraction=0.2", "data.shuffle_buffer=16",
            "train.global_batch_size=8", "train.max_steps=2", "train.warmup_steps=1",
            "train.log_every=1", "train.val_every=0", "train.checkpoint_every=2",
            "run.max_failures=0"]


@pytest.fixture
def ray_tmpdir():
    """A private, short Ray temp dir (Ray's socket paths must stay under 108 characters)."""
    path = tempfile.mkdtemp(prefix="melp-rt-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def pretrain_env(ray_tmpdir: Path, **extra: str) -> dict:
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "RAY_USAGE_STATS_ENABLED": "0", **extra}
    if "RAY_ADDRESS" not in extra:
        env.pop("RAY_ADDRESS", None)
    return env


def run_timed(cmd: list[str], env: dict, timeout: float, until: str | None = None
              ) -> tuple[int | None, list[tuple[float, str]]]:
    """Run ``cmd``; return its exit code and its output lines (stdout and stderr merged), each
    with the seconds since start at which it appeared. With ``until``: stopped (its whole
    process group, exit code None) once a line holds that text."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
            if until is not None and until in line:
                seen.set()
        seen.set()   # end of output

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen.wait(timeout=timeout)
    code = None
    if until is None or not first(lines, until):
        try:
            code = proc.wait(timeout=max(timeout - (time.monotonic() - start), 1))
        except subprocess.TimeoutExpired:
            pass
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)
    return code, lines


def first(lines: list[tuple[float, str]], text: str) -> tuple[float, str] | None:
    return next(((t, line) for t, line in lines if text in line), None)


@pytest.mark.slow
def test_pretrain_trains_locally_past_a_stale_address_file(tmp_path, ray_tmpdir):
    """The head named in Ray's address file is gone: a warning within seconds, then the run
    goes on on a private local instance (before this fix: 7+ minutes of GCS retries) and
    builds its datasets there; stopped at that point, as the rest is any run's (the console
    of a whole CLI run: ``test_ray_job_submit_against_a_running_head``)."""
    address = f"127.0.0.1:{dead_port()}"
    stale = ray_tmpdir / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text(address)
    code, lines = run_timed(
        [sys.executable, "-m", "melp_ray.pretrain", *PRETRAIN, f"run.storage_path={tmp_path}",
         "run.name=stale", "train.num_workers=1"], pretrain_env(ray_tmpdir), timeout=600,
        until="[melp_ray] data:")
    output = "\n".join(f"{t:6.1f} {line}" for t, line in lines)
    assert code is None, output[-6000:]          # still running, stopped by the test
    warned = first(lines, "[melp_ray] warning")
    assert warned and address in warned[1] and str(stale) in warned[1] and "local" in warned[1]
    counted = first(lines, "[melp_ray] data:")
    assert counted and "train" in counted[1] and "val" in counted[1], output[-6000:]
    assert counted[0] > warned[0]
    print(f"stale address file: warned after {warned[0]:.1f} s, datasets after {counted[0]:.1f} s")
    # Imports, the probe and the warning: seconds (a dead head used to cost 7+ minutes of
    # GCS retries). How long the run itself takes is for the benchmarks, not this test.
    assert warned[0] < 60, output[-6000:]


@pytest.mark.slow
def test_pretrain_exits_2_on_an_unreachable_named_address(tmp_path, ray_tmpdir):
    address = f"127.0.0.1:{dead_port()}"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "melp_ray.pretrain", *PRETRAIN, f"run.storage_path={tmp_path}"],
        cwd=REPO, env=pretrain_env(ray_tmpdir, RAY_ADDRESS=address), capture_output=True,
        text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0] and "RAY_ADDRESS" in errors[0]
    assert "Traceback" not in proc.stderr
    assert took < 60, took    # imports only: no Ray retries


def test_local_start_tries_again_when_ray_times_out_starting(monkeypatch, capsys):
    """Ray gives its raylet a fixed 30 s to register; on an overloaded machine the local
    start stops what the failed attempt started and tries again (other errors are raised).
    ``ray.init`` is replaced: the timeout cannot be provoked on purpose."""
    import ray

    from melp_ray.utils import ray_connect as ray_utils

    calls = []

    def init(**kw):
        calls.append(kw["address"])
        if calls.count("local") < 3:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray_utils, "stop_own_ray_processes", lambda: calls.append("stopped"))
    ray_utils.init_local_ray(num_cpus=1)
    assert calls == ["local", "stopped", "local", "stopped", "local"]
    assert capsys.readouterr().err.count("did not start (attempt") == 2
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):
        ray_utils.init_local_ray(num_cpus=1)
