"""Every benchmark script runs end to end in --smoke mode and writes the JSON it promises.

Behaviour, not speed: each script runs as its own process (its own private local Ray
instance, never the test session's), and its JSON must hold the expected keys with
finite numbers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def run_bench(name: str, tmp_path: Path, *extra: str, timeout: int = 850) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "RAY_ADDRESS": ""}   # never attach to a cluster from the environment
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, out


def smoke(name: str, tmp_path: Path) -> dict:
    proc, out = run_bench(name, tmp_path, "--smoke")
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "| " in proc.stdout          # printed its table
    data = json.loads(out.read_text())
    assert data["benchmark"] == name and data["smoke"] is True
    for key in ("date", "torch", "ray", "deepspeed", "load_avg_start", "load_avg_end"):
        assert key in data["machine"]
    return data


def get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def assert_finite(data: dict, *keys: str) -> None:
    for key in keys:
        value = get(data, key)
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


def test_ingest_smoke(tmp_path):
    data = smoke("ingest", tmp_path)
    assert_finite(data, "rows_per_s.shards", "rows_per_s.wfdb", "rows_per_s.reference",
                  "consumption.rows_per_s_all_workers", "pretrain.steady_input_wait_frac",
                  "ratios.ingest_over_consumption", "ratios.shards_over_reference")
    assert get(data, "rows_per_s.shards") > 0 and get(data, "rows_per_s.reference") > 0
    assert 0 <= get(data, "pretrain.steady_input_wait_frac") <= 1
    assert set(data["verdicts"].values()) <= {"PASS", "MISS"}


def test_overhead_smoke(tmp_path):
    data = smoke("overhead", tmp_path)
    assert_finite(data, "bare_samples_per_s", "ours_samples_per_s", "ratio")
    assert len(data["bare"]) == 2 and data["ratio"] > 0
    assert data["verdict"] in {"PASS", "MISS"}


def test_zero_memory_smoke(tmp_path):
    data = smoke("zero_memory", tmp_path)
    assert set(data["precisions"]) == {"fp32"}          # smoke: the CPU precision only
    fp32 = data["precisions"]["fp32"]
    assert set(fp32["stages"]) == {"0", "1", "2", "3"}
    for stage in fp32["stages"]:
        assert_finite(fp32, f"stages.{stage}.model_states", f"stages.{stage}.peak_rss",
                      f"stages.{stage}.model_states_vs_stage0")
    assert_finite(data, "stage3_vs_stage0")
    assert data["stage3_vs_stage0"] == fp32["stage3_vs_stage0"]
    # Whatever the speed, partitioning must shrink what each rank holds.
    assert fp32["stages"]["3"]["model_states"] < fp32["stages"]["0"]["model_states"]


def test_gpu_throughput_smoke(tmp_path):
    data = smoke("gpu_throughput", tmp_path)
    assert data["stages"]
    for stage, row in data["stages"].items():
        assert_finite(data, f"stages.{stage}.samples_per_s", f"stages.{stage}.mfu",
                      f"stages.{stage}.train_flops_per_sample")
        assert row["samples_per_s"] > 0


def test_gpu_throughput_refuses_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    proc, out = run_bench("gpu_throughput", tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr
    assert not out.exists()


def test_prepare_speed_smoke(tmp_path):
    data = smoke("prepare_speed", tmp_path)
    (workload,) = data["workloads"].values()
    assert_finite(workload, "records_per_s.1", "records_per_s.2", "speedup_2_over_1")
