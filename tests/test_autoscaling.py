"""Ray's autoscaler really running, with cluster/aws.yaml's node types, under an elastic run.

One scenario, ``bench/autoscaling.py --smoke`` in its own process (its own head with Ray's
v1 autoscaler over the fake multi-node provider: real raylets on this machine; see that
module for every step): the run starts on a head without CPUs, so the autoscaler must
launch the YAML's GPU node type (first limited to one node: the run starts with 1 worker);
the limit is raised and the run grows to 2 workers on a second node; the node of one is
killed and the run goes on with 1 worker; after the run every worker node is released.
What the benchmark recorded (nodes alive every 0.5 s, what Ray registered, the run's
metrics.jsonl with world size and node count) is checked here.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The benchmark smokes' runner (watchdog armed, whole process group killed on a hang).
_spec = importlib.util.spec_from_file_location(
    "bench_smoke_helpers", Path(__file__).resolve().parent / "test_bench_smoke.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("autoscaling")
    proc, out = _helpers.run_bench("autoscaling", work, "--smoke", "--work", str(work / "run"))
    assert proc.returncode == 0, _helpers.failure("autoscaling", proc)
    return json.loads(out.read_text())


def test_the_autoscaler_launches_the_yaml_gpu_nodes_for_the_run_and_releases_them(scenario):
    timeline, events = scenario["timeline"], scenario["events"]
    assert timeline[0]["nodes"] == 1                       # the head alone before the run
    assert scenario["node_types"]["gpu_worker"]["resources"] == {"CPU": 2, "gpu_stand_in": 1}
    gpu_nodes = [(s["t"], s["by_type"].get("gpu_worker", 0)) for s in timeline]
    assert max(n for t, n in gpu_nodes if t < events["capacity"]["t"]) == 1   # launched on demand
    assert max(n for t, n in gpu_nodes) == 2               # and a second once one more may come
    assert scenario["summary_steps"] == scenario["steps"]  # the run finished on them
    # After the run every worker node, the killed one too, goes after idle_timeout_minutes
    # (plus the autoscaler's reaction): nothing of the run keeps one busy.
    released = scenario["released_after_run_s"]
    assert released is not None and released <= scenario["idle_timeout_minutes"] * 60 + 60, \
        scenario["actors_after_run"]
    assert timeline[-1]["nodes"] == 1
    # metrics.jsonl records the cluster's size and the run's at every logged step.
    metrics = scenario["metrics"]
    assert {m["world_size"] for m in metrics} == {1, 2}
    assert {m["cluster_nodes"] for m in metrics} >= {2, 3}    # head + 1 and head + 2 GPU nodes


def test_an_elastic_run_grows_then_goes_on_with_fewer_workers_when_a_node_dies(scenario):
    run, events, parts, metrics = (scenario["run"], scenario["events"], scenario["segments"],
                                   scenario["metrics"])
    worlds = [p["world_size"] for p in parts]
    assert [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]] == [1, 2, 1], parts
    killed = events["killed"]
    assert killed["type"] == "gpu_worker" and killed["processes"] >= 2
    grown = next(p for p in parts if p["world_size"] == 2)
    after_kill = parts[-1]
    # Each resize restarted from the newest checkpoint Ray had: after the kill, none older
    # than the one registered when the node died (at most the steps since it are repeated).
    assert grown["resumed_from_step"] is not None and grown["resumed_from_step"] >= events["capacity"]["after_step"]
    assert after_kill["resumed_from_step"] >= killed["after_step"]
    for prev, nxt in zip(parts, parts[1:]):
        assert nxt["resumed_from_step"] is not None and nxt["resumed_from_step"] % run["checkpoint_every"] == 0
        assert nxt["resumed_from_step"] <= prev["last_step"]
        assert nxt["first_step"] == nxt["resumed_from_step"] + run["log_every"]
    # No step of the run is missing from its history (rows up to each checkpoint were stored
    # before a node could die), the run reached its end, and the global sample count is the
    # step's at every world size: the global batch never changed.
    assert sorted({m["step"] for m in metrics}) == list(range(run["log_every"], scenario["steps"] + 1,
                                                              run["log_every"]))
    assert all(m["samples_seen"] == run["global_batch_size"] * m["step"] for m in metrics)
