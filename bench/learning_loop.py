"""What a training change does to the held-out probe, step by step: a plain PyTorch loop.

    python bench/learning_loop.py                                # the shipped `small` settings
    python bench/learning_loop.py model.text_frozen_layers=6     # a variant (pretrain keys)
    python bench/learning_loop.py --text-lr-scale 0.1 --ema 0.995
    python bench/learning_loop.py --smoke                        # tiny, bundled sample (CI)

``bench/learning.py`` judges the shipped config the way users run it (Ray Train, DeepSpeed,
one final checkpoint). This script is for trying variants of it: no Ray, one process, the
same model (``MELP``), batches prepared exactly as training prepares them (``load_signal``
-> ``finish_batch`` -> ``augment``), the same three losses (``compute_losses``), AdamW on
the same parameter groups, gradient clipping and the warm-up + cosine schedule; the held-out
fold is never trained on. Every ``--eval-every`` steps it scores the same quantities as
``learning.py`` on that fold from one embedding pass: linear probe (``train_linear_probe``
on ``ecg_features``; probe folds train/val as there), mean pairwise ECG cosine and
ECG->report recall@10 over chance k/N. Step 0 is the random init. Two runs with
``--threads 1`` can share the 2 cores. Two knobs exist only here: ``--text-lr-scale``
(the text tower's learning rate relative to the rest) and ``--ema`` (evaluate an
exponential moving average of the weights).
"""
from __future__ import annotations

import time

import _common as C
import learning   # its held-out folds and probe folds, so both scripts score the same split


def load_batches(cfg, root: str):
    """Every usable record of ``root`` as one batch of tensors, plus its folds."""
    import numpy as np
    import torch

    from melp_ray.data.records import load_signal
    from melp_ray.data.rejections import RecordRejected
    from melp_ray.data.sources import scan_records
    from melp_ray.train.stream import StreamSpec, finish_batch

    spec = StreamSpec(sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                      text_model=cfg.model.text_model, max_text_length=cfg.model.max_text_length)
    refs, signals = [], []
    for ref in scan_records("ptb-xl", root, sample_rate=cfg.data.sample_rate).refs:
        try:
            signals.append(load_signal(ref, root, spec.sample_rate, spec.seconds))
            refs.append(ref)
        except RecordRejected as err:
            C.log(f"rejected {ref.record_id}: {err}")
    batch = finish_batch(np.stack(signals), [r.report for r in refs],
                         [r.labels["super"] for r in refs], spec)
    data = {k: torch.from_numpy(v) for k, v in batch.items()}
    return data, np.array([r.strat_fold for r in refs])


def rows(data, index):
    """The records at ``index``, text columns cut to the longest report among them."""
    out = {k: data[k][index] for k in ("ecg", "input_ids", "attention_mask", "sentence_ids")}
    used = int(out["attention_mask"].any(dim=0).nonzero().max()) + 1
    for key in ("input_ids", "attention_mask", "sentence_ids"):
        out[key] = out[key][:, :used]
    return out


def optimizer_for(model, train, text_lr_scale: float):
    """``recipe.param_groups`` (decay on matrices only), each split into the text tower
    and the rest so the text tower can run at ``text_lr_scale`` x the learning rate."""
    import torch

    from melp_ray.train.optim import lr_schedule, param_groups

    text = {id(p) for p in model.text.parameters()}
    groups = []
    for group in param_groups(model, train.weight_decay, train.decay_all_parameters):
        for in_text, scale in ((True, text_lr_scale), (False, 1.0)):
            params = [p for p in group["params"] if (id(p) in text) == in_text]
            if params:
                groups.append({"params": params, "weight_decay": group["weight_decay"],
                               "lr": train.lr * scale, "text_tower": in_text})
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas))
    return optimizer, lr_schedule(optimizer, train)


def score(model, data, folds, probe_folds: dict, holdout: int) -> dict:
    """Probe, cosine and recall@10 on the held-out fold from one embedding pass."""
    import numpy as np
    import torch

    from melp_ray.eval.linear_probe import train_linear_probe
    from melp_ray.eval.metrics import mean_pairwise_cosine, recall_at_k

    was_training = model.training
    model.eval()
    feats, ecg_emb, text_emb = [], [], []
    with torch.inference_mode():
        for index in torch.arange(len(folds)).split(128):
            b = rows(data, index)
            feats.append(model.ecg_features(b["ecg"]))
            ecg_emb.append(model.encode_ecg(b["ecg"]))
            text_emb.append(model.encode_text(b["input_ids"], b["attention_mask"]))
    model.train(was_training)
    x = torch.cat(feats).double().numpy()
    y = data["labels_super"].numpy()
    split = {name: np.isin(folds, f if isinstance(f, list) else [f])
             for name, f in probe_folds.items()}
    probe = train_linear_probe(x[split["train"]], y[split["train"]], x[split["val"]],
                               y[split["val"]], x[split["test"]], y[split["test"]], n_bootstrap=0)
    test = torch.from_numpy(folds == holdout)
    e, t = torch.cat(ecg_emb)[test].double(), torch.cat(text_emb)[test].double()
    n = int(test.sum())
    recall = recall_at_k((e @ t.T).numpy(), ks=(10,))["recall@10"]
    return {"probe": probe.macro_auroc, "probe_val": probe.best_val_auroc,
            "cosine": mean_pairwise_cosine(e.numpy()), "recall10_over_chance": recall / min(10 / n, 1)}


