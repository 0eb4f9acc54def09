"""Where training metrics go: the console, metrics.jsonl beside the run, TensorBoard event
files and W&B (rank 0 only)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from typing import Any

from melp_ray.utils import storage
from melp_ray.config import to_dict


TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"


def run_dir(cfg) -> str:
    return storage.join(storage.normalise_storage_path(cfg.run.storage_path), cfg.run.name)


# On object storage, how often the local metrics.jsonl is uploaded (and at close).
SYNC_SECONDS = 60.0


class MetricsLogger:
    """metrics.jsonl is appended one line per ``log``. Object stores cannot append: there the
    lines are appended to a local file, uploaded whole at most every ``SYNC_SECONDS``, at
    every checkpoint (``sync``: a restart resumes from one, so no row before it is lost) and
    at ``close`` (so the upload cost no longer grows with every log line)."""

    def __init__(self, cfg, rank: int):
        self.active = rank == 0   # only the world rank 0 logs (W&B would start a run per rank)
        self.path = storage.join(run_dir(cfg), "metrics.jsonl")
        self.remote = storage.is_uri(self.path)
        self.local = self.path
        self.last_sync = time.monotonic()
        self.wandb = None
        if self.active:
            self._open_local()
        if self.active and cfg.run.wandb:
            self.wandb = start_wandb(cfg)

        self.tensorboard = TensorBoardWriter(run_dir(cfg)) if self.active and cfg.run.tensorboard else None

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        worker_print(format_progress(metrics))
        with open(self.local, "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self.remote and time.monotonic() - self.last_sync >= SYNC_SECONDS:
            self.sync()
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics["step"]))
        if self.tensorboard is not None:
            self.tensorboard.log(metrics)

    def _open_local(self) -> None:
        """The file lines are appended to; a resumed run on object storage starts from its copy."""
        if not self.remote:
            os.makedirs(os.path.dirname(self.local), exist_ok=True)
            return
        fd, self.local = tempfile.mkstemp(prefix="melp_metrics_", suffix=".jsonl")
        os.close(fd)
        if storage.exists(self.path):
            with open(self.local, "w") as f:
                f.write(storage.read_text(self.path))

    def sync(self) -> None:
        """Upload the local copy (object storage only)."""
        if self.active and self.remote:
            with open(self.local) as f:
                storage.write_text(self.path, f.read())
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self.active and self.remote and os.path.exists(self.local):
            os.remove(self.local)
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def start_wandb(cfg):
    """The run's W&B run: the resolved config as its config, the id kept in the run folder
    (``wandb_id``) so a resumed run (and the summary written at the end) continue it.

    W&B keeps steps increasing: steps a resumed run repeats (those after its checkpoint) are
    not logged again; metrics.jsonl and curves.png keep the newer values."""
    import wandb

    folder = run_dir(cfg)
    id_file = storage.join(folder, WANDB_ID_FILE)
    if storage.exists(id_file):
        run_id = storage.read_text(id_file).strip()
    else:
        run_id = uuid.uuid4().hex[:8]   # W&B's id alphabet: lowercase letters and digits
        storage.write_text(id_file, run_id + "\n")
    return wandb.init(project=cfg.run.wandb_project, name=cfg.run.name, id=run_id, resume="allow",
                      group=cfg.run.wandb_group, dir=None if storage.is_uri(folder) else folder,
                      config=to_dict(cfg))


def log_wandb_summary(cfg, summary: dict[str, Any]) -> None:
    """summary.json as the W&B run's summary (the driver, once the workers are done)."""
    run = start_wandb(cfg)
    run.summary.update(summary)
    run.finish()


class TensorBoardWriter:
    """Every number of a metrics.jsonl row as a TensorBoard scalar (same key, at its step),
    in ``<run dir>/tensorboard``. A resumed run adds a new event file to the same folder
    (TensorBoard shows the newer values of repeated steps). tensorboardX comes with
    ``ray[tune]``; it writes local files only, so a run on object storage writes to a local
    folder and copies it beside the run at each flush."""

    def __init__(self, run_folder: str):
        from tensorboardX import SummaryWriter

        self.dest = storage.join(run_folder, TENSORBOARD_DIR)
        self.staging = tempfile.mkdtemp(prefix="melp-tb-") if storage.is_uri(run_folder) else None
        self.writer = SummaryWriter(logdir=self.staging or self.dest)

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()
        if self.staging:
            storage.copy_folder(self.staging, self.dest)

    def close(self) -> None:
        self.writer.close()
        if self.staging:
            storage.copy_folder(self.staging, self.dest)


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


class Window:
    """Running means of the losses, throughput and input wait since the last report."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.samples = 0
        self.input_wait = 0.0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, float], samples: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.samples += samples

    def summary(self, step: int, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {f"loss/{k}": v / max(self.count, 1) for k, v in self.sums.items()}
        out.update(step=step, lr=lr, samples_per_s=self.samples / elapsed,
                   input_wait_frac=self.input_wait / elapsed)
        return out
