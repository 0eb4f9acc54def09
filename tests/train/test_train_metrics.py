"""Where metrics go: console line, metrics.jsonl beside the run, W&B (offline) from rank 0 only."""
from __future__ import annotations

import json
import struct

import pytest
from tracking_fixture import read_tensorboard_scalars, wandb_offline_runs

from melp_ray.config import PretrainConfig, load_config
from melp_ray.train.metrics import WANDB_ID_FILE, MetricsLogger, format_progress, log_wandb_summary

METRICS = {"step": 5, "loss/total": 3.5, "loss/rhythm": 1.25, "lr": 1e-4,
           "samples_per_s": 12.0, "input_wait_frac": 0.01, "val/recall_at_1": 0.5,
           "logit_scale": 14.2857}


def cfg_for(tmp_path, *extra):
    return load_config(PretrainConfig, "tiny", [f"run.storage_path={tmp_path}", "run.name=m", *extra])


def test_rank0_writes_metrics_jsonl_and_resumes_its_history(tmp_path, capfd):
    logger = MetricsLogger(cfg_for(tmp_path), rank=0)
    logger.log(METRICS)
    logger.close()
    assert capfd.readouterr().out.count("step 5") == 1
    again = MetricsLogger(cfg_for(tmp_path), rank=0)      # a resumed run keeps the history
    again.log({**METRICS, "step": 10})
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10]


def test_other_ranks_log_nothing(tmp_path, capfd):
    MetricsLogger(cfg_for(tmp_path), rank=1).log(METRICS)
    assert not (tmp_path / "m" / "metrics.jsonl").exists()
    assert capfd.readouterr().out == ""


def test_wandb_offline_run_logs_metrics_jsonl_then_resumes_with_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_for(tmp_path, "run.wandb=true", "run.wandb_group=sweep-a")
    logger = MetricsLogger(cfg, rank=0)
    logger.log(METRICS)
    logger.log({**METRICS, "step": 10, "loss/total": 2.5})
    logger.close()
    log_wandb_summary(cfg, {"steps": 10, "losses": {"total": 2.5}, "last_checkpoint": None})

    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    train, summary = wandb_offline_runs(tmp_path / "m" / "wandb")
    run_id = (tmp_path / "m" / WANDB_ID_FILE).read_text().strip()
    assert train["id"] == summary["id"] == run_id        # the end (like a resumed run) continues it
    assert train["group"] == "sweep-a"
    logged = [{k: v for k, v in h.items() if not k.startswith("_")} for h in train["history"]]
    assert logged == rows
    assert [h["_step"] for h in train["history"]] == [5, 10]
    assert summary["summary"]["steps"] == 10 and summary["summary"]["losses"] == {"total": 2.5}


def test_progress_line_names_every_loss_and_the_input_wait():
    line = format_progress(METRICS)
    for part in ("total 3.5000", "rhythm 1.2500", "lr 1.00e-04", "scale 14.29", "12.0 samples/s", "input wait 1.0%"):
        assert part in line


def test_metrics_jsonl_is_appended_not_rewritten(tmp_path):
    logger = MetricsLogger(cfg_for(tmp_path), rank=0)
    logger.log(METRICS)
    path = tmp_path / "m" / "metrics.jsonl"
    first, inode = path.read_bytes(), path.stat().st_ino
    logger.log({**METRICS, "step": 10})
    assert path.stat().st_ino == inode                      # same file: appended, not replaced
    assert path.read_bytes().startswith(first) and path.read_bytes().count(b"\n") == 2


def test_object_storage_metrics_are_synced_at_close_and_resumed(tmp_path):
    # file:// goes through pyarrow's FileSystem.from_uri like s3:// (no append there)
    cfg = cfg_for(tmp_path, f"run.storage_path=file://{tmp_path}/bucket")
    logger = MetricsLogger(cfg, rank=0)
    logger.log(METRICS)
    remote = tmp_path / "bucket" / "m" / "metrics.jsonl"
    assert not remote.exists()                              # not uploaded at every line
    logger.close()
    again = MetricsLogger(cfg, rank=0)
    again.log({**METRICS, "step": 10})
    again.close()
    assert [json.loads(line)["step"] for line in remote.read_text().splitlines()] == [5, 10]


@pytest.mark.parametrize("scheme", ["", "file://"])   # file://: written locally, copied beside the run
def test_tensorboard_events_hold_the_metrics_jsonl_scalars(tmp_path, scheme):
    cfg = cfg_for(tmp_path, "run.tensorboard=true")
    cfg.run.storage_path = scheme + str(tmp_path)
    logger = MetricsLogger(cfg, rank=0)
    logger.log(METRICS)
    logger.log({**METRICS, "step": 10, "loss/total": 2.5})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    scalars = read_tensorboard_scalars(tmp_path / "m" / "tensorboard")
    assert set(scalars) == set(METRICS) - {"step"}
    for key in scalars:   # float32 in the event file
        assert [s for s, _ in scalars[key]] == [r["step"] for r in rows]
        assert [v for _, v in scalars[key]] == [float(struct.unpack("f", struct.pack("f", r[key]))[0])
                                                for r in rows]
