"""Ray Tune sweeps over the loss weights: real Tune, real Train, real DeepSpeed, tiny trials.

One module-scoped sweep of 2 trials is interrupted after its first trial finishes and then
restored; the tests below check the interrupted state, the restored (finished) sweep and
its outputs. Invalid spaces are checked without Ray.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from melp_ray.config import ConfigError
from melp_ray.sweeps.space import load_space
from melp_ray.sweeps.summary import CURVES_FILE, PLOT_FILE, SUMMARY_FILE
from melp_ray.sweeps.trial import final_result
from melp_ray.sweeps.tuner import run_sweep
from melp_ray.sweeps.validate import validate_sweep
from melp_ray.tune import main
from tracking_fixture import wandb_offline_runs   # tests/fixtures

MAX_STEPS = 2
NUM_TRIALS = 2                       # one finishes before the interruption, one after it
TINY_TRIAL = {                       # each trial: 2 optimizer steps of 8 records
    "train.max_steps": MAX_STEPS,
    "train.val_every": MAX_STEPS,
    "train.checkpoint_every": MAX_STEPS,
    "train.log_every": 1,
    "train.global_batch_size": 8,
    "train.val_batches": 2,
    # All 259 bundled records (only 2 steps are read): the first 64 are all NORM, and the
    # zero-shot AUROC needs both classes among the 2 x 8 validation records it scores.
    "data.val_fraction": 0.1,
    # One Train worker a trial: what is checked here is Tune's (trials, interruption,
    # restore, summary); 2-worker runs are tests/test_pretrain.py's. Trial 0.5 + 0.5 = 1 CPU;
    # 1 of 2 left for Ray Data.
    "train.num_workers": 1,
}
WEIGHTS = {
    "loss.rhythm": {"distribution": "uniform", "low": 0.25, "high": 2.0},
    "loss.token": {"distribution": "loguniform", "low": 0.25, "high": 4.0},
    "loss.beat": {"distribution": "uniform", "low": 0.0, "high": 0.5},
}


def write_space(path: Path, **fields) -> Path:
    space = {"name": "weights", "num_samples": NUM_TRIALS, "seed": 3, "base_overrides": TINY_TRIAL,
             "params": WEIGHTS, **fields}
    path.write_text(yaml.safe_dump(space))
    return path


def read_lines(path: str) -> int:
    return len(Path(path).read_text().splitlines())


@pytest.fixture(scope="module")
def sweep_runs(ray_local, tmp_path_factory):
    """Run the sweep until 1 trial finished (interrupt), snapshot, then restore to the end."""
    tmp = tmp_path_factory.mktemp("tune")
    space_file = write_space(tmp / "space.yaml")
    # run.wandb: every trial logs an offline W&B run (WANDB_MODE=offline, conftest).
    overrides = [f"run.storage_path={tmp / 'sweeps'}", "run.wandb=true"]
    sweep = validate_sweep(load_space(space_file), "tiny", overrides)

    first = run_sweep(sweep, str(space_file), stop_after_trials=1)
    finished = [t for t in first["trials"] if t["status"] == "COMPLETED"]
    metrics_lines = {t["trial_id"]: read_lines(os.path.join(
        sweep.runs_dir, f"{sweep.space.name}_{t['trial_id']}", "metrics.jsonl")) for t in finished}

    # A fresh sweep refuses to overwrite the folder; --restore is the way back in.
    with pytest.raises(ConfigError, match="--restore"):
        run_sweep(sweep, str(space_file))
    second = run_sweep(sweep, str(space_file), restore=True)
    on_disk = json.loads(Path(sweep.dir, SUMMARY_FILE).read_text())
    return {"sweep": sweep, "first": first, "second": second, "on_disk": on_disk,
            "metrics_lines": metrics_lines}


def test_interrupted_sweep_keeps_its_finished_trial(sweep_runs):
    first = sweep_runs["first"]
    # Trials are created as slots free up (1 at a time here): the rest come on restore.
    assert 1 <= first["num_trials"] <= NUM_TRIALS
    finished = [t for t in first["trials"] if t["status"] == "COMPLETED"]
    assert len(finished) == 1, first["status_counts"]
    assert finished[0]["metric"] is not None and finished[0]["step"] == MAX_STEPS
    unfinished = [t for t in first["trials"] if t["status"] != "COMPLETED"]
    assert all(t["status"] in ("PENDING", "RUNNING", "PAUSED") for t in unfinished), \
        first["status_counts"]


def test_restored_sweep_completes_and_keeps_finished_trials(sweep_runs):
    first, second = sweep_runs["first"], sweep_runs["second"]
    assert second["num_trials"] == NUM_TRIALS
    assert second["status_counts"] == {"COMPLETED": NUM_TRIALS}
    by_id = {t["trial_id"]: t for t in second["trials"]}
    for old in (t for t in first["trials"] if t["status"] == "COMPLETED"):
        new = by_id[old["trial_id"]]
        # Same trial, same result, same checkpoint, and its run was not trained again.
        assert new["config"] == old["config"]
        assert new["metric"] == old["metric"]
        assert new["checkpoint_path"] == old["checkpoint_path"]
        path = os.path.join(sweep_runs["sweep"].runs_dir, f"weights_{old['trial_id']}",
                            "metrics.jsonl")
        assert read_lines(path) == sweep_runs["metrics_lines"][old["trial_id"]]


def test_every_trial_is_a_wandb_run_of_the_sweeps_group(sweep_runs):
    """One W&B group a sweep, one run a trial (resumed under its id when its trial is
    restored), holding the trial's metrics.jsonl rows."""
    sweep = sweep_runs["sweep"]
    interrupted = {t["trial_id"] for t in sweep_runs["first"]["trials"] if t["status"] != "COMPLETED"}
    for trial in sweep_runs["second"]["trials"]:
        folder = Path(sweep.runs_dir, f"{sweep.space.name}_{trial['trial_id']}")
        # Trials ran in processes that have exited (their files are complete); an
        # interrupted one has no exit record, so no waiting for it.
        runs = wandb_offline_runs(folder / "wandb", wait_s=0)
        # The interruption may kill a running trial's worker before W&B wrote its run
        # record: such a file holds nothing logged, and only an interrupted trial has one.
        killed = [r for r in runs if r["id"] is None]
        assert not killed or trial["trial_id"] in interrupted, runs
        assert not any(r["history"] for r in killed), killed
        runs = [r for r in runs if r["id"] is not None]
        assert runs and {r["group"] for r in runs} == {sweep.space.name}, runs
        assert len({r["id"] for r in runs}) == 1                  # one W&B run per trial
        logged = {h["_step"] for r in runs for h in r["history"]}
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert logged == {row["step"] for row in rows} and MAX_STEPS in logged


