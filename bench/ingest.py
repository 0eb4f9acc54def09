"""Can the data side feed training? Ray Data ingest vs training consumption vs the reference path.

    python bench/ingest.py            # ~1490 PTB-XL records at 100 Hz when ../shared has them
    python bench/ingest.py --smoke    # bundled sample, a few seconds of each part

Measured, side by side in one run (the machine is shared, so ratios are what count):
- ingest: rows/s one consumer receives from ``iter_torch_batches`` of our pipelines, from
  Parquet shards made by ``melp_ray.prepare`` (the training path: one rank's row slices,
  ``rank_datasets``) and straight from WFDB files;
- reference: rows/s of the reference MELP data path, a torch ``DataLoader`` whose Dataset
  reads each record with ``wfdb.rdsamp`` and min-max normalises it, with as many loader
  workers as the Ray instance has CPUs (``--smoke``: one); it does not tokenise (ours
  does, so this is conservative for us); its workers are spawned (never forked from this Ray-running
  process) once and kept across passes;
- consumption: rows/s of all training workers of the default run together (the tiny
  model's forward + backward + AdamW step at the same micro-batch, 1 thread per worker
  as in a Ray Train worker, times the worker count);
- input wait: the fraction of step time spent waiting for batches in a short real
  ``melp_ray.pretrain`` run from the shards (mean of its log windows after the first),
  with 16-step epochs so that several windows cross an epoch boundary.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C

TARGETS = {"ingest_over_consumption": 5.0, "input_wait_frac": 0.02, "shards_over_reference": 2.0}


# ---------------------------------------------------------------- reference path

class ReferenceDataset:
    """The reference MELP Dataset: wfdb.rdsamp each record, min-max scale it."""

    def __init__(self, paths, reports):
        self.paths, self.reports = paths, reports

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import numpy as np
        import torch
        import wfdb

        signal, _ = wfdb.rdsamp(self.paths[i])
        ecg = signal.T.astype(np.float32)
        ecg = (ecg - ecg.min()) / max(float(ecg.max() - ecg.min()), 1e-6)
        return {"ecg": torch.from_numpy(ecg), "report": self.reports[i]}


def reference_loader(refs, root, batch: int, workers: int):
    """The reference DataLoader, its workers started by **spawn** and kept between passes.

    Not fork: this process runs Ray (gRPC, Ray's own threads, thread pools), and a worker
    forked from it can inherit a lock some other thread held and hang forever (seen in CI:
    one worker stuck in ``wfdb.rdsamp`` -> pandas, the driver waiting on it for good). A
    spawned worker starts a fresh interpreter, which costs seconds of imports: the workers
    are persistent, started by the first (untimed, outside --smoke) pass and reused by the
    timed ones, so those measure reading, not Python start-up (as fork's cheap start did).
    """
    from torch.utils.data import DataLoader

    from melp_ray.data.records import resolve_path

    dataset = ReferenceDataset([resolve_path(r, root) for r in refs], [r.report for r in refs])
    return DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True,
                      multiprocessing_context=C.MP_CONTEXT if workers else None,
                      persistent_workers=workers > 0)


def close_loader(loader) -> None:
    """Stop a persistent DataLoader's workers now (not whenever the garbage collector runs)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


# ---------------------------------------------------------------- our pipelines

def timed_pass(batches) -> dict:
    """Rows/s of one full pass, counted from the moment the pass is asked for; also split
    into the time to the first batch (per-epoch start-up) and the streaming rate after it."""
    start, rows, first, first_rows = time.perf_counter(), 0, None, 0
    for batch in batches:
        rows += len(batch["ecg"])
        if first is None:
            first, first_rows = time.perf_counter() - start, rows
    seconds = time.perf_counter() - start
    streaming = (rows - first_rows) / max(seconds - first, 1e-9) if first is not None else 0.0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "first_batch_s": first, "streaming_rows_per_s": streaming}


def ray_rate(dataset, batch: int) -> dict:
    return timed_pass(dataset.iter_torch_batches(batch_size=batch, drop_last=True))


# ---------------------------------------------------------------- consumption

def consumption_rate(cfg, batches, warmup: int, steps: int) -> dict:
    """Steady-state rows/s of one training worker (pure compute, no data wait)."""
    import torch

    from melp_ray.model.losses import MELPLoss
    from melp_ray.model import MELP
    from melp_ray.train.augment import augment
    from melp_ray.train.optim import param_groups

    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # Ray Train workers run with OMP_NUM_THREADS=1
    try:
        torch.manual_seed(0)
        model = MELP(cfg.model).train()
        loss_fn = MELPLoss.from_model_config(cfg.model)
        opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
        gen = torch.Generator().manual_seed(0)
        times = []
        for i in range(warmup + steps):
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            out = model(augment(b["ecg"], cfg.data, gen), b["input_ids"],
                        b["attention_mask"], b["sentence_ids"])
            loss_fn(out)["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    step = sum(times[warmup:]) / steps
    return {"step_s": step, "rows_per_s_per_worker": len(batches[0]["ecg"]) / step}


# ---------------------------------------------------------------- input wait

def pretrain_input_wait(shards_root: str, storage: str, steps: int, smoke: bool) -> dict:
    """Input wait of a real run whose epochs are short (2 shard files, one per worker, of
    128 rows: 16 steps an epoch), so its log windows cross epoch boundaries, where each
    rank's Ray Data pipeline starts again. ``--smoke`` checks the code path: one worker in
    this process (``pretrain.run(in_process=True)``), not Ray Train's start-up."""
    from melp_ray.pretraining import run as pretrain
    from melp_ray.config import PretrainConfig, load_config

    log_every = 2 if smoke else 5
    cfg = load_config(PretrainConfig, "tiny", [
        # data.limit on shards keeps one file per worker (smoke shards are too small for that)
        f"data.root={shards_root}", *([] if smoke else ["data.limit=2"]), f"train.max_steps={steps}",
        f"train.log_every={log_every}", "train.val_every=0", f"train.checkpoint_every={steps}",
        "train.val_batches=1", f"run.storage_path={storage}", f"run.name=ingest-{int(time.time())}",
        *(["train.num_workers=1"] if smoke else [])])
    summary = pretrain.run(cfg, in_process=smoke)
    windows = C.run_windows(summary)
    steady = C.steady(windows)
    crossing = [w for prev, w in zip(windows, windows[1:]) if w["epoch"] > prev["epoch"]]
    return {
        "steps": summary["steps"], "workers": cfg.train.num_workers,
        "micro_batch": cfg.train.micro_batch_size, "epochs_started": windows[-1]["epoch"] + 1,
        "summary_input_wait_frac": summary["input_wait_frac"],
        "summary_samples_per_s": summary["samples_per_s"],
        "windows": [{k: w[k] for k in ("step", "epoch", "samples_per_s", "input_wait_frac")}
                    for w in windows],
        "steady_input_wait_frac": C.mean_of(steady, "input_wait_frac"),
        "epoch_boundary_input_wait_frac": C.mean_of(crossing, "input_wait_frac"),
        "epoch_boundary_windows": len(crossing),
        "steady_samples_per_s": C.mean_of(steady, "samples_per_s"),
        "first_window_input_wait_frac": windows[0]["input_wait_frac"],
    }


# ---------------------------------------------------------------- driver

def main(argv=None) -> int:
    p = C.parser("ingest", __doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="raw 100 Hz PTB-XL root (default: largest available)")
    p.add_argument("--rounds", type=int, default=2, help="passes of each path, interleaved")
    p.add_argument("--pretrain-steps", type=int, default=40,
                   help="steps of the input-wait run (16 steps an epoch)")
    args = p.parse_args(argv)
    smoke = args.smoke
    rounds = 1 if smoke else args.rounds
    root = args.root or C.data_root_100hz(smoke)
    limit = 64 if smoke else None
    info = C.machine()

    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.data.rows import shard_files, split_refs
    from melp_ray.train.stream import StreamSpec, rank_datasets, wfdb_dataset
    from melp_ray.data.prepare import PrepareSettings, prepare

    cfg = load_config(PretrainConfig, "tiny", [])   # the default run: its batch, model, rate
    batch = cfg.train.micro_batch_size
    spec = StreamSpec(sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                      text_model=cfg.model.text_model, max_text_length=cfg.model.max_text_length)
    C.log(f"starting Ray ({args.num_cpus} CPUs); data root {root}")
    ray = C.start_ray(args.num_cpus)
    cpus = C.ray_cpus()   # --num-cpus, or the cluster's at $RAY_ADDRESS
    if smoke:
        C.smoke_data_limit()
    C.log("preparing shards")
    tmp = tempfile.TemporaryDirectory(prefix="melp-bench-ingest-")
    shards_root = str(Path(tmp.name) / "shards")
    prepare(PrepareSettings(dataset="ptb-xl", root=root, out=shards_root,
                            sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                            shard_size=4 if smoke else 128, limit=limit))
    files = shard_files(shards_root, "train")

    def shard_rank():   # the training path: one rank's row slices of the shard files
        return rank_datasets(shards_root, "train", 1, spec)[0]

    refs = split_refs("ptb-xl", root, "train", cfg.data.val_fraction, cfg.train.seed, limit,
                      cfg.data.sample_rate)

    C.log("measuring ingest: shards, WFDB, reference")
    # --smoke: one loader worker checks the spawned path (each costs ~4 CPU-s of imports).
    reference = reference_loader(refs, root, batch, 1 if smoke else cpus)
    paths = {"shards": lambda: ray_rate(shard_rank(), batch),   # the training path, one rank
             "wfdb": lambda: ray_rate(wfdb_dataset(refs, root, spec), batch),
             "reference": lambda: timed_pass(iter(reference))}
    # One untimed pass each first: Ray's first use spawns and imports its worker processes,
    # a once-per-cluster cost that no training epoch pays again.
    cold = {} if smoke else {name: run() for name, run in paths.items()}
    runs = {name: [] for name in paths}
    for i in range(rounds):   # interleaved, so a burst of outside load hits every path alike
        for name, run in paths.items():
            C.log(f"round {i + 1}/{rounds}: {name}")
            runs[name].append(run())
    rate = {k: sum(r["rows"] for r in v) / sum(r["seconds"] for r in v) for k, v in runs.items()}
    streaming = {k: sum(r["streaming_rows_per_s"] for r in v) / len(v) for k, v in runs.items()}
    first_batch = {k: sum(r["first_batch_s"] or 0.0 for r in v) / len(v) for k, v in runs.items()}
    close_loader(reference)

    C.log("measuring consumption")
    sample = list(shard_rank().iter_torch_batches(batch_size=batch, drop_last=True))[:4]
    consume = consumption_rate(cfg, sample, warmup=1 if smoke else 3, steps=2 if smoke else 10)
    consume["workers"] = cfg.train.num_workers
    consume["rows_per_s_all_workers"] = consume["rows_per_s_per_worker"] * cfg.train.num_workers
    C.log("short pretrain for the input wait")
    wait = pretrain_input_wait(shards_root, str(Path(tmp.name) / "runs"),
                               4 if smoke else args.pretrain_steps, smoke)
    ray.shutdown()
    tmp.cleanup()

    ratios = {
        "ingest_over_consumption": rate["shards"] / consume["rows_per_s_all_workers"],
        "wfdb_ingest_over_consumption": rate["wfdb"] / consume["rows_per_s_all_workers"],
        "shards_over_reference": rate["shards"] / rate["reference"],
        "wfdb_over_reference": rate["wfdb"] / rate["reference"],
    }
    verdicts = {
        "ingest_over_consumption": C.check(ratios["ingest_over_consumption"], 5.0),
        "input_wait_frac": C.check(wait["steady_input_wait_frac"], 0.02, higher_is_better=False),
        "shards_over_reference": C.check(ratios["shards_over_reference"], 2.0),
    }
    result = {
        "machine": info, "data_root": root, "records_train": len(refs), "shard_files": len(files),
        "micro_batch": batch, "sample_rate": cfg.data.sample_rate, "ray_cpus": cpus,
        "torch_threads_consumer": 1, "rows_per_s": rate, "streaming_rows_per_s": streaming,
        "first_batch_s": first_batch, "passes": runs, "cold_passes": cold,
        "consumption": consume, "pretrain": wait, "ratios": ratios,
        "targets": TARGETS, "verdicts": verdicts,
    }
    text = C.table(["measure", "value", "target", "verdict"], [
        ["ingest, Parquet shards (rows/s)", rate["shards"], "", ""],
        ["ingest, WFDB via Ray Data (rows/s)", rate["wfdb"], "", ""],
        ["reference DataLoader + wfdb.rdsamp (rows/s)", rate["reference"], "", ""],
        *[[f"  {k}: first batch after (s) / streaming after it (rows/s)",
           f"{first_batch[k]:.2f} / {streaming[k]:.0f}", "", ""] for k in runs],
        [f"consumption, {consume['workers']} workers x 1 thread (rows/s)",
         consume["rows_per_s_all_workers"], "", ""],
        ["shards ingest / consumption", ratios["ingest_over_consumption"], ">= 5", verdicts["ingest_over_consumption"]],
        ["WFDB ingest / consumption", ratios["wfdb_ingest_over_consumption"], "", ""],
        ["input wait, pretrain, all windows after the first", wait["steady_input_wait_frac"], "<= 0.02",
         verdicts["input_wait_frac"]],
        [f"  of which windows crossing an epoch boundary ({wait['epoch_boundary_windows']})",
         wait["epoch_boundary_input_wait_frac"], "", ""],
        ["input wait, first window", wait["first_window_input_wait_frac"], "", ""],
        ["shards / reference", ratios["shards_over_reference"], ">= 2", verdicts["shards_over_reference"]],
        ["WFDB / reference", ratios["wfdb_over_reference"], "", ""],
    ])
    C.finish("ingest", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
