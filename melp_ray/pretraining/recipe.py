"""PretrainRecipe: what each stage-2 worker trains — the MELP model on the token, beat and
rhythm objectives (with the rhythm loss over the whole global batch under accumulation:
``cached_step``), validation recalls and the zero-shot selection metric."""
from __future__ import annotations

import torch
import torch.distributed as dist

from melp_ray.model.losses import (cached_rhythm_loss, gather_no_grad, rhythm_surrogate,
                                   token_count_per_rank)
from melp_ray.train.augment import augment, pad_rows
from melp_ray.train.augment import seeded_draws
from melp_ray.train.recipe import DeepSpeedRecipe
from melp_ray.train.stream import stream_spec
from melp_ray.utils.distributed import gather_rows, sum_over_ranks


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
        self.elastic_records = None          # an elastic run's train split, read on first use
        self.epoch_rows = None if self.launch_cfg.train.elastic else self.reassignable_shard_rows()
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

    def elastic_source(self):
        """An elastic run's train split, world-size free: the shard files with their kept
        rows, or a raw root's records (``train_dataset`` deals them out per epoch)."""
        from melp_ray.data.rows import drop_folds, list_splits, resolve_root, shard_rows, split_shard_files
        from melp_ray.data.sources import detect_layout

        d = self.cfg.data
        root = resolve_root(d.root)
        layout = detect_layout(root) if d.dataset == "auto" else d.dataset
        if layout == "shards":
            return shard_rows(split_shard_files(root, "train", self.world, d.limit), d.exclude_folds)
        refs = list_splits(layout, root, d.val_fraction, self.cfg.train.seed, d.limit,
                           d.sample_rate)["train"]
        return drop_folds(refs, d.exclude_folds)[0]

    def elastic_dataset(self, epoch: int):
        """This rank's records of ``epoch`` in an elastic run: each step's global batch is
        the same run of records of the epoch's seeded order at any world size
        (``rows.elastic_positions``), so a resize between steps neither repeats nor skips
        a record of the epoch."""
        import random

        from melp_ray.data.rows import ShardRows, elastic_positions, elastic_slices, epoch_order
        from melp_ray.data.rows import resolve_root
        from melp_ray.train.stream import slices_dataset, wfdb_dataset

        if self.elastic_records is None:
            self.elastic_records = self.elastic_source()
        t, source = self.cfg.train, self.elastic_records
        if source and isinstance(source[0], ShardRows):
            order = epoch_order(source, epoch, t.seed)
            positions = elastic_positions(len(order), t.global_batch_size, self.world, self.rank)
            return slices_dataset(elastic_slices(order, positions), self.spec,
                                  self.cfg.data.exclude_folds)
        refs = list(source)
        random.Random(f"{t.seed}:{epoch}").shuffle(refs)   # str seed: stable across processes
        positions = elastic_positions(len(refs), t.global_batch_size, self.world, self.rank)
        return wfdb_dataset([refs[i] for span in positions for i in span],
                            resolve_root(self.cfg.data.root), self.spec)

    def train_dataset(self, epoch: int):
        """Elastic runs: ``elastic_dataset``; streamed shards: this epoch's rows for this
        rank (``deal_rows``)."""
        if self.launch_cfg.train.elastic:
            return self.elastic_dataset(epoch)
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
        ecg = augment(batch["ecg"], self.cfg.data, seeded_draws(seed))
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
        return {**super().extra_metrics(),
                "logit_scale": float(scale.clamp(max=self.cfg.model.logit_scale_max).exp())}

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