def test_sweep_summary_ranks_by_weight_free_metric(sweep_runs):
    summary = sweep_runs["on_disk"]
    trials = summary["trials"]
    assert summary["metric"] == "val/zeroshot_auroc"      # bundled PTB-XL has labels
    assert len(trials) == NUM_TRIALS
    # Every trial trained with its own weights, and the run saw them.
    weights = [tuple(t["config"][k] for k in WEIGHTS) for t in trials]
    assert len(set(weights)) == NUM_TRIALS
    for t, w in zip(trials, weights):
        for (key, spec), value in zip(WEIGHTS.items(), w):
            assert spec["low"] <= value <= spec["high"], (key, value)
        run_summary = json.loads(Path(t["run_summary"]).read_text())
        assert run_summary["steps"] == MAX_STEPS
        assert run_summary["validation"]["zeroshot_auroc"] == pytest.approx(t["metric"])
        assert t["checkpoint_path"] and Path(t["checkpoint_path"]).is_dir()
        assert 0.0 <= t["metric"] <= 1.0 and t["metric_step"] == MAX_STEPS
        # What a trial restored after its last checkpoint reports instead (it resumes with no
        # step left, so no worker reports): the same result Tune took from the live run.
        fallback = final_result(run_summary)
        assert fallback["val/zeroshot_auroc"] == pytest.approx(t["metric"])
        assert fallback["step"] == t["step"] and fallback["val_step"] == t["metric_step"]
        assert fallback["checkpoint_path"] == t["checkpoint_path"]
        assert {k for k in fallback if k.startswith("loss/")} == set(t["losses"])
    # The best trial is the argmax of the metric, never of a loss.
    best = max(trials, key=lambda t: t["metric"])
    assert [t["trial_id"] for t in trials if t["best"]] == [best["trial_id"]]
    assert summary["best_trial"] == best["trial_id"]
    assert summary["best_metric"] == best["metric"]
    assert summary["best_config"] == best["config"]
    assert Path(summary["plot"]).name == PLOT_FILE
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(summary["curves_plot"]).name == CURVES_FILE      # every trial's curves, overlaid
    assert Path(summary["curves_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- invalid spaces (no Ray)

@pytest.mark.parametrize("fields, message", [
    ({"params": {"loss.beat": {"distribution": "normal", "low": 0, "high": 1}}},
     "unknown distribution 'normal'"),
    ({"params": {"loss.rhythm": {"distribution": "uniform", "low": -0.5, "high": 1.0}}},
     "loss weights cannot be negative"),
    ({"params": {"loss.token": {"distribution": "choice", "values": [1.0, -2.0]}}},
     "loss weights cannot be negative"),
    ({"params": {"loss.rhythm": {"distribution": "uniform", "low": 2.0, "high": 1.0}}},
     r"low \(2.0\) must be < high \(1.0\)"),
    ({"params": {"train.lr": {"distribution": "loguniform", "low": 0, "high": 1e-3}}},
     "loguniform needs low > 0"),
    ({"params": {"loss.rythm": {"distribution": "uniform", "low": 0.1, "high": 1.0}}},
     r"unknown config key\(s\) \['loss.rythm'\]"),
    ({"params": {"train.warmup_steps": {"distribution": "uniform", "low": 0, "high": 8}}},
     "train.warmup_steps: expected int"),
    ({"base_overrides": {"train.max_step": 4}}, r"unknown config key\(s\) \['train.max_step'\]"),
    ({"metric": "loss/total"}, "is a loss"),
    ({"metric": "val/loss_total"}, "is a loss"),
    ({"metric": "val/auroc"}, "not a validation metric"),
    ({"scheduler": {"type": "asha", "grace_period": 3}}, "multiple of train.val_every"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type must be one of"),
    ({"params": {"loss.rhythm": {"distribution": "choice", "values": [0.0]},
                 "loss.token": {"distribution": "choice", "values": [0.0]},
                 "loss.beat": {"distribution": "choice", "values": [0.0, 1.0]}}},
     "at least one loss weight must be > 0"),
])
def test_invalid_space_fails_before_any_trial(tmp_path, capsys, fields, message):
    space_file = write_space(tmp_path / "bad.yaml", **fields)
    # validate_sweep is what the CLI calls before ray.init: it must reject the space.
    with pytest.raises(ConfigError, match=message):
        validate_sweep(load_space(space_file), "tiny", [f"run.storage_path={tmp_path}"])
    assert main(["--space", str(space_file), f"run.storage_path={tmp_path}"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "weights").exists()            # no sweep folder was started
