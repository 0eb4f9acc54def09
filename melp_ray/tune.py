"""Ray Tune sweeps over MELP pretraining settings (the token / beat / rhythm loss weights, lr ...).

    python -m melp_ray.tune --space tune_spaces/loss_weights.yaml
    python -m melp_ray.tune --space tune_spaces/lr_and_weights.yaml train.max_steps=200
    python -m melp_ray.tune --space tune_spaces/loss_weights.yaml --restore   # after an interruption

Every trial is a full distributed pretraining run; trials are ranked by a weight-free
validation metric. A space file is validated completely (distributions, bounds, every config
key and value type, the metric, the scheduler) before Ray is started; see docs/tune.md for
its format and melp_ray/sweeps/ for the library this command line drives.
"""
from __future__ import annotations

import argparse
import sys

from melp_ray.config import ConfigError
from melp_ray.sweeps.space import load_space
from melp_ray.sweeps.tuner import run_sweep
from melp_ray.sweeps.validate import DEFAULT_CONFIG, validate_sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.tune",
        description="Ray Tune sweeps over MELP pretraining settings (loss weights, lr ...); "
                    "each trial is a full Ray Train + DeepSpeed pretraining run.",
        epilog="Overrides are key=value pairs over the base training config (after the "
               "space's base_overrides), e.g. train.max_steps=200 data.root=/data/shards. "
               "See docs/tune.md.")
    parser.add_argument("--space", required=True, help="tune space YAML (see tune_spaces/)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="base training config: YAML file or shipped name. Default: tiny")
    parser.add_argument("--name", default=None,
                        help="sweep name (folder under run.storage_path). Default: the space's name")
    parser.add_argument("--restore", action="store_true",
                        help="resume the interrupted sweep of this name; finished trials are kept")
    parser.add_argument("--stop-after-trials", type=int, default=None, metavar="N",
                        help="interrupt (resumably) once N trials finished in this invocation")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        space = load_space(args.space, args.name)
        sweep = validate_sweep(space, args.config, args.overrides)
        summary = run_sweep(sweep, space_path=args.space, restore=args.restore,
                            stop_after_trials=args.stop_after_trials)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["best_trial"] else 1


if __name__ == "__main__":
    sys.exit(main())
