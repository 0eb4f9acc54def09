"""Training curves from metrics.jsonl: ``curves.png`` at the end of every run, and

    python -m melp_ray.plot RUN_DIR [RUN_DIR...] [--out PNG]

(``melp_ray/plot.py``) to redraw one run or overlay several (one colour per run). Panels,
each drawn only when the history has its keys: training losses, validation losses, learning rate, validation
recall@k beside its chance line, zero-shot AUROC beside 0.5, samples/s, input wait.
"""
from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")   # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from melp_ray.utils import storage  # noqa: E402

CURVES_FILE = "curves.png"
RECALL_KS = (1, 5, 10)

# panel -> series label -> (steps, values)
Curves = dict[str, dict[str, tuple[list[int], list[float]]]]


def read_history(run_dir: str) -> list[dict[str, Any]]:
    """metrics.jsonl of a run, as logged; a resumed run's repeated steps keep the newer rows."""
    path = storage.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    return latest_history(rows)


def latest_history(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in step order where a resumed run (logging again from an earlier step) replaces
    what the first attempt logged after its checkpoint."""
    kept: list[dict[str, Any]] = []
    for row in rows:
        while kept and kept[-1]["step"] >= row["step"]:
            kept.pop()
        kept.append(row)
    return kept


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def curve_data(rows: list[dict[str, Any]]) -> Curves:
    """What the picture shows, per panel and series: the exact values of metrics.jsonl."""
    keys = sorted({k for r in rows for k in r})
    panels: Curves = {
        "training loss": {k.split("/", 1)[1]: series(rows, k) for k in keys if k.startswith("loss/")},
        "validation loss": {k[len("val/loss_"):]: series(rows, k) for k in keys if k.startswith("val/loss_")},
        "learning rate": {"lr": series(rows, "lr")},
        "validation recall@k (dashed: chance)": {},
        "zero-shot AUROC (dashed: chance)": {},
        "samples/s": {"samples/s": series(rows, "samples_per_s")},
        "input wait (fraction of time)": {"input wait": series(rows, "input_wait_frac")},
    }
    recall = panels["validation recall@k (dashed: chance)"]
    for k in RECALL_KS:
        recall[f"R@{k}"] = series(rows, f"val/recall_at_{k}")
        recall[f"R@{k} chance"] = series(rows, f"val/recall_at_{k}_chance")
    auroc = panels["zero-shot AUROC (dashed: chance)"]
    auroc["AUROC"] = series(rows, "val/zeroshot_auroc")
    auroc["AUROC chance"] = (auroc["AUROC"][0], [0.5] * len(auroc["AUROC"][0]))
    return {title: {name: s for name, s in group.items() if s[0]}
            for title, group in panels.items() if any(s[0] for s in group.values())}


def draw(runs: dict[str, Curves], out: str, title: str = "") -> None:
    """One figure, a panel per metric group, every run's series overlaid (one colour a run)."""
    titles = [t for t in dict.fromkeys(t for c in runs.values() for t in c)]
    if not titles:
        raise ValueError("no metrics to plot (empty metrics.jsonl?)")
    cols = min(3, len(titles))
    rows = -(-len(titles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, titles):
        for i, (run, curves) in enumerate(runs.items()):
            bases = list(dict.fromkeys(n.removesuffix(" chance") for n in curves.get(panel, {})))
            for name, (steps, values) in curves.get(panel, {}).items():
                chance = name.endswith(" chance")
                # One run: a colour per series (a chance line shares its metric's). Several: a colour per run.
                j = bases.index(name.removesuffix(" chance"))
                colour = colours[(i if len(runs) > 1 else j) % len(colours)]
                label = name if len(runs) == 1 else f"{run}: {name}"
                ax.plot(steps, values, "--" if chance else "-", color=colour, alpha=0.6 if chance else 1,
                        marker=None if len(steps) > 30 else "o", markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(titles):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(out, buf.getvalue())


def plot_runs(run_dirs: dict[str, str], out: str, title: str = "") -> dict[str, Curves]:
    """Draw the runs (label -> run folder) into ``out``; returns the data plotted."""
    runs = {label: curve_data(read_history(d)) for label, d in run_dirs.items()}
    draw(runs, out, title)
    return runs


def write_run_curves(run_dir: str) -> str | None:
    """curves.png beside the run's metrics.jsonl (nothing when the run logged nothing)."""
    if not storage.exists(storage.join(run_dir, "metrics.jsonl")):
        return None
    out = storage.join(run_dir, CURVES_FILE)
    try:
        plot_runs({run_dir.rstrip("/").rsplit("/", 1)[-1]: run_dir}, out)
    except ValueError:   # a history with no step logged: no picture, not a failed run
        return None
    return out


def unique_labels(dirs: list[str]) -> list[str]:
    """Each run's folder name; the whole path where two runs share a name."""
    names = [d.rstrip("/").rsplit("/", 1)[-1] for d in dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, dirs)]
