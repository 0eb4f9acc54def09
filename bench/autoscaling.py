"""Ray's autoscaler, really running, with the node types of ``cluster/aws.yaml``: an elastic
run that waits for nodes, grows when one more can come, loses a node, goes on with fewer
workers, and lets the nodes go when it is done (#34).

    python bench/autoscaling.py            # 120 steps
    python bench/autoscaling.py --smoke    # CI (tests/test_autoscaling.py): 60 steps
    python bench/autoscaling.py --yaml cluster/gcp.yaml

What runs is Ray's own autoscaler (v1, the head's monitor process) over Ray's fake
multi-node provider: every node it launches is a real raylet with its own object store and
workers on this machine, and it terminates them as it would cloud instances. The head
advertises no CPU, as the YAML's head does, so every training worker and every Ray Data
task runs on a node the autoscaler launched. The YAML's worker node types keep their names,
min_workers and max_workers (capped: one machine); their resources shrink to one training
worker a GPU node (``CPUS_PER_NODE`` CPUs and one ``gpu_stand_in``, the custom resource
that stands in for a GPU here; a CPU node type: ``CPUS_PER_NODE`` CPUs), and
``idle_timeout_minutes`` to ``IDLE_TIMEOUT_MIN``. The run is the ``tiny`` config on the
bundled PTB-XL records, ``train.num_workers=[1, 2]``, each worker asking for 1 CPU and 1
``gpu_stand_in`` (``train.worker_resources``), logged and checkpointed every 2 steps.

The scenario, driven by what Ray has registered (checkpoints) and recorded every
``POLL_S`` (nodes alive by type) and in the run's metrics.jsonl (``world_size``,
``cluster_nodes`` at every logged step):
1. the GPU node types start limited to one node (as when quota or spot capacity is
   short): the run's resource request makes the autoscaler launch one, and the run starts
   with 1 worker;
2. once it has a checkpoint of 1 worker, the limit goes up to 2 (the config file the
   autoscaler re-reads every update): the autoscaler launches a second GPU node and at its
   next check (``train.elastic_resize_interval_s``) Ray Train restarts the run with 2
   workers from the last checkpoint;
3. once it has a checkpoint of 2 workers, the node of one is killed (SIGKILL of its raylet
   and everything on it: a crashed machine); Ray Train restarts the group from the last
   checkpoint with the 1 worker that fits, and the run finishes;
4. after the run (its driver gone, as a finished job's), every worker node, the dead one
   too, is terminated once idle for ``idle_timeout_minutes``.

Not shown, because Ray 2.60's fake provider cannot: the autoscaler *replacing* the dead node
during the run. v1 leaves its fake nodes in status "uninitialized" (node updaters are off),
so its liveness check (``AUTOSCALER_HEARTBEAT_TIMEOUT_S``) never terminates a dead one, which
keeps its slot of the type's max_workers until it is idle; v2 cannot start with the fake
provider at all (it reads the ``fake_multi_node/example.yaml`` the wheel lacks). A real
provider's nodes are up to date once set up, and there a dead node is terminated after the
heartbeat timeout and replaced while the run needs it; the growth in step 2 is the same path.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import yaml

import _common as C

# Ray Train's controller takes one report per worker each time it polls them (every 2 s by
# default; a worker's next report waits): a run that reports more often falls behind, and its
# checkpoints reach Ray late (a restart then resumes from an older one). Steps here take
# ~0.5 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# When a node dies, Ray Train restarts the group at once, while the dead node's resources
# may still count (the GCS declares a node dead ~3 s after it stops answering; Ray's default
# ~30 s): it asks for the old size, waits this long for it, then restarts with what fits.
# Ray's default is 60 s.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
# `ray start` turns on token authentication: one token for the head, its nodes and this
# driver (all inherit this environment; Ray reads it when imported), none from ~/.ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)

REPO = Path(__file__).resolve().parents[1]
GPU_STAND_IN = "gpu_stand_in"    # the custom resource a fake node has instead of a GPU
CPUS_PER_NODE = 2                # a training worker (1 CPU) and a Ray Data task
MAX_NODES_PER_TYPE = 2           # one machine
IDLE_TIMEOUT_MIN = 0.2           # the YAML's idle_timeout_minutes, shortened (12 s)
POLL_S = 0.5
HEAD_TYPE = "ray.head.default"


# ---------------------------------------------------------------- the cluster


def local_node_types(launcher: dict[str, Any], gpu_nodes: int | None = None
                     ) -> dict[str, dict[str, Any]]:
    """The launcher YAML's worker node types, shrunk to one machine (see the module doc);
    ``gpu_nodes``: a lower max_workers for the GPU types (capacity short)."""
    types = {}
    for name, spec in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        resources = {"CPU": CPUS_PER_NODE}
        if spec.get("resources", {}).get("GPU", 0) > 0:
            resources[GPU_STAND_IN] = 1
        types[name] = {"resources": resources, "node_config": {},
                       "min_workers": int(spec.get("min_workers", 0)),
                       "max_workers": min(int(spec.get("max_workers", 1)), MAX_NODES_PER_TYPE)}
        if gpu_nodes is not None and GPU_STAND_IN in resources:
            types[name]["max_workers"] = min(types[name]["max_workers"], gpu_nodes)
    return types


def autoscaler_config(launcher: dict[str, Any], gcs_address: str, gpu_nodes: int | None = None
                      ) -> dict[str, Any]:
    """A complete autoscaler config for Ray's fake multi-node provider. Complete because the
    wheel lacks the ``fake_multi_node/example.yaml`` that Ray would fill defaults from; the
    provider is told the head's GCS address, else its nodes dial port 6379."""
    types = local_node_types(launcher, gpu_nodes)
    types[HEAD_TYPE] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": f"local-{launcher.get('cluster_name', 'melp-ray')}",
        "max_workers": sum(t["max_workers"] for n, t in types.items() if n != HEAD_TYPE),
        "upscaling_speed": launcher.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalAutoscalingCluster:
    """A Ray head (``ray start --head --block``, private ports and temp dir) running the
    autoscaler over the fake provider. Not Ray's ``AutoscalingCluster``: its ``start()``
    runs ``ray stop --force``, which ends every Ray instance on the machine; this one stops
    only the processes it started."""

    def __init__(self, launcher: dict[str, Any], work: Path, gpu_nodes: int | None = None):
        from melp_ray.utils.distributed import free_port

        self.temp_dir = tempfile.mkdtemp(prefix="as", dir="/tmp")   # short: Ray's socket paths
        port = free_port()
        ip = node_ip()
        self.address = f"{ip}:{port}"
        self.launcher = launcher
        self.config = work / "autoscaler.yaml"
        self.limit_gpu_nodes(gpu_nodes)
        ports = {"--port": port, "--ray-client-server-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
        # A node is dead to the GCS ~3 s after it stops answering (Ray's default: ~30 s).
        system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                  "health_check_failure_threshold": 3}
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "AUTOSCALER_METRIC_PORT": str(free_port())}
        self.log = work / "head.log"
        with open(self.log, "w") as out:
            self.head = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                 "--num-cpus=0", f"--node-ip-address={ip}", "--include-dashboard=false",
                 f"--autoscaling-config={self.config}", f"--temp-dir={self.temp_dir}",
                 f"--system-config={json.dumps(system, separators=(',', ':'))}",
                 "--disable-usage-stats", *(f"{flag}={value}" for flag, value in ports.items())],
                # In this process's group: whatever kills this benchmark's group (the
                # test's timeout) takes the cluster with it.
                env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in self.log.read_text():
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def limit_gpu_nodes(self, gpu_nodes: int | None) -> None:
        """(Re)write the autoscaler's config; it reads the file again at every update."""
        text = yaml.safe_dump(autoscaler_config(self.launcher, self.address, gpu_nodes))
        partial = self.config.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(self.config)       # never a half-written file

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the head's and those of the nodes the autoscaler
        started (their command lines name this cluster's temp dir), workers included."""
        return [proc for proc in psutil.process_iter(["cmdline"])
                if any(self.temp_dir in part for part in proc.info["cmdline"] or ())]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            procs = self.processes()
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=wait_s)
        self.head.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def kill_node(node: dict[str, Any], temp_dir: str) -> int:
    """SIGKILL a node's raylet and every process under it (its object store lives in the
    raylet; its workers are the raylet's children): a machine gone at once. Returns how many
    processes were killed."""
    flag = f"--node_id={node['NodeID']}"     # the fake provider's ids repeat across clusters
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and flag in (p.info["cmdline"] or ())
               and any(temp_dir in part for part in p.info["cmdline"])]
    if len(raylets) != 1:
        raise RuntimeError(f"{len(raylets)} raylets with {flag}, not one")
    victims = [raylets[0], *raylets[0].children(recursive=True)]
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(victims)


