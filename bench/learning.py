"""Does pretraining learn? The shipped CPU config, judged on a PTB-XL fold it never saw.

    python bench/learning.py                        # shipped CPU config (small), 1,490 PTB-XL records
    python bench/learning.py train.max_steps=200    # key=value overrides of the pretrain config
    python bench/learning.py --smoke                # tiny config, bundled sample, 4 steps (CI)

``--smoke``: its training worker and evaluation model run in this process (tested apart).

1. pretrain: a real ``melp_ray.pretrain`` run (Ray Train + DeepSpeed) with the config
   ``--config`` on ``--root``, with ``data.exclude_folds=[HOLDOUT]``: no record of the
   held-out fold reaches training or validation (the run's summary counts them);
2. evaluate the final checkpoint on the held-out fold with ``melp_ray.eval_plan.modes.evaluate``
   (the code behind ``python -m melp_ray.evaluate``, called in-process):
   - linear probe on the PTB-XL superclasses, for the pretrained encoder and for the same
     architecture at random init (``--random-init``): trained on the other folds, early
     stopped on ``--probe-val-fold`` (default HOLDOUT - 1), macro AUROC on HOLDOUT;
   - zero-shot superclass macro AUROC (descriptive class prompts);
   - ECG -> report retrieval recall@1/5/10, with chance k/N;
   - collapse detector: mean pairwise cosine of the L2-normalised rhythm embeddings of
     different records of HOLDOUT, pretrained and random init.
   Each record is embedded once per model (``EmbeddingTable``: one Ray Data pass each).

Targets: probe AUROC >= random init + 0.05, zero-shot AUROC >= 0.65, ECG->report
recall@10 >= 3x chance, mean pairwise ECG cosine <= 0.5. In --smoke they are reported, not
required (a few steps on 259 records). Wall time of every phase goes into the JSON.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from pathlib import Path

import _common as C

# The shipped CPU config the benchmark judges (a name in melp_ray/configs or a YAML path).
DEFAULT_CONFIG = "small"
SMOKE_CONFIG = "tiny"    # --smoke only checks the code path: the cheapest config will do
DEFAULT_ROOT = C.SHARED_DATA / "ptb-xl-100hz"   # ../shared/data/ptb-xl-100hz from the repo
HOLDOUT_FOLD = 8
SMOKE_HOLDOUT_FOLD = 6   # the bundled sample has folds 1-6
TARGETS = {"probe_gain_over_random": 0.05, "zeroshot_auroc": 0.65,
           "recall10_over_chance": 3.0, "mean_pairwise_cosine": 0.5}
KS = (1, 5, 10)
# The benchmark owns these pretrain keys (the data it learns from, where the run lives).
OWNED_KEYS = ("data.root", "data.exclude_folds", "run.storage_path", "run.name")
SMOKE_OVERRIDES = ["train.num_workers=1", "train.max_steps=4", "train.log_every=2", "train.val_every=0",
                   "train.checkpoint_every=4", "train.val_batches=1", "train.warmup_steps=1"]


@contextlib.contextmanager
def phase(seconds: dict[str, float], name: str):
    C.log(f"{name} ...")    # its wall time goes into seconds[name]
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    C.log(f"{name}: {seconds[name]:.1f} s")


def pretrain(config: str, overrides: list[str], in_process: bool = False) -> dict:
    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.pretraining.run import run

    cfg = load_config(PretrainConfig, config, overrides)
    summary = run(cfg, in_process=in_process)
    windows = C.run_windows(summary)
    keep = ("step", "loss/rhythm", "loss/token", "loss/beat", "loss/total", "samples_per_s",
            "input_wait_frac", "val/loss_rhythm", "val/recall_at_10", "val/zeroshot_auroc",
            "logit_scale")
    return {"config": config, "overrides": overrides, "steps": summary["steps"],
            "global_batch_size": summary["global_batch_size"],
            "wall_seconds": summary["wall_seconds"], "data": summary.get("data"),
            "losses": summary["losses"], "validation": summary["validation"],
            "windows": [{k: w[k] for k in keep if k in w} for w in windows],
            "checkpoint": summary["last_checkpoint"]}


def check_held_out(checkpoint: str, holdout: int, parser) -> None:
    from melp_ray.hub.checkpoint import checkpoint_config

    excluded = checkpoint_config(checkpoint).get("data", {}).get("exclude_folds") or []
    if holdout not in excluded:
        parser.error(f"--checkpoint {checkpoint} was pretrained with data.exclude_folds="
                     f"{excluded}: fold {holdout} was not held out")


def given_checkpoint(checkpoint: str) -> dict:
    """What the JSON records about a checkpoint trained elsewhere (--checkpoint)."""
    from melp_ray.hub.checkpoint import TRAINER_STATE, checkpoint_config, resolve_checkpoint

    from melp_ray.utils import storage

    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path)
    return {"config": "--checkpoint (trained elsewhere)", "overrides": [],
            "steps": storage.read_json(storage.join(path, TRAINER_STATE))["step"],
            "global_batch_size": cfg["train"]["global_batch_size"],
            "wall_seconds": None, "data": {"held_out": {"folds": cfg["data"]["exclude_folds"]}},
            "losses": {}, "validation": {}, "windows": [],
            "checkpoint": str(path)}


def evaluate_args(checkpoint: str, root: str, out: Path, mode: str, test_fold: int,
                  *extra: str):
    from melp_ray.evaluate import make_parser

    return make_parser().parse_args([
        "--checkpoint", checkpoint, "--dataset", "ptb-xl", "--root", root, "--mode", mode,
        "--out", str(out), "--test-folds", str(test_fold), *extra])


def linear_args(checkpoint, root, out, folds: dict, random_init: bool, bootstrap: int):
    return evaluate_args(checkpoint, root, out, "linear", folds["test"], "--task", "super",
                         "--train-folds", ",".join(map(str, folds["train"])),
                         "--val-folds", str(folds["val"]), "--bootstrap", str(bootstrap),
                         *(["--random-init"] if random_init else []))


def embedding_table(checkpoint, root, out, folds: dict, random_init: bool, actors: int | None):
    """One inference pass over every record the evaluations below use (the probe's folds and
    all of the held-out fold), with every column they ask for."""
    from melp_ray.eval.embeddings import EmbeddingTable, build_model
    from melp_ray.eval_plan.plan import build_plan

    args = linear_args(checkpoint, root, out / "probe", folds, random_init, 0)
    probe_plan = build_plan(args)
    retrieval_plan = build_plan(evaluate_args(checkpoint, root, out / "retrieval", "retrieval",
                                              folds["test"]))
    records = [r for plan in (probe_plan, retrieval_plan) for split in plan.splits.values()
               for r in split]
    outputs = {"ecg_feat": ("ecg_features", "ecg"), "ecg_emb": ("encode_ecg", "ecg")}
    if not random_init:
        outputs["text_emb"] = ("encode_reports", "report")
    model_fn = functools.partial(build_model, probe_plan.checkpoint, random_init, args.seed)
    return EmbeddingTable.compute(probe_plan, records, outputs, model_fn, args.batch_size, actors)


def linear_probe(checkpoint, root, out, folds: dict, random_init: bool, bootstrap: int,
                 table) -> dict:
    from melp_ray.eval_plan.modes import evaluate

    r = evaluate(linear_args(checkpoint, root, out, folds, random_init, bootstrap), embed=table)
    return {k: r[k] for k in ("macro_auroc", "ci", "per_class", "best_val_auroc", "n_train")
            if k in r} | {"records": used(r)}


def paired_probe_gain(out: Path, out_random: Path, bootstrap: int) -> dict:
    """The probe's gain over random init with a paired bootstrap CI: both probes score the
    same held-out records, so each replicate resamples them once for both (scores.npz)."""
    import numpy as np

    from melp_ray.eval.metrics import paired_bootstrap_gain
    from melp_ray.eval_plan.report import SCORES_NPZ

    mine, rand = np.load(out / SCORES_NPZ), np.load(out_random / SCORES_NPZ)
    if not np.array_equal(mine["y_true"], rand["y_true"]):
        raise RuntimeError("the two probes scored different records; no paired comparison")
    return paired_bootstrap_gain(mine["y_true"], mine["scores"], rand["scores"],
                                 n=max(bootstrap, 1), seed=0)


def zero_shot(checkpoint, root, out, test_fold: int, bootstrap: int, table) -> dict:
    from melp_ray.eval_plan.modes import evaluate

    r = evaluate(evaluate_args(checkpoint, root, out, "zeroshot", test_fold, "--task", "super",
                               "--bootstrap", str(bootstrap)), embed=table)
    return {"macro_auroc": r["macro_auroc"], "ci": r["ci"], "per_class": r["per_class"],
            "prompts": r.get("prompts"), "records": used(r)}


def retrieval(checkpoint, root, out, test_fold: int, table) -> dict:
    """Recall@k (both directions and their mean), chance k/N, and the duplicate reports."""
    from melp_ray.eval_plan.modes import evaluate
    from melp_ray.eval_plan.plan import build_plan

    r = evaluate(evaluate_args(checkpoint, root, out, "retrieval", test_fold), embed=table)
    n = int(r["n_pairs"])
    # build_plan fills defaults into the args it checks: a fresh set for this second look.
    plan = build_plan(evaluate_args(checkpoint, root, out, "retrieval", test_fold))
    rejected = {rid for ids in r["records"]["test"]["rejected"].values() for rid in ids}
    reports = [rec.report for rec in plan.splits["test"] if rec.record_id not in rejected]
    counts: dict[str, int] = {}
    for text in reports:
        counts[text] = counts.get(text, 0) + 1
    return {"recall": {k: v for k, v in r.items() if "recall@" in k}, "n_pairs": n,
            "chance": {f"recall@{k}": min(k / n, 1.0) for k in KS},
            "chance_with_ties": chance_with_ties(reports),
            "distinct_reports": len(counts),
            "records_sharing_a_report": sum(c for c in counts.values() if c > 1),
            "ties": "identical reports score identically and a tie counts against the query "
                    "(melp_ray.eval.metrics.recall_at_k): a random scorer gets "
                    "chance_with_ties <= k/N, and even a perfect one stays below 1"}


def chance_with_ties(reports: list[str], draws: int = 200, seed: int = 0) -> dict[str, float]:
    """ECG->report recall@k of random embeddings, scored exactly as the benchmark scores.

    With shared reports the tie rule puts the true report behind its copies, so chance is
    below k/N; this measures it (mean over ``draws`` random embedding sets).
    """
    import numpy as np

    from melp_ray.eval.metrics import recall_at_k
    from melp_ray.eval_plan.modes import report_similarity

    rng = np.random.default_rng(seed)
    n = len(reports)
    totals = dict.fromkeys(KS, 0.0)
    for _ in range(draws):
        sim = report_similarity(rng.normal(size=(n, 16)), reports, rng.normal(size=(n, 16)))
        r = recall_at_k(sim, ks=KS)
        for k in KS:
            totals[k] += r[f"ecg_to_report/recall@{k}"] / draws
    return {f"recall@{k}": v for k, v in totals.items()}


def ecg_cosine(checkpoint, root, out, test_fold: int, table) -> dict:
    """Mean pairwise cosine of the rhythm embeddings of the held-out records."""
    from melp_ray.eval.embeddings import drop_rejected
    from melp_ray.eval.metrics import mean_pairwise_cosine
    from melp_ray.eval_plan.plan import build_plan

    plan = build_plan(evaluate_args(checkpoint, root, out, "retrieval", test_fold))
    data = drop_rejected(table(plan.splits["test"], {"ecg_emb": ("encode_ecg", "ecg")}), {})
    return {"mean_pairwise_cosine": mean_pairwise_cosine(data["ecg_emb"]),
            "n_records": int(len(data["ecg_emb"]))}


def used(results: dict) -> dict:
    return {split: v["used"] for split, v in results.get("records", {}).items()
            if isinstance(v, dict) and "used" in v}


def probe_folds(holdout: int, val: int | None, available: list[int], parser) -> dict:
    """The linear probe's folds: train on all but ``val`` and ``holdout``, test on holdout."""
    val = holdout - 1 if val is None else val
    train = [f for f in available if f not in (holdout, val)]
    if val not in available or holdout not in available or not train:
        parser.error(f"the root has folds {available}: it needs the held-out fold {holdout}, "
                     f"the probe's validation fold {val} and at least one more")
    return {"train": train, "val": val, "test": holdout}


