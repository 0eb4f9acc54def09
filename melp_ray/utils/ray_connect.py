"""Connecting to Ray the same way from every entry point, and never hanging while doing so.

``ray.init`` waits for a GCS it cannot reach for minutes (Ray 2.60: 20 attempts of up to
30 s each, printing "Failed to connect to GCS at address ..."), which is what a head that
died without ``ray stop`` leaves behind: its address file still names it. So every address
is probed first (a TCP connect, ``MELP_RAY_CONNECT_TIMEOUT_S``, default 2 s) and
``ray.init`` only ever sees one that answers.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from melp_ray.utils.console import configure_libraries

CONNECT_TIMEOUT_ENV = "MELP_RAY_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 2.0
_DEFAULT_PORTS = {"ray": 10001, "http": 80, "https": 443}


class RayAddressError(SystemExit):
    """A Ray address the user named (argument or ``$RAY_ADDRESS``) cannot be reached.

    A ``SystemExit`` with code 2, so an entry point exits 2 after ``init_ray`` has printed
    the one-line message; code that wants to handle it catches this class (``.message``).
    """

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def connect_timeout_s() -> float:
    try:
        return max(0.1, float(os.environ.get(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_CONNECT_TIMEOUT_S


def host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a Ray address (``host:port``, ``[v6]:port``, ``ray://``, ``http(s)://``)."""
    address = address.strip()
    if "://" in address:
        parts = urlsplit(address)
        scheme = parts.scheme.lower()
    else:
        parts = urlsplit("//" + address)
        scheme = ""
    try:
        port = parts.port
    except ValueError:     # not a number, or out of range
        return None
    port = port if port is not None else _DEFAULT_PORTS.get(scheme)
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def probe(address: str, timeout: float | None = None) -> str | None:
    """None when a server answers at ``address``, else why not, within about ``timeout`` s.

    First a TCP connect (refused / unreachable / unknown host fail here at once); then, for
    a GCS or Ray Client address (no ``http(s)://``), a gRPC channel must become ready (the
    HTTP/2 handshake), so a port that accepts connections but is no gRPC server (a reused
    port, a wedged process) also counts as unreachable. Skipped with ``RAY_USE_TLS``.
    """
    timeout = connect_timeout_s() if timeout is None else timeout
    target = host_port(address)
    if target is None:
        return f"{address!r} is not of the form host:port"
    start = time.monotonic()
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:   # refused, unreachable, unknown host
        return (err.strerror or str(err)).lower()
    scheme = urlsplit(address).scheme.lower() if "://" in address else ""
    if scheme in ("http", "https") or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    return _grpc_ready(f"{target[0]}:{target[1]}" if ":" not in target[0]
                       else f"[{target[0]}]:{target[1]}",
                       max(timeout - (time.monotonic() - start), 0.5))


def _grpc_ready(target: str, timeout: float) -> str | None:
    try:
        import grpc
    except ImportError:   # pragma: no cover - Ray depends on grpcio
        return None
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return None
    except grpc.FutureTimeoutError:
        return (f"the port accepts connections but no gRPC server answered within "
                f"{timeout:.1f} s")
    finally:
        channel.close()


def address_file() -> str:
    """Where ``ray start`` records the cluster that ``address="auto"``/``None`` attaches to
    ($RAY_TMPDIR, else $TMPDIR, else /tmp, + ``/ray/ray_current_cluster``)."""
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except ImportError:   # pragma: no cover - older/newer Ray layout
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, "ray", "ray_current_cluster")


