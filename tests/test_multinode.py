"""Several Ray nodes: prepare and pretraining spread over real raylets, and a whole node lost.

The scenario runs in one ``tests/fixtures/multinode_script.py`` process, which starts one
``ray.cluster_utils.Cluster`` on this machine (a head with 1 CPU, worker nodes with 2
CPUs each; every Ray Train worker asks for 2 CPUs, so two never share a node) and attaches
its driver to it; a Cluster cannot live in the test session's process beside ``ray_local``.
The runs write where their workers ran (Ray node ids, from each worker's runtime context)
into the run folder, and ``prepare`` records the node of every chunk in its state json.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from weights_fixture import assert_same_weights   # tests/fixtures

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "fixtures" / "multinode_script.py"
TIMEOUT_S = 600
STEPS = 6                       # the run's train.max_steps (multinode_script.STEPS)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, fast_overrides) -> tuple[dict, Path]:
    """The scenario, run once: (result.json, the work folder). Its run is the tiny config
    with the overrides of conftest's uninterrupted ZeRO-2 reference (``tiny_runs``)."""
    work = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RAY_ADDRESS", None)
    run = [*fast_overrides, "deepspeed.zero_stage=2"]
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(work), *run], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as stuck:
        pytest.fail(f"the scenario did not end in {TIMEOUT_S} s; what it printed:\n"
                    + tail(stuck.stdout, 4000) + tail(stuck.stderr, 8000))
    assert proc.returncode == 0, tail(proc.stdout, 4000) + tail(proc.stderr, 8000)
    return json.loads((work / "result.json").read_text()), work


def tail(output: str | bytes | None, chars: int) -> str:
    """The last ``chars`` of a process's output, a line repeated back to back kept once
    (a stuck run's Ray helpers print the same warning every few seconds)."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output or ""
    lines = text.splitlines()
    kept = [line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1]]
    return "\n".join(kept)[-chars:] + "\n"


def worker_records(run_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (run_dir / "nodes").glob("*.json")]
    return sorted(records, key=lambda r: r["started"])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_prepare_tasks_run_on_several_nodes(scenario):
    result, work = scenario
    shards = work / "shards"
    states = [json.loads(p.read_text()) for p in (shards / "_state").glob("*-part-*.json")]
    assert sum(s["rows"] for s in states) == result["manifest_kept"] == 96
    nodes = {s["node_id"] for s in states}
    assert len(nodes) >= 2, nodes                       # chunks ran on more than one raylet
    assert nodes <= set(result["nodes_at_prepare"])     # ... all of them nodes of this cluster


@pytest.mark.slow
def test_training_workers_run_on_distinct_nodes_into_shared_storage(scenario):
    result, work = scenario
    summary = result["summary"]
    assert summary["world_size"] == 2
    assert summary["last_checkpoint"].startswith("file://")
    run_dir = work / "bucket" / "failover"
    records = worker_records(run_dir)
    assert sorted(r["rank"] for r in records[:2]) == [0, 1]
    for start in (records[:2], records[2:]):                  # one worker per node, each start
        assert start[0]["node_id"] != start[1]["node_id"]
        assert {r["node_id"] for r in start} <= set(result["worker_nodes"])
    # One checkpoint, written by both nodes: DeepSpeed's per-rank ZeRO files sit side by side.
    checkpoint = Path(summary["last_checkpoint"].removeprefix("file://"))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == STEPS
    ranks = {re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)
             for p in checkpoint.rglob("*zero_pp_rank_*optim_states.pt")}
    assert ranks == {"0", "1"}, sorted(p.name for p in checkpoint.rglob("*"))


@pytest.mark.slow
def test_run_survives_losing_a_whole_node(scenario, tiny_runs):
    """A worker node is killed (raylet, object store, the training worker on it) once the
    first checkpoint is registered; with a spare node and ``run.max_failures=1`` the run
    restarts from its last checkpoint on the surviving nodes and finishes, losing nothing:
    its weights are those of the same run never interrupted (conftest's ``tiny_runs``)."""
    result, work = scenario
    removed, summary = result["removed"], result["summary"]
    assert "error" not in removed and "done" in removed, removed
    assert removed["node_id"] not in result["cluster_nodes"]   # gone from the cluster
    assert summary["steps"] == STEPS

    run_dir = work / "bucket" / "failover"
    records = worker_records(run_dir)
    first, second = records[:2], records[2:]
    assert len(records) == 4, records                            # two starts of 2 workers
    assert {r["node_id"] for r in first} >= {removed["node_id"]}
    restored = {r["resumed_from_step"] for r in second}
    assert len(restored) == 1 and {r["resumed_from_step"] for r in first} == {None}
    restored_step = restored.pop()
    assert restored_step is not None and 2 <= restored_step < STEPS
    assert removed["node_id"] not in {r["node_id"] for r in second}

    # Logged every step: after the restore point every step appears exactly once, and the
    # global sample count continues from the checkpoint's.
    logged = metrics(run_dir)
    cut = next(i for i, m in enumerate(logged) if "resumed_from_step" in m)
    assert logged[cut]["resumed_from_step"] == restored_step
    before, after = logged[:cut], logged[cut:]
    assert [m["step"] for m in before][:restored_step] == list(range(1, restored_step + 1))
    assert [m["step"] for m in after] == list(range(restored_step + 1, STEPS + 1))
    assert [m["samples_seen"] for m in after] == [8 * s for s in range(restored_step + 1, STEPS + 1)]
    assert_same_weights(summary["last_checkpoint"], tiny_runs["zero2"][0]["last_checkpoint"])
    # Resumed from a checkpoint uploaded in the background (train.checkpoint_upload=async, the
    # default): complete once Ray had registered it. Folders are named by step.
    assert Path(summary["last_checkpoint"].removeprefix("file://")).name == f"checkpoint_step_{STEPS:06d}"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept and kept[-1] == f"checkpoint_step_{STEPS:06d}"
    assert all(re.fullmatch(r"checkpoint_step_\d{6}", name) for name in kept), kept
