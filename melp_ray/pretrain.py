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
from typing import Any

import torch
import torch.distributed as dist

from melp_ray.utils.console import summary_table
from melp_ray.config import (ConfigError, PretrainConfig, check_checkpoint_metric, check_data_root,
                             config_keys, load_config)
from melp_ray.utils.distributed import gather_rows, sum_over_ranks
from melp_ray.model.losses import gather_no_grad
from melp_ray.train.init_from import check_init_from
from melp_ray.train.recipe import DeepSpeedRecipe

DEFAULT_CONFIG = "small"


class PretrainRecipe(DeepSpeedRecipe):
    """What stage 2 trains: the MELP model on the token, beat and rhythm objectives."""

    def build_model(self):
        from melp_ray.model import MELP

        model = MELP(self.cfg.model)
        init_from = self.cfg.train.init_from
        if init_from is not None:
            # Weights only, and only for a fresh run: a resumed run continues from its checkpoint.
            if not self.session.has_checkpoint():
                from melp_ray.train.init_from import load_initial_weights

                load_initial_weights(model, init_from)
        return model

    def compile_model(self, model) -> None:
        model.compile_parts()

    def setup(self) -> None:
        super().setup()
        self.epoch_rows = self.reassignable_shard_rows()
        self.spec = stream_spec(self.cfg)     # reads the manifest once, not every epoch
        self.loss_fn = self.build_loss()

    def build_loss(self):
        from melp_ray.model.losses import MELPLoss

        w = self.cfg.loss
        return MELPLoss.from_model_config(self.cfg.model, rhythm=w.rhythm, token=w.token,
                                          beat=w.beat, same_report_positives=w.same_report_positives)

    def reassignable_shard_rows(self) -> list | None:
        """The train split's shard files (with their kept rows) when each epoch deals them
        out anew, else None (raw roots, materialized data, ``data.reassign_shards=false``)."""
        from melp_ray.data.sources import detect_layout
        from melp_ray.data.rows import resolve_root, shard_rows, split_shard_files

        d = self.cfg.data
        root = resolve_root(d.root)
        if not d.reassign_shards or d.materialize or detect_layout(root) != "shards":
            return None
        return shard_rows(split_shard_files(root, "train", self.world, d.limit), d.exclude_folds)

    def train_dataset(self, epoch: int):
        """Streamed shards: this epoch's rows for this rank (``deal_rows``)."""
        if self.epoch_rows is None:
            return self.train_data
        from melp_ray.data.rows import deal_rows
        from melp_ray.train.stream import slices_dataset

        slices = deal_rows(self.epoch_rows, self.world, self.rank, epoch, self.cfg.train.seed)
        return slices_dataset(slices, self.spec, self.cfg.data.exclude_folds)

    def forward(self, batch: dict[str, torch.Tensor], ecg: torch.Tensor) -> dict:
        if self.bf16:
            ecg = ecg.to(torch.bfloat16)
        return self.engine(ecg, batch["input_ids"], batch["attention_mask"], batch["sentence_ids"])

    def compute_losses(self, batch, generator):
        ecg = augment(batch["ecg"], self.cfg.data, generator)
        return self.losses_of(self.forward(batch, ecg))

    def losses_of(self, out: dict, **given) -> dict[str, torch.Tensor]:
        """The three losses, computed in fp32 whatever precision the model ran in."""
        return self.loss_fn({k: v.float() if torch.is_floating_point(v) else v
                             for k, v in out.items()}, **given)

    # ------------------------------------------------ the rhythm loss over the global batch
    def micro_batches_per_call(self) -> int:
        t = self.cfg.train
        return t.grad_accum if t.contrastive_accumulation == "cached" and t.grad_accum > 1 else 1

    def train_micro_batches(self, group):
        if len(group) == 1:
            return super().train_micro_batches(group)
        return self.cached_step(group)

    def seeded_forward(self, batch: dict, seed: int) -> dict:
        """The forward of ``micro_step``, with the same draws (augmentation and dropout)
        every time it is called with the same seed."""
        torch.manual_seed(seed)
        ecg = augment(batch["ecg"], self.cfg.data, torch.Generator().manual_seed(seed))
        return self.forward(batch, ecg)

    def cached_step(self, group: list[tuple[dict, int]]) -> list[dict[str, float]]:
        """One optimizer step over the micro-batches of ``group`` whose rhythm loss is one
        InfoNCE over all of them on all ranks (gradient caching):

        1. a forward without gradient per micro-batch keeps the rhythm embeddings;
        2. the loss over the gathered embeddings of the step, and its gradient with respect
           to them (``cached_rhythm_loss``);
        3. per micro-batch, the same forward again (same seed: same dropout and
           augmentation) with gradient; its backward carries the cached embedding gradients
           (``rhythm_surrogate``) plus the token and beat losses, and ``engine.step``.

        The micro-batches' backward losses add up to the step's loss (``scale_wrt_gas=False``:
        DeepSpeed does not divide them by the accumulation steps again): the gradient is the
        one-big-batch gradient. The token loss is divided by the step's token count, the beat
        loss (local to a micro-batch) averaged over micro-batches as without caching.
        """
        from melp_ray.losses import cached_rhythm_loss, rhythm_surrogate, token_count_per_rank

        w, k, b = self.cfg.loss, len(group), self.cfg.train.micro_batch_size
        self.engine.train()
        with torch.no_grad():   # keep only what the loss needs (not e.g. the token logits)
            firsts = [{key: out[key] for key in ("ecg_emb", "text_emb", "labels", "logit_scale")}
                      for out in (self.seeded_forward(batch, seed) for batch, seed in group)]
        ecg_emb = torch.cat([o["ecg_emb"].float() for o in firsts])
        text_emb = torch.cat([o["text_emb"].float() for o in firsts])
        labels = torch.cat([o["labels"] for o in firsts])
        keys = labels if w.same_report_positives else None
        rhythm, ecg_grad, text_grad, scale_grad = cached_rhythm_loss(
            ecg_emb, text_emb, firsts[0]["logit_scale"], keys)
        count = token_count_per_rank(labels)
        del firsts, ecg_emb, text_emb
        logged = []
        for i, (batch, seed) in enumerate(group):
            out = self.seeded_forward(batch, seed)
            parts = self.losses_of(out, rhythm_value=rhythm, token_count=count)
            rows = slice(i * b, (i + 1) * b)
            # The logit scale is one number for the step: a k-th of its gradient per micro-batch.
            surrogate = rhythm_surrogate(out["ecg_emb"], out["text_emb"], out["logit_scale"],
                                         ecg_grad[rows], text_grad[rows], scale_grad / k)
            objective = w.rhythm * surrogate + w.token * parts["token"] + w.beat * parts["beat"] / k
            self.engine.backward(objective, scale_wrt_gas=False)
            self.engine.step()
            # Logged per micro-batch, so that their mean is the step's loss.
            token = float(parts["token"].detach()) * k
            beat = float(parts["beat"].detach())
            logged.append({"rhythm": float(rhythm), "token": token, "beat": beat,
                           "total": w.rhythm * float(rhythm) + w.token * token + w.beat * beat})
        return logged

    def extra_metrics(self) -> dict[str, float]:
        scale = self.model.logit_scale.detach().float()   # 1 element: never partitioned by ZeRO-3
        return {"logit_scale": float(scale.clamp(max=self.cfg.model.logit_scale_max).exp())}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation losses, ECG<->report retrieval recall and (with labels) zero-shot AUROC,
        over every validation record of every rank exactly once (up to ``val_batches``
        batches a rank).

        Ranks may hold different numbers of rows, even none (fewer records than workers),
        yet every collective (ZeRO-3 gathers, the losses' all-gathers) needs every rank, with
        equal shapes: so all ranks run the same rounds, each on a batch padded to
        ``micro_batch_size`` by repeating rows (a rank out of rows repeats an earlier or a
        borrowed batch). Only real rows count: losses are weighted by them, embeddings of
        padding are dropped. A padded batch's losses still see its repeats as negatives.
        """
        if self.val_data is None:
            return {}
        self.engine.eval()
        size = self.cfg.train.micro_batch_size
        batches = iter(self.val_data.iter_torch_batches(batch_size=size, drop_last=False,
                                                        device=self.device))
        sums: dict[str, float] = {}
        ecg_embs, text_embs, labels, real, template = [], [], [], 0, None
        for _ in range(self.cfg.train.val_batches):
            batch = next(batches, None)
            n = 0 if batch is None else len(batch["ecg"])
            template = template if n == 0 else batch
            counts = gather_no_grad(torch.tensor([[n, template is not None]], device=self.device))
            if counts[:, 0].max() == 0:
                break
            if not counts[:, 1].all():     # some rank has never had a row: lend it one
                template = self.borrow_batch(template, int(counts[:, 1].nonzero()[0, 0]))
            padded = pad_rows(batch if n else template, size)
            out = self.forward(padded, padded["ecg"])
            for k, v in self.losses_of(out).items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            real += n
            ecg_embs.append(out["ecg_emb"][:n].float())
            text_embs.append(out["text_emb"][:n].float())
            if "labels_super" in template:
                labels.append(template["labels_super"][:0] if n == 0 else batch["labels_super"].float())
        self.engine.train()
        if not ecg_embs:
            return {}
        totals = sum_over_ranks(torch.tensor([*(sums[k] for k in sorted(sums)), real],
                                             device=self.device, dtype=torch.float64))
        metrics = {f"loss_{k}": float(v / totals[-1]) for k, v in zip(sorted(sums), totals)}
        ecg_all = gather_rows(torch.cat(ecg_embs))
        text_all = gather_rows(torch.cat(text_embs))
        metrics.update(retrieval_recall(ecg_all, text_all))
        if labels:
            metrics.update(self.zero_shot_auroc(ecg_all, gather_rows(torch.cat(labels).float())))
        return metrics

    def borrow_batch(self, template: dict | None, src: int) -> dict:
        """Rank ``src``'s batch, on every rank that has none of its own (a collective)."""
        box = [None if template is None else {k: v.cpu() for k, v in template.items()}]
        dist.broadcast_object_list(box, src=src)
        return template if template is not None else {k: v.to(self.device) for k, v in box[0].items()}

    def zero_shot_auroc(self, ecg_emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        from melp_ray.eval.metrics import macro_auroc
        from melp_ray.data.ptbxl import SUPERCLASSES
        from melp_ray.text.prompts import PTBXL_SUPERCLASS_PROMPTS

        from melp_ray.eval.zero_shot import prompt_embeddings

        prompt_emb = prompt_embeddings(
            lambda texts: self.model.encode_reports(texts).float().cpu().numpy(),
            [PTBXL_SUPERCLASS_PROMPTS[c] for c in SUPERCLASSES])
        scores = ecg_emb @ torch.from_numpy(prompt_emb).float().to(ecg_emb.device).T
        y = labels.cpu().numpy()
        if not ((y.sum(0) > 0) & (y.sum(0) < len(y))).any():
            return {}
        macro, _ = macro_auroc(y, scores.cpu().numpy())
        return {"zeroshot_auroc": float(macro)}


# ---------------------------------------------------------------- small pieces

def pad_rows(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """``batch`` with exactly ``size`` rows: its rows repeated in turn (or the first ``size``)."""
    index = torch.arange(size) % len(batch["ecg"])
    return {k: v[index.to(v.device)] for k, v in batch.items()}


def augment(ecg: torch.Tensor, data_cfg, generator: torch.Generator) -> torch.Tensor:
    """The training-time augmentation of a batch: lead masking, then the optional time shift."""
    ecg = mask_leads(ecg, data_cfg.lead_mask_prob, generator)
    return shift_in_time(ecg, generator) if data_cfg.random_shift else ecg


def shift_in_time(ecg: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Roll each record (b, leads, T) by its own random offset in [0, T): the same beats and
    rhythm, a different position of every beat relative to the frames and positional conv."""
    b, _, length = ecg.shape
    offsets = torch.randint(0, length, (b, 1), generator=generator).to(ecg.device)
    index = (torch.arange(length, device=ecg.device) + offsets) % length
    return ecg.gather(2, index[:, None, :].expand_as(ecg))


def mask_leads(ecg: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each lead of each record with probability ``prob`` (MELP's augmentation).

    Drawn on the training worker from a seeded generator so a resumed run repeats it.
    """
    if prob <= 0:
        return ecg
    keep = torch.rand(ecg.shape[0], ecg.shape[1], 1, generator=generator) >= prob
    return ecg * keep.to(device=ecg.device, dtype=ecg.dtype)


def retrieval_recall(ecg_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """ECG<->report recall@1/5/10 over the validation pairs, each beside its chance level.

    Chance = k / N: the recall of a ranking that knows nothing (N pairs, one true match).
    """
    from melp_ray.eval.metrics import recall_at_k

    sim = (ecg_emb @ text_emb.T).cpu().numpy()
    out = {k.replace("@", "_at_"): float(v) for k, v in recall_at_k(sim, ks=(1, 5, 10)).items()}
    for k in (1, 5, 10):
        out[f"recall_at_{k}_chance"] = min(k, len(sim)) / len(sim)
    return out


# ---------------------------------------------------------------- driver

def stream_spec(cfg: PretrainConfig):
    """What the data pipelines must produce for this model (from shards of another rate:
    resampled on reading)."""
    from melp_ray.train.stream import StreamSpec

    return StreamSpec(sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                      text_model=cfg.model.text_model, max_text_length=cfg.model.max_text_length,
                      shard_rate=shard_rate(cfg.data))


def shard_rate(data_cfg) -> int | None:
    """The rate prepared shards are stored at (their manifest), None for a raw root."""
    from melp_ray.data.shards import load_manifest
    from melp_ray.data.sources import detect_layout
    from melp_ray.data.rows import resolve_root

    root = resolve_root(data_cfg.root)
    if data_cfg.dataset not in ("auto", "shards") or detect_layout(root) != "shards":
        return None
    rate = load_manifest(root).get("sample_rate")
    return None if rate is None else int(rate)


def build_datasets(cfg: PretrainConfig, data_info: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """One dataset per rank and split; ``data_info`` (if given) receives what goes in."""
    from melp_ray.train.stream import split_datasets

    spec = stream_spec(cfg)
    kw = dict(dataset=cfg.data.dataset, val_fraction=cfg.data.val_fraction,
              seed=cfg.train.seed, limit=cfg.data.limit, exclude_folds=cfg.data.exclude_folds)
    world = cfg.train.num_workers
    counts: dict[str, dict[str, int]] = {}
    datasets = {}
    for split, per_rank in split_datasets(cfg.data.root, world, spec, **kw, counts=counts).items():
        for rank, ds in enumerate(per_rank):
            datasets[f"{split}_r{rank}"] = ds.materialize() if cfg.data.materialize else ds
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
    from melp_ray.data.rows import resolve_root, shard_rows, split_shard_files

    d, t = cfg.data, cfg.train
    if d.root is None or (d.dataset if d.dataset != "auto" else detect_layout(d.root)) != "shards":
        return
    manifest = load_manifest(d.root)
    check_shard_signal(manifest, d)
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
