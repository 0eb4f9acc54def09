"""Stage 2: MELP ECG-language pretraining as a Ray Train job with DeepSpeed ZeRO workers.

    python -m melp_ray.pretrain                                   # small model, bundled PTB-XL
    python -m melp_ray.pretrain --config paper data.root=/data/mimic-shards train.num_workers=8
    ray job submit --working-dir . -- python -m melp_ray.pretrain train.max_steps=100

Re-running with the same run.name and run.storage_path resumes from the latest checkpoint.
``train.init_from=PATH`` starts a new run from other weights instead (a checkpoint, run
folder, export or ``python -m melp_ray.convert`` folder): weights only, fresh step,
optimizer and schedule (``melp_ray.train.init_from``).
"""
from __future__ import annotations

import argparse
import sys

from melp_ray.config import ConfigError, PretrainConfig, check_checkpoint_metric, config_keys, load_config
from melp_ray.config_sections import check_data_root
from melp_ray.pretraining.run import check_shards_fit, run
from melp_ray.train.init_from import check_init_from
from melp_ray.utils.console import summary_table

DEFAULT_CONFIG = "small"


def parse_args(argv: list[str] | None = None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.pretrain",
        description="MELP ECG-language pretraining on Ray Train + DeepSpeed ZeRO.",
        epilog="Overrides are key=value pairs over the config, e.g. train.max_steps=100 "
               "model.preset=paper deepspeed.zero_stage=3 data.root=/data/shards. "
               "Keys: " + ", ".join(config_keys(PretrainConfig)))
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML file, or a shipped config name (small, tiny, paper). Default: small")
    parser.add_argument("--verbose", action="store_true",
                        help="let Ray, DeepSpeed and transformers print at their default levels "
                             "(the same as run.verbose=true)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides + (["run.verbose=true"] if args.verbose else [])


def main(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, config, overrides)
        check_data_root(cfg.data)      # a folder of unknown layout: exit 2, not a traceback
        check_shards_fit(cfg)          # shards of another rate, too few records: exit 2
        check_checkpoint_metric(cfg)
        check_init_from(cfg.train.init_from, cfg.model)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = run(cfg)
    print(summary_table(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
