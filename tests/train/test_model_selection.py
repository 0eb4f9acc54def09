"""Model selection: Ray keeps the best checkpoint by a validation metric, the run summary
names it, a run folder resolves to it, and early stopping ends the run (a real Ray Train run,
as the pruning is Ray's ``CheckpointConfig``; one worker: how 2 ranks share one shard file
and gather validation is tests/data/test_data_stream.py's and tests/test_pretrain.py's)."""
from __future__ import annotations

import os

from melp_ray.utils import storage
from melp_ray.hub.checkpoint import TRAINER_STATE, resolve_checkpoint

PEAK_STEP = 4


def _peaking_recipe():
    """PretrainRecipe whose validation also reports ``peak``, highest at PEAK_STEP: a metric
    whose best step is known in advance (the real validation metrics still run beside it)."""
    from melp_ray.pretraining.recipe import PretrainRecipe

    class PeakingRecipe(PretrainRecipe):
        def validate(self):
            return {**super().validate(), "peak": -abs(self.state.step - PEAK_STEP) / 10}

    return PeakingRecipe


def test_best_checkpoint_is_kept_named_and_resolved_and_patience_stops_the_run(ray_local, tiny_cfg,
                                                                                tmp_path, make_shards):
    from melp_ray.pretraining.run import run

    root = make_shards(tmp_path / "shards", train=[80], val=[16])   # 1 shard each

    # Validated and checkpointed every 2 steps: peak = -0.2, 0 (best), -0.2, -0.4, ...
    # patience 2 stops at step 8 of 12; keep 1 = the best one (plus the newest, for resume).
    cfg = tiny_cfg(tmp_path, "select", f"data.root={root}", "data.limit=null", "train.max_steps=12",
                   "train.val_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=1",
                   "train.checkpoint_metric=val/peak", "train.early_stop_patience=2",
                   "train.num_workers=1")
    summary = run(cfg, recipe_cls=_peaking_recipe())

    assert summary["steps"] == 8 and summary["stopped_early"] is True
    best = summary["best_checkpoint"]
    assert best["step"] == PEAK_STEP and best["metric"] == "val/peak" and best["score"] == 0.0
    kept = [d for d in os.listdir(summary["run_dir"])
            if d.startswith("checkpoint_") and os.path.isdir(os.path.join(summary["run_dir"], d))]
    steps = sorted(storage.read_json(os.path.join(summary["run_dir"], d, TRAINER_STATE))["step"]
                   for d in kept)
    assert steps == [PEAK_STEP, 8]          # the best, and the newest; 2 and 6 were deleted
    assert resolve_checkpoint(summary["run_dir"]).rstrip("/") == best["path"].rstrip("/")
    # The real validation metrics were computed at every checkpoint too.
    assert "recall_at_10" in summary["validation"]
    # Over all 16 validation pairs (2 batches of 8).
    assert summary["validation"]["recall_at_1_chance"] == 1 / 16
    assert summary["data"]["train_records"] == 80 and summary["world_size"] == 1
