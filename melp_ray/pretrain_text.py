"""Stage 1: the cardiology text model, masked-language modelling on the report corpus.

    python -m melp_ray.pretrain_text                                  # tiny BERT from scratch
    python -m melp_ray.pretrain_text --config text_base data.root=/data/mimic-shards
    python -m melp_ray.pretrain_text text.init=pretrained text.model=minilm
    python -m melp_ray.pretrain_text --export <checkpoint dir> --out <folder>   # export only

The same Ray Train + DeepSpeed machinery as stage 2 (``DeepSpeedRecipe``): one
deterministic Ray Data stream per rank (reports tokenised on data workers), MLM masking
drawn on the training worker from the per-micro-step generator (exact resume), ZeRO
checkpoints through ``ray.train.report``. The result is a Hugging Face folder
(``<storage>/<name>/hf_text_model``) that stage 2 loads as it is:

    python -m melp_ray.pretrain model.text_model=<folder> model.text_pretrained=true

The pieces live in melp_ray.text: config, corpus (data and tokenizer), mlm (model, masking,
recipe) and export.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from melp_ray.utils import storage
from melp_ray.config import ConfigError, config_keys, load_config
from melp_ray.config_sections import check_data_root
from melp_ray.text_mlm.config import TextPretrainConfig, tokenizer_source
from melp_ray.text_mlm.corpus import build_datasets, prepare_tokenizer
from melp_ray.utils.console import summary_table
from melp_ray.text_mlm.export import export_hf_model
from melp_ray.text_mlm.recipe import TextPretrainRecipe

DEFAULT_CONFIG = "text_tiny"
HF_FOLDER = "hf_text_model"          # <storage>/<name>/hf_text_model


def run(cfg: TextPretrainConfig, out: str | None = None, callbacks: list | None = None,
        in_process: bool = False) -> dict[str, Any]:
    """Train (or resume), export the final checkpoint as a HF folder; returns the summary.
    ``in_process``: as in ``melp_ray.pretraining.run.run`` (one worker, in this process)."""
    from melp_ray.utils.ray_connect import init_ray, quiet_data_progress_bars
    from melp_ray.text_mlm.wordpiece import load_tokenizer_folder
    from melp_ray.train.launcher import fit_and_summarise, fit_in_process
    from melp_ray.train.metrics import run_dir

    if cfg.data.use_reports:
        check_data_root(cfg.data)
    init_ray(verbose=cfg.run.verbose)
    quiet_data_progress_bars()
    cfg = prepare_tokenizer(cfg)
    tokenizer = load_tokenizer_folder(tokenizer_source(cfg))
    out = out or storage.join(run_dir(cfg), HF_FOLDER)
    extra = {"text_init": cfg.text.init, "tokenizer": tokenizer_source(cfg),
             "vocab_size": len(tokenizer)}
    datasets = build_datasets(cfg, tokenizer)
    summary = (fit_in_process(cfg, TextPretrainRecipe, datasets, extra_summary=extra) if in_process
               else fit_and_summarise(cfg, TextPretrainRecipe, datasets, extra_summary=extra,
                                      callbacks=callbacks))
    # A run stopped early (train.stop_at_step) is resumed later; only a finished one is exported.
    if cfg.train.stop_at_step is None or cfg.train.stop_at_step >= cfg.train.max_steps:
        summary["hf_text_model"] = export_hf_model(summary["last_checkpoint"], out)
        storage.write_json(storage.join(run_dir(cfg), "summary.json"), summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.pretrain_text",
        description="Stage 1: masked-language modelling of a BERT on the report corpus "
                    "(Ray Train + DeepSpeed), exported as a Hugging Face folder.",
        epilog="Overrides are key=value pairs over the config, e.g. text.init=pretrained "
               "text.model=minilm train.max_steps=200. Keys: "
               + ", ".join(config_keys(TextPretrainConfig)))
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML file, or a shipped config name (text_tiny, text_base). "
                             "Default: text_tiny")
    parser.add_argument("--out", default=None,
                        help="where to write the Hugging Face folder "
                             "(default: <storage>/<name>/hf_text_model)")
    parser.add_argument("--export", metavar="CHECKPOINT", default=None,
                        help="only export this checkpoint folder (needs --out); no training")
    parser.add_argument("--verbose", action="store_true",
                        help="let Ray, DeepSpeed and transformers print at their default levels "
                             "(the same as run.verbose=true)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.verbose:
        args.overrides.append("run.verbose=true")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        if not args.out:
            print("error: --export needs --out", file=sys.stderr)
            return 2
        print(f"[melp_ray] wrote {export_hf_model(args.export, args.out)}")
        return 0
    try:
        cfg = load_config(TextPretrainConfig, args.config, args.overrides)
        if cfg.data.use_reports:
            check_data_root(cfg.data)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = run(cfg, out=args.out)
    print(summary_table(summary), flush=True)
    if summary.get("hf_text_model"):
        print(f"  text model   {summary['hf_text_model']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
