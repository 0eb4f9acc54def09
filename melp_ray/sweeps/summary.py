"""The sweep's outputs, read back from Tune's saved experiment state: ``tune_summary.json``,
the metric-vs-parameter plot and the table printed at the end of a run."""
from __future__ import annotations

import math
from typing import Any

from melp_ray.utils import storage
from melp_ray.train.curves import plot_runs
from melp_ray.sweeps.space import is_number
from melp_ray.sweeps.validate import Sweep

SUMMARY_FILE = "tune_summary.json"
PLOT_FILE = "tune_metric_vs_params.png"
CURVES_FILE = "tune_curves.png"


def summarise(sweep: Sweep) -> dict[str, Any]:
    """tune_summary.json + the plot, from Tune's saved experiment state."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(sweep.dir)
    max_steps = sweep.base_cfg.train.max_steps
    trials = []
    for trial in sorted(analysis.trials, key=lambda tr: tr.trial_id):
        last = trial.last_result or {}
        value = last.get(sweep.metric)
        step = last.get("step")
        status = trial.status
        if status == "TERMINATED" and step is not None:
            status = "COMPLETED" if step >= max_steps else "EARLY_STOPPED"
        run_summary = storage.join(sweep.runs_dir, f"{sweep.space.name}_{trial.trial_id}",
                                   "summary.json")
        trials.append({
            "trial_id": trial.trial_id,
            "status": status,
            "config": dict(trial.config),
            "metric": float(value) if value is not None else None,
            "metric_step": last.get("val_step"),
            "step": step,
            "losses": {k: v for k, v in last.items() if k.startswith("loss/")},
            "validation": {k: v for k, v in last.items() if k.startswith("val/")},
            "checkpoint_path": last.get("checkpoint_path"),
            "run_summary": run_summary if storage.exists(run_summary) else None,
            "trial_path": trial.path,
            "best": False,
        })
    ranked = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    best = max(ranked, key=lambda t: t["metric"], default=None)
    if best is not None:
        best["best"] = True
    summary = {
        "sweep": sweep.space.name,
        "sweep_dir": sweep.dir,
        "metric": sweep.metric,
        "mode": "max",
        "scheduler": sweep.space.scheduler.type,
        "search": sweep.space.search,
        "params": [p.key for p in sweep.space.params],
        "num_trials": len(trials),
        "status_counts": {s: sum(t["status"] == s for t in trials)
                          for s in sorted({t["status"] for t in trials})},
        "best_trial": best["trial_id"] if best else None,
        "best_config": best["config"] if best else None,
        "best_metric": best["metric"] if best else None,
        "best_checkpoint": best["checkpoint_path"] if best else None,
        "trials": trials,
    }
    storage.write_json(storage.join(sweep.dir, SUMMARY_FILE), summary)
    summary["plot"] = write_plot(summary, sweep)
    summary["curves_plot"] = write_trial_curves(summary, sweep)
    storage.write_json(storage.join(sweep.dir, SUMMARY_FILE), summary)
    return summary


def write_plot(summary: dict[str, Any], sweep: Sweep) -> str | None:
    """One panel per swept parameter: the metric of every trial against its value."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in summary["trials"] if t["metric"] is not None]
    keys = summary["params"]
    if not trials or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [t["config"].get(key) for t in trials]
        numeric = all(is_number(x) for x in xs)
        pos = xs if numeric else [sorted(map(str, set(xs))).index(str(x)) for x in xs]
        ax.scatter(pos, [t["metric"] for t in trials], c="tab:blue")
        for x, t in zip(pos, trials):
            if t["best"]:
                ax.scatter([x], [t["metric"]], marker="*", s=250, c="tab:red", label="best")
        if not numeric:
            ax.set_xticks(range(len(set(map(str, xs)))), sorted(map(str, set(xs))))
        elif any(p.key == key and p.distribution == "loguniform" for p in sweep.space.params):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(summary["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best")
    fig.suptitle(f"sweep {summary['sweep']}: {len(trials)} trial(s)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = storage.join(sweep.dir, PLOT_FILE)
    fs, p = storage.filesystem_and_path(path)
    with fs.open_output_stream(p) as f:
        f.write(buf.getvalue())
    return path


def write_trial_curves(summary: dict[str, Any], sweep: Sweep) -> str | None:
    """Every trial's training curves overlaid in one picture (one colour a trial)."""
    runs = {t["trial_id"]: storage.join(sweep.runs_dir, f"{sweep.space.name}_{t['trial_id']}")
            for t in summary["trials"]}
    runs = {k: d for k, d in runs.items() if storage.exists(storage.join(d, "metrics.jsonl"))}
    if not runs:
        return None
    path = storage.join(sweep.dir, CURVES_FILE)
    plot_runs(runs, path, title=f"sweep {summary['sweep']}: {len(runs)} trial(s)")
    return path


def format_table(summary: dict[str, Any]) -> str:
    keys = summary["params"]
    header = ["", "trial", "status", *keys, summary["metric"], "at step"]
    rows = []
    for t in summary["trials"]:
        rows.append(["*" if t["best"] else "", t["trial_id"], t["status"],
                     *[_fmt(t["config"].get(k)) for k in keys], _fmt(t["metric"]),
                     _fmt(t["metric_step"])])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = (f"best: {summary['best_trial']} {summary['metric']}={summary['best_metric']:.4f} "
            f"checkpoint {summary['best_checkpoint']}" if summary["best_trial"]
            else "best: none (no trial reported the metric)")
    return (f"[melp_ray.tune] sweep {summary['sweep']} ({summary['sweep_dir']})\n"
            + "\n".join(lines) + "\n" + best + f"\nsummary: {storage.join(summary['sweep_dir'], SUMMARY_FILE)}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