def main(argv=None) -> int:
    p = C.parser("learning", __doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help=f"pretrain config: a shipped name (melp_ray/configs) or a YAML file "
                        f"(default {DEFAULT_CONFIG}; --smoke: {SMOKE_CONFIG})")
    p.add_argument("--root", default=None,
                   help=f"PTB-XL root with strat_folds 1-{HOLDOUT_FOLD} (default {DEFAULT_ROOT}; "
                        "--smoke: the bundled sample)")
    p.add_argument("--holdout-fold", type=int, default=None,
                   help=f"fold kept out of pretraining and scored (default {HOLDOUT_FOLD}; "
                        f"--smoke: {SMOKE_HOLDOUT_FOLD})")
    p.add_argument("--probe-val-fold", type=int, default=None,
                   help="linear probe early-stopping fold (default: holdout - 1); the probe "
                        "trains on every other fold")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="bootstrap replicates of the AUROC CIs (default 1000; --smoke 50)")
    p.add_argument("--run-dir", default=None,
                   help="folder for the pretraining run and the evaluation outputs (kept); "
                        "default: a temporary folder removed at the end")
    p.add_argument("--checkpoint", default=None,
                   help="skip pretraining and evaluate this checkpoint or run folder (its "
                        "saved config must hold the held-out fold in data.exclude_folds)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the pretrain config, "
                                                "e.g. train.max_steps=200")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.config = args.config or (SMOKE_CONFIG if smoke else DEFAULT_CONFIG)
    for item in args.overrides:
        if item.split("=", 1)[0].strip() in OWNED_KEYS:
            p.error(f"{item!r}: the benchmark sets {', '.join(OWNED_KEYS)} itself "
                    "(use --root / --holdout-fold)")
    root = Path(args.root) if args.root else (None if smoke else DEFAULT_ROOT)
    if root is None:
        from melp_ray.data.sources import bundled_root

        root = Path(bundled_root())
    if not (root / "ptbxl_database.csv").is_file():
        p.error(f"--root {root}: no PTB-XL root there (ptbxl_database.csv missing). Pass "
                f"--root PATH to a PTB-XL folder with strat_folds 1-{HOLDOUT_FOLD} "
                "(../shared/data/ptb-xl-100hz on the development machines), or run --smoke")
    root = str(root.resolve())
    holdout = args.holdout_fold or (SMOKE_HOLDOUT_FOLD if smoke else HOLDOUT_FOLD)
    bootstrap = args.bootstrap if args.bootstrap is not None else (50 if smoke else 1000)

    from melp_ray.data.ptbxl import list_ptbxl

    available = sorted({r.strat_fold for r in list_ptbxl(root, sample_rate=100)})
    folds = probe_folds(holdout, args.probe_val_fold, available, p)
    info = C.machine()
    if args.checkpoint:
        check_held_out(args.checkpoint, holdout, p)
    tmp = None if args.run_dir else tempfile.TemporaryDirectory(prefix="melp-bench-learning-")
    work = Path(args.run_dir).resolve() if args.run_dir else Path(tmp.name)
    overrides = [*(SMOKE_OVERRIDES if smoke else []), *args.overrides,
                 f"data.root={root}", f"data.exclude_folds=[{holdout}]",
                 f"run.storage_path={work / 'runs'}", f"run.name=learning-{int(time.time())}"]
    phases: dict[str, float] = {}
    start = time.perf_counter()
    C.log(f"starting Ray ({args.num_cpus} CPUs); config {args.config}, root {root}, "
          f"fold {holdout} held out")
    ray = C.start_ray(args.num_cpus)
    if smoke:
        C.smoke_data_limit()
    try:
        if args.checkpoint:
            pre = given_checkpoint(args.checkpoint)
        else:
            with phase(phases, "pretrain"):
                pre = pretrain(args.config, overrides, in_process=smoke)
        ckpt = pre["checkpoint"]
        actors = 0 if smoke else None   # None: evaluate's default pool
        ev = work / "eval"
        with phase(phases, "embed_pretrained"):
            table = embedding_table(ckpt, root, ev / "embed", folds, False, actors)
        with phase(phases, "embed_random_init"):
            table_random = embedding_table(ckpt, root, ev / "embed-random", folds, True, actors)
        with phase(phases, "linear_probe_pretrained"):
            probe = linear_probe(ckpt, root, ev / "linear", folds, False, bootstrap, table)
        with phase(phases, "linear_probe_random_init"):
            probe_random = linear_probe(ckpt, root, ev / "linear-random", folds, True, bootstrap,
                                        table_random)
            paired = paired_probe_gain(ev / "linear", ev / "linear-random", bootstrap)
        with phase(phases, "zeroshot"):
            zs = zero_shot(ckpt, root, ev / "zeroshot", holdout, bootstrap, table)
        with phase(phases, "retrieval"):
            ret = retrieval(ckpt, root, ev / "retrieval", holdout, table)
        with phase(phases, "ecg_cosine"):
            cos = ecg_cosine(ckpt, root, ev / "cosine", holdout, table)
            cos_random = ecg_cosine(ckpt, root, ev / "cosine", holdout, table_random)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - start

    gain = probe["macro_auroc"] - probe_random["macro_auroc"]
    r10 = ret["recall"]["ecg_to_report/recall@10"]
    chance10 = ret["chance"]["recall@10"]
    verdicts = {
        "probe_gain_over_random": C.check(gain, TARGETS["probe_gain_over_random"]),
        "zeroshot_auroc": C.check(zs["macro_auroc"], TARGETS["zeroshot_auroc"]),
        "recall10_over_chance": C.check(r10 / chance10, TARGETS["recall10_over_chance"]),
        "mean_pairwise_cosine": C.check(cos["mean_pairwise_cosine"],
                                        TARGETS["mean_pairwise_cosine"], higher_is_better=False),
    }
    result = {
        "machine": info, "config": args.config, "root": root, "holdout_fold": holdout,
        "probe_folds": folds, "bootstrap": bootstrap, "pretrain": pre,
        "linear_probe": {"pretrained": probe, "random_init": probe_random,
                         "gain_over_random": gain, "gain_paired_bootstrap": paired},
        "zeroshot": zs, "retrieval": ret,
        "ecg_cosine": {"pretrained": cos, "random_init": cos_random},
        "ratios": {"recall10_over_chance": r10 / chance10},
        "targets": TARGETS, "verdicts": verdicts,
        "phase_seconds": phases, "total_seconds": total,
    }
    n = ret["n_pairs"]
    rows = [
        ["linear probe macro AUROC (superclass)", probe["macro_auroc"],
         probe_random["macro_auroc"], f">= random + {TARGETS['probe_gain_over_random']}",
         verdicts["probe_gain_over_random"]],
        ["zero-shot macro AUROC (superclass)", zs["macro_auroc"], "", ">= 0.65",
         verdicts["zeroshot_auroc"]],
        *[[f"ECG->report recall@{k} (chance k/N {ret['chance'][f'recall@{k}']:.3f}, "
           f"with ties {ret['chance_with_ties'][f'recall@{k}']:.3f})",
           ret["recall"][f"ecg_to_report/recall@{k}"], "",
           f">= {TARGETS['recall10_over_chance']:g}x chance = "
           f"{TARGETS['recall10_over_chance'] * chance10:.3f}" if k == 10 else "",
           verdicts["recall10_over_chance"] if k == 10 else ""] for k in KS],
        ["mean pairwise cosine of ECG embeddings", cos["mean_pairwise_cosine"],
         cos_random["mean_pairwise_cosine"], "<= 0.5", verdicts["mean_pairwise_cosine"]],
    ]
    text = C.table(["metric (held-out fold " + str(holdout) + ")", "pretrained", "random init",
                    "target", "verdict"], rows)
    data = pre["data"] or {}
    held = data.get("held_out", {})
    text += (f"\nprobe gain over random init {paired['gain']:+.3f}, paired bootstrap 95% CI "
             f"{paired['ci'][0]:+.3f} to {paired['ci'][1]:+.3f}, gain <= 0 in "
             f"{paired['p_not_better']:.1%} of {bootstrap} replicates")
    text += (f"\npretrain: {args.config}, {pre['steps']} steps x {pre['global_batch_size']}, "
             f"{data.get('train_records')} train / {data.get('val_records')} val records, "
             f"{held.get('records')} records of folds {held.get('folds')} held out; final "
             + ", ".join(f"{k} {v:.3f}" for k, v in pre["losses"].items())
             + f"\nretrieval: {n} pairs, {ret['distinct_reports']} distinct reports "
               f"({ret['records_sharing_a_report']} records share theirs; ties count against "
               "the query)"
             + "\nwall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
             + f"; total {total:.0f}")
    if smoke:
        text += "\n(smoke: a few steps on the bundled sample; the verdicts mean nothing)"
    C.finish("learning", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
