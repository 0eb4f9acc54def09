"""bench/learning.py runs end to end in --smoke mode and writes the JSON it promises.

Same conventions as tests/test_bench_smoke.py (whose runner this reuses): its own process,
on the test session's Ray instance (RAY_ADDRESS), the benchmark's watchdog armed; the JSON must
hold every metric as a finite number and a PASS/MISS verdict per target. Smoke numbers (a
few pretraining steps on the bundled sample) mean nothing, so no verdict is required.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # real end-to-end runs: minutes (pytest -m 'not slow' skips)

_spec = importlib.util.spec_from_file_location(
    "bench_smoke_helpers", Path(__file__).resolve().parent / "test_bench_smoke.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

session_ray_address = _helpers.session_ray_address   # the fixture, for this module too

# A pretraining run plus five evaluation passes: longer than the other smoke runs.
TIMEOUT_S = max(_helpers.SMOKE_TIMEOUT_S, 600)


def test_learning_smoke(tmp_path, session_ray_address):
    proc, out = _helpers.run_bench("learning", tmp_path, "--smoke", timeout=TIMEOUT_S,
                                   ray_address=session_ray_address)
    assert proc.returncode == 0, _helpers.failure("learning", proc)
    assert "| " in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "learning" and data["smoke"] is True
    for key in ("date", "torch", "ray", "deepspeed", "load_avg_start", "load_avg_end"):
        assert key in data["machine"]
    assert data["machine"]["ray_address"] == session_ray_address
    _helpers.assert_finite(
        data, "linear_probe.pretrained.macro_auroc", "linear_probe.random_init.macro_auroc",
        "linear_probe.gain_over_random", "linear_probe.gain_paired_bootstrap.gain",
        "zeroshot.macro_auroc",
        "ecg_cosine.pretrained.mean_pairwise_cosine", "ecg_cosine.random_init.mean_pairwise_cosine",
        "ratios.recall10_over_chance", "total_seconds",
        *[f"retrieval.{part}.recall@{k}" for part in ("chance", "chance_with_ties")
          for k in (1, 5, 10)])
    for k in (1, 5, 10):
        recall = data["retrieval"]["recall"][f"ecg_to_report/recall@{k}"]
        assert 0 <= recall <= 1
    paired = data["linear_probe"]["gain_paired_bootstrap"]   # from the two probes' scores.npz
    assert paired["gain"] == pytest.approx(data["linear_probe"]["gain_over_random"], abs=1e-9)
    assert 0 <= paired["p_not_better"] <= 1
    assert set(data["verdicts"]) == {"probe_gain_over_random", "zeroshot_auroc",
                                     "recall10_over_chance", "mean_pairwise_cosine"}
    assert set(data["verdicts"].values()) <= {"PASS", "MISS"}
    assert set(data["phase_seconds"]) == {"pretrain", "embed_pretrained", "embed_random_init",
                                          "linear_probe_pretrained",
                                          "linear_probe_random_init", "zeroshot", "retrieval",
                                          "ecg_cosine"}
    # The held-out fold never reached pretraining, and the run said how many records that was.
    held = data["pretrain"]["data"]["held_out"]
    assert held["folds"] == [data["holdout_fold"]] and held["records"] > 0
    assert data["probe_folds"]["test"] == data["holdout_fold"]
