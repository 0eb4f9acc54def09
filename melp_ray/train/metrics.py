"""Where training metrics go: the console, metrics.jsonl beside the run, and W&B (rank 0 only)."""
from __future__ import annotations

import json
import sys
from typing import Any

from melp_ray import storage
from melp_ray.config import to_dict


def run_dir(cfg) -> str:
    return storage.join(storage.normalise_storage_path(cfg.run.storage_path), cfg.run.name)


class MetricsLogger:
    def __init__(self, cfg, rank: int):
        self.active = rank == 0   # only the world rank 0 logs (W&B would start a run per rank)
        self.path = storage.join(run_dir(cfg), "metrics.jsonl")
        self.lines: list[str] = []
        self.wandb = None
        if self.active and storage.exists(self.path):
            self.lines = storage.read_text(self.path).splitlines()   # resumed run: keep history
        if self.active and cfg.run.wandb:
            import wandb

            local_dir = None if storage.is_uri(self.path) else run_dir(cfg)
            self.wandb = wandb.init(project=cfg.run.wandb_project, name=cfg.run.name,
                                    id=cfg.run.name, resume="allow", dir=local_dir,
                                    config=to_dict(cfg))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        worker_print(format_progress(metrics))
        self.lines.append(json.dumps(metrics, sort_keys=True))
        # Object stores cannot append: the (small) file is rewritten whole.
        storage.write_text(self.path, "\n".join(self.lines) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics["step"]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def worker_print(line: str) -> None:
    """Print one line from a Ray Train worker, once.

    Why not plain ``print``: Ray Train replaces ``print`` in its workers with a function that
    sends the line to the logging system *and*, when ``sys.stdout`` has been wrapped (it is,
    in a Ray worker), also prints it: every line reached the console twice. Writing to the
    process's own stdout is one plain print, forwarded to the driver like any worker output.
    """
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def format_progress(m: dict[str, Any]) -> str:
    parts = [f"step {int(m['step'])}"]
    parts += [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in m.items() if k.startswith("loss/")]
    if "logit_scale" in m:
        parts.append(f"scale {m['logit_scale']:.2f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['samples_per_s']:.1f} samples/s",
              f"input wait {100 * m['input_wait_frac']:.1f}%"]
    parts += [f"{k} {v:.4f}" for k, v in m.items()
              if k.startswith("val/") and isinstance(v, float)]
    return "[melp_ray] " + " | ".join(parts)