def recorded_address() -> str | None:
    """The address in Ray's address file, if there is one."""
    try:
        with open(address_file()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def warn(message: str) -> None:
    print(f"[melp_ray] warning: {message}", file=sys.stderr, flush=True)


def init_ray(address: str | None = None, verbose: bool = False, **init_kwargs: Any):
    """Attach to a running Ray cluster if there is one, else start a local instance.

    - already initialised in this process (e.g. by a test fixture): reuse it;
    - ``address`` or ``$RAY_ADDRESS`` given: connect there ("local": start a local instance;
      "auto": what Ray's ``address="auto"`` finds); if nothing answers within a few seconds,
      print why on stderr and raise ``RayAddressError`` (exit code 2) instead of letting Ray
      retry for minutes;
    - otherwise the cluster that ``ray start`` recorded in Ray's address file: attach when
      its head answers, else (a head that died without ``ray stop``) warn with the address
      and the reason and start a private local instance within seconds; no file: a local
      instance. (Unlike Ray's ``address="auto"``, a lone ``gcs_server`` process that no
      ``ray start`` recorded, e.g. another program's private instance, is not attached to.)
    ``init_kwargs`` go to the local ``ray.init`` (e.g. ``num_cpus=2``). ``verbose``: the
    libraries' own console output (``melp_ray.utils.console``). Returns the ``ray`` module.
    """
    import ray

    configure_libraries(verbose)
    if ray.is_initialized():
        return ray
    if not verbose:
        # A local instance is one node that no cloud can preempt: Ray Train's preemption
        # watcher actor has nothing to watch there, and its start logs a core_worker error
        # line on every run. Read by the Train controller, which inherits this environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    common = {"ignore_reinit_error": True, "configure_logging": False}
    source = "the address argument"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address == "local":
        init_local_ray(**common, **init_kwargs)
        return ray
    if address and address != "auto":
        start = time.monotonic()
        problem = probe(address)
        if problem:
            fail(f"error: cannot reach the Ray cluster at {address} (from {source}): "
                 f"{problem} (gave up after {time.monotonic() - start:.1f} s)")
        ray.init(address=address, **common)
        return ray

    if address == "auto":   # asked to attach: failing to is an error, not a fallback
        found = auto_address()
        if found is None:
            fail(f"error: {source} is 'auto' but no running Ray cluster was found "
                 f"(none recorded in {address_file()}; start one with `ray start --head`)")
        start = time.monotonic()
        problem = probe(found)
        if problem:
            fail(f"error: cannot reach the Ray cluster at {found} (found by {source}='auto'): "
                 f"{problem} (gave up after {time.monotonic() - start:.1f} s)")
        ray.init(address="auto", **common)
        return ray

    recorded = recorded_address()
    if recorded is None:
        init_local_ray(**common, **init_kwargs)
        return ray
    start = time.monotonic()
    problem = probe(recorded)
    where = f"the Ray cluster at {recorded} (recorded in {address_file()})"
    if problem:
        warn(f"cannot attach to {where}: {problem} (gave up after "
             f"{time.monotonic() - start:.1f} s); its head probably stopped without `ray stop` "
             "(`ray stop` or deleting that file clears it). "
             "Starting a private local Ray instance instead.")
        init_local_ray(**common, **init_kwargs)
        return ray
    try:
        # address=None, not "auto": the recorded cluster, the one probed above ("auto" would
        # prefer a lone gcs_server process of this machine, e.g. another program's private
        # instance). None, like "auto", keeps Ray's token-auth discovery for a local cluster.
        ray.init(address=None, **common)
    except ConnectionError as err:
        warn(f"cannot attach to {where}: {err}. Starting a private local Ray instance instead.")
        init_local_ray(**common, **init_kwargs)
    return ray


LOCAL_START_ATTEMPTS = 3


def init_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(address="local")``, tried again when the node does not come up in time.

    Ray gives a new raylet a fixed 30 s to register with its GCS; on an overloaded machine
    (seen at load averages of 10-40 on 2 cores) that runs out now and then. A failed attempt's
    processes are stopped before the next one.
    """
    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", **init_kwargs)
            wait_for_cpus()
            return
        except Exception as err:   # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            warn(f"the local Ray instance did not start (attempt {attempt} of "
                 f"{LOCAL_START_ATTEMPTS}): {err} Trying again.")
            ray.shutdown()
            stop_own_ray_processes()


def wait_for_cpus(timeout_s: float = 10.0) -> None:
    """Wait until a new instance's CPUs show in ``ray.available_resources()``: the GCS learns
    them from the raylet a moment after ``ray.init`` returns, and Ray Data, asked for a
    dataset before that, warns that the cluster "does not have any available CPUs"."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_own_ray_processes(grace_s: float = 10.0) -> None:
    """End the Ray processes this process started (a local instance that failed to start)."""
    import psutil

    procs = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmd:
            procs.append(child)
    for child in procs:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def auto_address() -> str | None:
    """The cluster Ray's own ``address="auto"`` would attach to (the address file, else a lone
    running ``gcs_server``), or None."""
    from ray._private import services

    try:
        services.find_gcs_addresses.cache_clear()
        return services.canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        return None


def fail(message: str):
    print(message, file=sys.stderr, flush=True)
    raise RayAddressError(message)


def pin_data_stats_here() -> None:
    """Create Ray Data's stats actor (one per cluster, detached, 0 CPUs) now, on this
    process's node. Ray pins it to the node of whatever process first runs a dataset: with
    per-rank datasets that is a training worker, i.e. a GPU node, which the actor then keeps
    from ever going idle, so an autoscaler could not release that node after the run
    (``bench/autoscaling.py``). Called by the driver (under ``ray job submit``: on the head)."""
    from ray.data._internal.stats import get_or_create_stats_actor   # no public way to place it

    get_or_create_stats_actor()


def quiet_data_progress_bars() -> None:
    """Our recipes print their own progress lines; Ray Data's per-dataset bars would drown them."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
