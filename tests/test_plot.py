"""curves.png: the plotted series are metrics.jsonl's values; several runs overlay."""
from __future__ import annotations

import json

from melp_ray import plot
from melp_ray.train import curves
from melp_ray.train.curves import CURVES_FILE, curve_data, latest_history, write_run_curves


def history(scale: float) -> list[dict]:
    """Rows with the keys a pretraining run logs (training every step, validation at 2 and 4)."""
    rows = []
    for step in (1, 2, 3, 4):
        row = {"step": step, "epoch": 0, "samples_seen": 8 * step, "lr": 1e-4 * step,
               "loss/total": scale * 8 / step, "loss/rhythm": 3.0 / step, "loss/beat": 2.0 / step,
               "loss/token": 4.0 / step, "logit_scale": 14.28, "samples_per_s": 10.0 + step,
               "input_wait_frac": 0.01 * step}
        if step % 2 == 0:
            row.update({"val/loss_total": scale * 7 / step, "val/recall_at_1": 0.1 * step,
                        "val/recall_at_5": 0.2 * step, "val/recall_at_10": 0.25 * step,
                        "val/recall_at_1_chance": 0.0625, "val/recall_at_5_chance": 0.3125,
                        "val/recall_at_10_chance": 0.625, "val/ecg_to_report/recall_at_1": 0.0,
                        "val/zeroshot_auroc": 0.5 + 0.05 * step})
        rows.append(row)
    return rows


def write_run(folder, rows) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_run_curves_plot_the_logged_values(tmp_path):
    rows = history(1.0)
    out = write_run_curves(write_run(tmp_path / "run", rows))
    assert out == str(tmp_path / "run" / CURVES_FILE)
    assert (tmp_path / "run" / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = curve_data(rows)
    assert data["training loss"]["total"] == ([1, 2, 3, 4], [r["loss/total"] for r in rows])
    assert data["learning rate"]["lr"] == ([1, 2, 3, 4], [r["lr"] for r in rows])
    assert data["samples/s"]["samples/s"][1] == [r["samples_per_s"] for r in rows]
    assert data["input wait (fraction of time)"]["input wait"][1] == [r["input_wait_frac"] for r in rows]
    recall = data["validation recall@k (dashed: chance)"]
    assert recall["R@5"] == ([2, 4], [0.4, 0.8])
    assert recall["R@5 chance"] == ([2, 4], [0.3125, 0.3125])
    auroc = data["zero-shot AUROC (dashed: chance)"]
    assert auroc["AUROC"] == ([2, 4], [0.6, 0.7]) and auroc["AUROC chance"] == ([2, 4], [0.5, 0.5])
    assert data["validation loss"]["total"] == ([2, 4], [3.5, 1.75])


def test_resumed_history_keeps_the_newer_rows():
    first = [{"step": s, "loss/total": 1.0} for s in (1, 2, 3)]
    resumed = [{"step": s, "loss/total": 2.0} for s in (2, 3, 4)]
    kept = latest_history(first + resumed)
    assert [(r["step"], r["loss/total"]) for r in kept] == [(1, 1.0), (2, 2.0), (3, 2.0), (4, 2.0)]


def test_cli_overlays_runs_with_each_runs_values(tmp_path, monkeypatch):
    a = write_run(tmp_path / "a", history(1.0))
    b = write_run(tmp_path / "b", history(2.0))
    drawn, real_draw = {}, curves.draw
    monkeypatch.setattr(curves, "draw", lambda runs, out, title="": drawn.update(runs=runs, out=out))
    assert plot.main([a, b, "--out", str(tmp_path / "both.png")]) == 0
    assert drawn["out"] == str(tmp_path / "both.png") and list(drawn["runs"]) == ["a", "b"]
    assert drawn["runs"]["b"]["training loss"]["total"][1] == [r["loss/total"] for r in history(2.0)]
    real_draw(drawn["runs"], drawn["out"])    # the real drawing of the overlay
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
