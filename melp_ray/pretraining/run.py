"""The stage-2 driver: checks that need the data (shard rate, records per worker), one data
stream per rank and split, the start banner, and ``run``: Ray Train (or one worker in this
process) with ``PretrainRecipe``, returning the run summary."""
from __future__ import annotations

from typing import Any

from melp_ray.config import ConfigError, PretrainConfig
from melp_ray.config_sections import check_data_root
from melp_ray.pretraining.recipe import PretrainRecipe
from melp_ray.train.init_from import check_init_from
from melp_ray.train.elastic import dataset_name
from melp_ray.train.stream import stream_spec


def build_datasets(cfg: PretrainConfig, data_info: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """One dataset per rank and split; ``data_info`` (if given) receives what goes in."""
    from melp_ray.train.stream import split_datasets

    spec = stream_spec(cfg)
    kw = dict(dataset=cfg.data.dataset, val_fraction=cfg.data.val_fraction,
              seed=cfg.train.seed, limit=cfg.data.limit, exclude_folds=cfg.data.exclude_folds)
    counts: dict[str, dict[str, int]] = {}
    datasets = {}
    lo, hi = cfg.train.worker_range
    # An elastic run gets every world size's slices (lazy datasets: Ray Train opens only
    # those its workers ask for); each (re)start reads the ones of its world size.
    for world in range(lo, hi + 1):
        for split, per_rank in split_datasets(cfg.data.root, world, spec, **kw, counts=counts).items():
            for rank, ds in enumerate(per_rank):
                name = dataset_name(split, rank, world if cfg.train.elastic else None)
                datasets[name] = ds.materialize() if cfg.data.materialize else ds
    info = data_summary(cfg, counts)
    print(f"[melp_ray] data: {info['train_records']} train / {info['val_records']} val records"
          + (f"; {info['held_out']['records']} records of folds {info['held_out']['folds']} "
             "held out" if cfg.data.exclude_folds else ""), flush=True)
    if data_info is not None:
        data_info.update(info)
    return datasets


def batch_banner(cfg: PretrainConfig) -> str:
    """The start line that says how the global batch is split and how many ECG-report pairs
    one rhythm (contrastive) loss scores at once: its negatives are the other pairs."""
    t = cfg.train
    if t.elastic:
        lo, hi = t.worker_range
        splits = "; ".join(f"{w} x {t.at_world(w).micro_batch_size} x {t.at_world(w).grad_accum}"
                           for w in range(lo, hi + 1))
        return (f"[melp_ray] batch: {t.global_batch_size} a step at any world size, elastic "
                f"{lo}-{hi} workers (workers x micro-batch x accumulation: {splits}); "
                f"train.contrastive_accumulation={t.contrastive_accumulation}")
    split = f"{t.num_workers} worker{'s' * (t.num_workers > 1)} x micro-batch {t.micro_batch_size}"
    if t.grad_accum > 1:
        split += f" x {t.grad_accum} accumulation steps"
    times = "" if t.contrastive_negatives == t.global_batch_size else f", {t.grad_accum} times a step"
    return (f"[melp_ray] batch: {t.global_batch_size} a step = {split}; rhythm loss over "
            f"{t.contrastive_negatives} pairs at once{times} "
            f"(train.contrastive_accumulation={t.contrastive_accumulation})")


def contrastive_summary(cfg: PretrainConfig) -> dict[str, Any]:
    """summary.json's record of the contrastive batch (see ``batch_banner``)."""
    return {"contrastive_accumulation": cfg.train.contrastive_accumulation,
            "contrastive_negatives": cfg.train.contrastive_negatives}


def data_summary(cfg: PretrainConfig, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Records per split (before signal-level rejections) and those held out for their fold."""
    return {"train_records": counts["train"]["records"],
            "val_records": counts["val"]["records"],
            "held_out": {"folds": sorted(set(cfg.data.exclude_folds)),
                         "records": sum(c["held_out"] for c in counts.values())}}


def check_shards_fit(cfg: PretrainConfig) -> None:
    """Prepared shards must hold ECGs of the config's rate and duration, and give every
    worker at least one training micro-batch per epoch (rows are dealt evenly,
    ``deal_rows``; any number of shard files is fine). Read from the manifest before Ray
    starts, and with folds held out from the shards' ``strat_fold`` column (one small
    column per file), as the workers will count them."""
    from melp_ray.data.shards import load_manifest
    from melp_ray.data.sources import detect_layout

    d = cfg.data
    if d.root is None or (d.dataset if d.dataset != "auto" else detect_layout(d.root)) != "shards":
        return
    manifest = load_manifest(d.root)
    check_shard_signal(manifest, d)
    lo, hi = cfg.train.worker_range
    for world in range(lo, hi + 1):     # an elastic run: every world size it may run at
        check_records_per_worker(cfg, manifest, cfg.train.at_world(world))


def check_records_per_worker(cfg: PretrainConfig, manifest: dict, t) -> None:
    """Each of ``t.num_workers`` workers gets at least one training micro-batch per epoch."""
    from melp_ray.data.rows import resolve_root, shard_rows, split_shard_files

    d = cfg.data
    if d.exclude_folds:
        files = split_shard_files(resolve_root(d.root), "train", t.num_workers, d.limit)
        records = sum(len(f.kept) for f in shard_rows(files, d.exclude_folds))
    else:
        train = [s for s in manifest["shards"] if s["split"] == "train"]
        if d.limit is not None:
            train = sorted(train, key=lambda s: s["path"])[: max(t.num_workers, 1)]
        records = sum(s["rows"] for s in train)
    if records // max(t.num_workers, 1) < t.micro_batch_size:
        raise ConfigError(
            f"data.root: {records} train records give each of train.num_workers="
            f"{t.num_workers} workers {records // max(t.num_workers, 1)}, fewer than one "
            f"micro-batch of {t.micro_batch_size}: use fewer workers, a smaller "
            f"train.global_batch_size or more data")


def check_shard_signal(manifest: dict, data_cfg) -> None:
    """Shards are stored at one rate and duration (``prepare --sample-rate/--seconds``).
    Another rate is resampled on reading (``StreamSpec.shard_rate``); another duration
    cannot be made up: a config error, not a worker's crash."""
    rate, seconds = manifest.get("sample_rate"), manifest.get("seconds")
    if rate is None or seconds is None or abs(float(seconds) - data_cfg.seconds) < 1e-6:
        return
    raise ConfigError(
        f"data.root: the shards hold {seconds:g} s ECGs ({rate:g} Hz), the config asks for "
        f"data.seconds={data_cfg.seconds:g}: add data.seconds={seconds:g}, or re-run prepare "
        f"with --seconds {data_cfg.seconds:g}")


def run(cfg: PretrainConfig, callbacks: list | None = None,
        recipe_cls: type[PretrainRecipe] = PretrainRecipe, in_process: bool = False
        ) -> dict[str, Any]:
    """Train with an already validated config; returns (and writes) the run summary.

    ``recipe_cls``: a PretrainRecipe subclass to run instead (e.g. one that also saves
    something at the end); the data, launcher and summary are the same.
    ``in_process``: run the one worker (``train.num_workers=1``) in this process instead of
    on Ray Train (``launcher.fit_in_process``: debugging, tests of the recipe's logic).
    """
    from melp_ray.utils.ray_connect import init_ray, quiet_data_progress_bars
    from melp_ray.train.launcher import fit_and_summarise, fit_in_process

    check_data_root(cfg.data)
    check_shards_fit(cfg)
    check_init_from(cfg.train.init_from, cfg.model)
    init_ray(verbose=cfg.run.verbose)
    quiet_data_progress_bars()
    print(batch_banner(cfg), flush=True)
    data_info: dict[str, Any] = {}
    datasets = build_datasets(cfg, data_info)
    extra = {"data": data_info, "init_from": cfg.train.init_from, **contrastive_summary(cfg)}
    if in_process:
        return fit_in_process(cfg, recipe_cls, datasets, extra_summary=extra)
    return fit_and_summarise(cfg, recipe_cls, datasets, callbacks=callbacks, extra_summary=extra)
