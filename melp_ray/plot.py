"""python -m melp_ray.plot RUN_DIR [RUN_DIR...] [--out PNG]: redraw one run's training curves
or overlay several (one colour per run). The drawing: ``melp_ray.train.curves``.
"""
from __future__ import annotations

import argparse
import sys

from melp_ray.train.curves import CURVES_FILE, plot_runs, unique_labels
from melp_ray.utils import storage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melp_ray.plot",
                                description="Redraw training curves from metrics.jsonl: one run, or several overlaid.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png for one run, "
                                 "./curves.png for several)")
    args = p.parse_args(argv)
    dirs = [storage.normalise_storage_path(d) for d in args.run_dirs]
    out = args.out or (storage.join(dirs[0], CURVES_FILE) if len(dirs) == 1 else CURVES_FILE)
    labels = unique_labels(dirs)
    plot_runs(dict(zip(labels, dirs)), out)
    print(f"[melp_ray.plot] {len(dirs)} run(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