# ---------------------------------------------------------------- the scenario


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def node_type(node: dict[str, Any], types: dict[str, dict[str, Any]]) -> str:
    """The node type a node was launched as, told by its resources (the fake provider's
    raylets carry no node-type label): the first type with the same CPUs and stand-in GPUs."""
    have = node.get("Resources", {})
    if "node:__internal_head__" in have:
        return HEAD_TYPE
    for name, spec in types.items():
        if all(have.get(k, 0) == v for k, v in spec["resources"].items()) and \
                (GPU_STAND_IN in spec["resources"]) == (GPU_STAND_IN in have):
            return name
    return "unknown"


class Scenario:
    """Records the cluster every ``POLL_S`` while the run goes and moves it through the
    module doc's steps 2 and 3 as Ray registers the checkpoints they wait for."""

    def __init__(self, cluster: LocalAutoscalingCluster, run_dir: Path,
                 types: dict[str, dict[str, Any]]):
        self.cluster = cluster
        self.run_dir = run_dir
        self.types = types
        self.start = time.monotonic()
        self.timeline: list[dict[str, Any]] = []
        self.events: dict[str, dict[str, Any]] = {}     # "capacity", "killed": when, at what step
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def now(self) -> float:
        return round(time.monotonic() - self.start, 2)

    def sample(self) -> list[dict[str, Any]]:
        nodes = alive_nodes()
        by_type: dict[str, int] = {}
        for node in nodes:
            name = node_type(node, self.types)
            by_type[name] = by_type.get(name, 0) + 1
        if not self.timeline or self.timeline[-1]["by_type"] != by_type:
            C.log(f"nodes alive: {by_type}")
        self.timeline.append({"t": self.now(), "nodes": len(nodes), "by_type": by_type,
                              "registered_checkpoints": registered_steps(self.run_dir)})
        return nodes

    def watch(self) -> None:
        while not self.done.is_set():
            nodes = self.sample()
            if "capacity" not in self.events and self.checkpointed_with(1):
                self.cluster.limit_gpu_nodes(None)
                self.event("capacity", "GPU node types may have 2 nodes now")
            elif ("capacity" in self.events and "killed" not in self.events
                  and self.checkpointed_with(2)):
                self.kill_a_training_node(nodes)
            time.sleep(POLL_S)

    def event(self, name: str, message: str, **facts) -> None:
        self.events[name] = {"t": self.now(), "after_step": self.newest_checkpoint_step(), **facts}
        C.log(f"{message} (after step {self.events[name]['after_step']})")

    def newest_checkpoint_step(self) -> int:
        """The newest step Ray has a checkpoint of."""
        return max(registered_steps(self.run_dir), default=0)

    def checkpointed_with(self, workers: int) -> bool:
        """Ray has registered a checkpoint of a step trained by ``workers`` workers."""
        return any(m.get("world_size") == workers for m in registered(self.run_dir))

    def kill_a_training_node(self, nodes: list[dict[str, Any]]) -> None:
        node = [n for n in nodes if n.get("Resources", {}).get(GPU_STAND_IN, 0) > 0][-1]
        killed = kill_node(node, self.cluster.temp_dir)
        self.event("killed", f"killed node {node['NodeID'][-5:]} ({killed} processes)",
                   node_id=node["NodeID"], type=node_type(node, self.types), processes=killed)

    def wait_for_release(self, timeout_s: float) -> float | None:
        """Seconds until only the head is left (None: not within ``timeout_s``; then what
        still lives on the other nodes is logged)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if len(self.sample()) == 1:
                return round(time.monotonic() - start, 1)
            time.sleep(POLL_S)
        C.log(f"nodes not released; actors alive by node: {actors_by_node()}")
        return None


def actors_by_node() -> dict[str, list[str]]:
    """Live actors per node (last 5 characters of its id): what keeps a node from idling."""
    from ray._private import state    # Ray's own view; its state API needs the dashboard

    out: dict[str, list[str]] = {}
    for actor in state.actors().values():
        if actor["State"] != "DEAD":
            out.setdefault(actor["Address"]["NodeID"][-5:], []).append(actor["ActorClassName"])
    return out


def registered(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics of the checkpoints Ray Train has registered and keeps (a restart resumes
    from the newest). Read from Ray's snapshot, not metrics.jsonl: a run on a storage URI
    uploads that file only every so often."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [r["metrics"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):    # none yet, or caught mid-write
        return []


def registered_steps(run_dir: Path) -> list[int]:
    return sorted(int(m["step"]) for m in registered(run_dir))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Logged (with world size and node count) and checkpointed every 2 steps.
RUN = {"global_batch_size": 8, "log_every": 2, "checkpoint_every": 2}


def run_config(work: Path, steps: int, resize_s: float):
    from melp_ray.config import PretrainConfig, load_config

    return load_config(PretrainConfig, "tiny", [
        "train.num_workers=[1,2]", "train.cpus_per_worker=1",
        f'train.worker_resources={{"{GPU_STAND_IN}": 1}}', f"train.max_steps={steps}",
        *(f"train.{k}={v}" for k, v in RUN.items()), "train.warmup_steps=1",
        "train.val_every=0", "train.val_batches=1",
        f"train.elastic_resize_interval_s={resize_s}", "run.max_failures=-1",
        "data.limit=96", "data.val_fraction=0.2",
        f"run.storage_path=file://{work}/bucket", "run.name=elastic"])


def segments(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's (re)starts from metrics.jsonl: world size, first and last step of each."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if not out or "resumed_from_step" in row or row["world_size"] != out[-1]["world_size"]:
            out.append({"world_size": row["world_size"], "resumed_from_step": row.get("resumed_from_step"),
                        "first_step": row["step"], "last_step": row["step"]})
        out[-1]["last_step"] = row["step"]
    return out


def main() -> None:
    p = C.parser("autoscaling", __doc__.splitlines()[0])
    p.add_argument("--yaml", default=str(REPO / "cluster" / "aws.yaml"), help="the cluster launcher YAML")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default 120; --smoke 60)")
    p.add_argument("--resize-s", type=float, default=5.0, help="train.elastic_resize_interval_s")
    p.add_argument("--work", default=None, help="folder for the run (default: a temporary one)")
    args = p.parse_args()
    C.watchdog()
    # SIGTERM ends the benchmark through its `finally`, which stops the cluster.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    steps = args.steps or (60 if args.smoke else 120)
    work = Path(args.work or tempfile.mkdtemp(prefix="melp_autoscaling_"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "bucket" / "elastic"
    machine = {**C.machine(), "ray_address": None}
    launcher = yaml.safe_load(Path(args.yaml).read_text())

    import ray

    C.log(f"starting a head with the autoscaler over {args.yaml}'s node types (GPU types: 1 node)")
    cluster = LocalAutoscalingCluster(launcher, work, gpu_nodes=1)
    try:
        # Ray Train's helpers look the cluster up by address: this one.
        os.environ["RAY_ADDRESS"] = cluster.address
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        from ray.data import DataContext

        from melp_ray.pretraining.run import run

        DataContext.get_current().enable_progress_bars = False
        scenario = Scenario(cluster, run_dir, local_node_types(launcher))
        scenario.thread.start()
        C.log(f"elastic run, train.num_workers=[1,2], {steps} steps")
        summary = run(run_config(work, steps, args.resize_s))
        run_end = scenario.now()
        scenario.done.set()
        scenario.thread.join(timeout=30)
        # The job ends as a submitted one would: its driver goes, and with it the objects it
        # held on the nodes (a node holding objects is not idle). A new driver watches.
        ray.shutdown()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        C.log(f"run done at {run_end} s; waiting for the idle nodes to go")
        released_after = scenario.wait_for_release(timeout_s=IDLE_TIMEOUT_MIN * 60 + 90)
        actors_left = actors_by_node()
    finally:
        ray.shutdown()
        cluster.stop()

    rows = read_metrics(run_dir)
    parts = segments(rows)
    peak = max(s["nodes"] for s in scenario.timeline)
    result = {
        "machine": machine, "yaml": args.yaml, "work": str(work),
        "node_types": local_node_types(launcher), "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "run": RUN, "steps": steps, "elastic_resize_interval_s": args.resize_s,
        "summary_steps": summary["steps"], "last_checkpoint": summary["last_checkpoint"],
        "events": scenario.events, "run_end_s": run_end, "released_after_run_s": released_after,
        "actors_after_run": actors_left,
        "peak_nodes": peak, "segments": parts, "timeline": scenario.timeline,
        "metrics": [{k: r[k] for k in ("step", "world_size", "cluster_nodes", "samples_seen",
                                       "resumed_from_step") if k in r} for r in rows],
    }
    text = C.table(["segment", "workers", "resumed from step", "steps"],
                   [[i + 1, s["world_size"], s["resumed_from_step"], f"{s['first_step']}-{s['last_step']}"]
                    for i, s in enumerate(parts)])
    first_launch = next((s["t"] for s in scenario.timeline if s["nodes"] > 1), None)
    text += "\n\n" + C.table(["event", "at (s)", "after step"], [
        ["first node launched", first_launch, ""],
        *[[name, e["t"], e["after_step"]] for name, e in scenario.events.items()],
        ["run finished", run_end, steps], ["idle nodes gone, after the run", released_after, ""]])
    text += f"\npeak nodes {peak} (head included); node types {json.dumps(result['node_types'])}"
    C.finish("autoscaling", args, result, text)


if __name__ == "__main__":
    main()
