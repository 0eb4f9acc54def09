"""Ray Tune sweeps over MELP pretraining settings (the token / beat / rhythm loss weights, lr ...).

The loss weights change the scale of the total loss, so trials are ranked by a weight-free
validation metric (zero-shot AUROC or retrieval recall), never by a loss.

In the order a sweep goes through them:

- ``space``: the space YAML parsed and checked on its own (``load_space`` -> ``SweepSpace``);
- ``validate``: the space tried against the base training config, before Ray starts
  (``validate_sweep`` -> ``Sweep``);
- ``trial``: what one trial runs, a whole Ray Train + DeepSpeed pretraining run;
- ``tuner``: the driver that builds or restores the Tuner and runs it (``run_sweep``);
- ``summary``: ``tune_summary.json``, the plot and the table, from Tune's saved state.

Sweep folder ``<run.storage_path>/<sweep name>/``: Tune's experiment state and trial folders,
``sweep.json`` (what was asked), ``runs/<trial id>/`` (each trial's Train run: checkpoints,
metrics.jsonl, summary.json), ``tune_summary.json``, ``tune_metric_vs_params.png`` and ``tune_curves.png``.
The command line is ``python -m melp_ray.tune``; docs/tune.md has the space format.
"""