def train_and_score(cfg, args, data, folds, probe_folds, holdout) -> tuple[list[dict], list[dict]]:
    import numpy as np
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from melp_ray.model.losses import compute_losses
    from melp_ray.model import MELP
    from melp_ray.train.augment import augment

    t = cfg.train
    torch.manual_seed(t.seed)
    model = MELP(cfg.model).train()
    optimizer, schedule = optimizer_for(model, t, args.text_lr_scale)
    generator = torch.Generator().manual_seed(t.seed)
    # torch's EMA: a copy of the model whose weights (and buffers) follow the trained ones;
    # its first update copies the weights after step 1, later ones average with ``args.ema``.
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
           if args.ema > 0 else None)
    train_rows = torch.from_numpy(np.flatnonzero(folds != holdout))

    def evaluate(step: int) -> dict:
        scored = model if ema is None else ema.module   # the copy starts as the model
        out = {"step": step, **score(scored, data, folds, probe_folds, holdout)}
        C.log(" ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out

    # initial_lr: the group's learning rate before the warm-up scales it
    groups = [{"text_tower": g["text_tower"], "lr": g["initial_lr"], "weight_decay": g["weight_decay"],
               "tensors": len(g["params"])} for g in optimizer.param_groups]
    results, losses = [evaluate(0)], []
    order, pos = torch.randperm(len(train_rows), generator=generator), 0
    start = time.perf_counter()
    for step in range(1, t.max_steps + 1):
        if pos + t.global_batch_size > len(order):     # a new epoch: reshuffle
            order, pos = torch.randperm(len(train_rows), generator=generator), 0
        b = rows(data, train_rows[order[pos:pos + t.global_batch_size]])
        pos += t.global_batch_size
        out = model(augment(b["ecg"], cfg.data, generator),
                    b["input_ids"], b["attention_mask"], b["sentence_ids"])
        loss = compute_losses(out, rhythm=cfg.loss.rhythm, token=cfg.loss.token,
                              beat=cfg.loss.beat, attn_temp=cfg.model.beat_attention_temperature,
                              sim_temp=cfg.model.beat_similarity_temperature,
                              scale=cfg.model.beat_logit_scale,
                              same_report_positives=cfg.loss.same_report_positives)
        optimizer.zero_grad(set_to_none=True)
        loss["total"].backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update_parameters(model)
        losses.append(loss["rhythm"].item())
        if step % args.eval_every == 0 or step == t.max_steps:
            C.log(f"step {step}: rhythm loss {np.mean(losses[-args.eval_every:]):.3f}, "
                  f"{(time.perf_counter() - start) / step:.2f} s/step")
            results.append(evaluate(step) | {"rhythm_loss": float(np.mean(losses[-args.eval_every:]))})
    return results, groups


def main(argv=None) -> int:
    p = C.parser("learning_loop", __doc__.split("\n")[0])
    p.add_argument("--config", default="small", help="pretrain config (shipped name or file)")
    p.add_argument("--root", default=None, help="PTB-XL 100 Hz root (default: ../shared, else bundled)")
    p.add_argument("--text-lr-scale", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated weights; 0: off")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 runs share 2 cores)")
    p.add_argument("overrides", nargs="*", help="pretrain config key=value (model.*, loss.*, train.*, data.*)")
    args = p.parse_args(argv)

    import torch

    from melp_ray.config import PretrainConfig, load_config

    smoke = args.smoke
    overrides = list(args.overrides)
    if smoke:
        args.config, args.eval_every = "tiny", 2
        overrides = ["train.max_steps=4", "train.global_batch_size=8", *overrides]
    cfg = load_config(PretrainConfig, args.config, overrides)   # a bad key fails here, first
    torch.set_num_threads(args.threads)
    root = args.root or C.data_root_100hz(smoke)
    holdout = learning.SMOKE_HOLDOUT_FOLD if smoke else learning.HOLDOUT_FOLD
    info = C.machine()
    C.log(f"config {args.config} {' '.join(overrides)}; root {root}; fold {holdout} held out")
    data, folds = load_batches(cfg, root)
    probe_folds = learning.probe_folds(holdout, None, sorted(set(folds.tolist())), p)
    start = time.perf_counter()
    results, groups = train_and_score(cfg, args, data, folds, probe_folds, holdout)
    total = time.perf_counter() - start
    random_probe = results[0]["probe"]
    table = C.table(["step", "probe", "probe - random init", "probe (val fold)", "ECG cosine",
                     "recall@10 / chance"],
                    [[r["step"], r["probe"], r["probe"] - random_probe, r["probe_val"],
                      r["cosine"], r["recall10_over_chance"]] for r in results])
    text = (table + f"\n{args.config} {' '.join(overrides)}, text lr x{args.text_lr_scale}, "
            f"ema {args.ema}; {int((folds != holdout).sum())} training records, "
            f"{int((folds == holdout).sum())} held out (fold {holdout}); {total:.0f} s")
    C.finish("learning_loop", args, {
        "machine": info, "config": args.config, "overrides": overrides, "root": root,
        "text_lr_scale": args.text_lr_scale, "ema": args.ema, "threads": args.threads,
        "holdout_fold": holdout, "probe_folds": probe_folds, "param_groups": groups,
        "lr": cfg.train.lr, "results": results,
        "total_seconds": total}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
