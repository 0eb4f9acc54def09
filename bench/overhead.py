"""What does Ray Train + DeepSpeed cost per step? Our worker vs a bare PyTorch loop.

    python bench/overhead.py          # tiny model, 1 worker, ZeRO-1, 40 steps
    python bench/overhead.py --smoke

Both sides train the same model (``tiny``) at the same micro-batch on the same data, with
one thread each (a Ray Train worker runs with OMP_NUM_THREADS=1):
- ours: a real ``melp_ray.pretrain`` run (1 worker, ZeRO-``--zero-stage``, Parquet shards);
  its steady-state throughput is the mean ``samples_per_s`` of the log windows after the
  first (the first holds start-up; checkpoints and validation fall outside the windows);
- bare: a plain loop (forward, loss, backward, clip, AdamW, LR schedule) over batches taken
  from the same pipeline and held in memory, run before and after ours (noise control).
Target: ours / bare >= 0.95 (ratio of throughputs).

``--smoke`` checks the code path, not Ray's start-up: "ours" trains its one worker in this
process (``pretrain.run(in_process=True)``); Ray Train's own path has its end-to-end tests
in ``tests/test_pretrain.py``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C

TARGET = 0.95


def bare_loop(cfg, batches, warmup: int, steps: int, deepspeed: bool = False) -> dict:
    """The training step without Ray; ``deepspeed=True`` drives it through a DeepSpeed engine
    (one-process gloo group, the recipe's DeepSpeed config) to split the gap into its parts."""
    import torch

    from melp_ray.model.losses import MELPLoss
    from melp_ray.model import MELP
    from melp_ray.train.augment import augment
    from melp_ray.train.optim import lr_schedule, param_groups

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.train.seed)
        model = MELP(cfg.model).train()
        loss_fn = MELPLoss.from_model_config(cfg.model, rhythm=cfg.loss.rhythm,
                                             token=cfg.loss.token, beat=cfg.loss.beat)
        groups = param_groups(model, cfg.train.weight_decay, cfg.train.decay_all_parameters)
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
        sched = lr_schedule(opt, cfg.train)
        engine = start_engine(cfg, model, opt, sched) if deepspeed else None
        gen = torch.Generator().manual_seed(cfg.train.seed)
        parts = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        start = None
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
                parts = dict.fromkeys(parts, 0.0)
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            out = (engine or model)(augment(b["ecg"], cfg.data, gen),
                                    b["input_ids"], b["attention_mask"], b["sentence_ids"])
            losses = loss_fn(out)
            t1 = time.perf_counter()
            if engine is not None:
                engine.backward(losses["total"])
                t2 = time.perf_counter()
                engine.step()
            else:
                losses["total"].backward()
                t2 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            {k: float(v.detach()) for k, v in losses.items()}   # the recipe reads them back
            t3 = time.perf_counter()
            for key, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("step", t3 - t2)):
                parts[key] += dt
        seconds = time.perf_counter() - start
        if engine is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
    batch = len(batches[0]["ecg"])
    return {"steps": steps, "seconds": seconds, "step_s": seconds / steps,
            "samples_per_s": batch * steps / seconds,
            "parts_s_per_step": {k: v / steps for k, v in parts.items()}}


def start_engine(cfg, model, opt, sched):
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from melp_ray.train.deepspeed_config import deepspeed_config, skip_cpu_shared_memory_op
    from melp_ray.train.session import single_process_group

    single_process_group()   # a no-op after an in-process "ours" (--smoke) made one
    skip_cpu_shared_memory_op()   # as the recipe does on CPU: no op build, same engine
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                      config=deepspeed_config(cfg.train, cfg.deepspeed),
                                      dist_init_required=False)
    return engine


def ours(cfg, in_process: bool = False) -> dict:
    from melp_ray.pretraining import run as pretrain

    summary = pretrain.run(cfg, in_process=in_process)
    windows = C.run_windows(summary)
    steady = C.steady(windows)
    return {"windows": [{k: w[k] for k in ("step", "samples_per_s", "input_wait_frac")} for w in windows],
            "samples_per_s": C.mean_of(steady, "samples_per_s"),
            "input_wait_frac": C.mean_of(steady, "input_wait_frac"),
            "wall_seconds": summary["wall_seconds"], "steps": summary["steps"]}


def main(argv=None) -> int:
    p = C.parser("overhead", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each side")
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    args = p.parse_args(argv)
    smoke = args.smoke
    steps = 4 if smoke else args.steps
    log_every = 2 if smoke else 5
    info = C.machine()

    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.train.stream import StreamSpec, rank_datasets
    from melp_ray.data.prepare import PrepareSettings, prepare

    tmp = tempfile.TemporaryDirectory(prefix="melp-bench-overhead-")
    shards_root = str(Path(tmp.name) / "shards")
    # One worker at the default run's per-worker micro-batch (8).
    cfg = load_config(PretrainConfig, "tiny", [
        "train.num_workers=1", "train.global_batch_size=8",
        f"train.max_steps={steps}", f"train.log_every={log_every}", "train.val_every=0",
        f"train.checkpoint_every={steps}", "train.val_batches=1",
        f"deepspeed.zero_stage={args.zero_stage}",
        f"run.storage_path={Path(tmp.name) / 'runs'}", f"run.name=overhead-{int(time.time())}"])
    root = C.data_root_100hz(smoke)
    C.log(f"starting Ray ({args.num_cpus} CPUs), preparing shards from {root}")
    ray = C.start_ray(args.num_cpus)
    if smoke:
        C.smoke_data_limit()
    prepare(PrepareSettings(dataset="ptb-xl", root=root, out=shards_root, sample_rate=cfg.data.sample_rate,
                            seconds=cfg.data.seconds, shard_size=8 if smoke else 128,
                            limit=48 if smoke else 600))
    cfg.data.root = shards_root     # set after prepare: the config checks that it exists
    spec = StreamSpec(sample_rate=cfg.data.sample_rate, seconds=cfg.data.seconds,
                      text_model=cfg.model.text_model, max_text_length=cfg.model.max_text_length)
    batch = cfg.train.micro_batch_size
    batches = list(rank_datasets(shards_root, "train", 1, spec)[0]
                   .iter_torch_batches(batch_size=batch, drop_last=True))[:16]
    warmup = 1 if smoke else 5
    C.log("bare loop (before)")
    bare = [bare_loop(cfg, batches, warmup, steps)]
    C.log(f"ours: pretrain, 1 worker, ZeRO-{args.zero_stage}")
    mine = ours(cfg, in_process=smoke)
    C.log("bare loop (after)")
    bare.append(bare_loop(cfg, batches, warmup, steps))
    C.log("DeepSpeed engine without Ray")
    engine_only = bare_loop(cfg, batches, warmup, steps, deepspeed=True)
    ray.shutdown()
    tmp.cleanup()

    bare_sps = sum(b["samples_per_s"] for b in bare) / len(bare)
    ratio = mine["samples_per_s"] / bare_sps
    compute_only = mine["samples_per_s"] / max(1.0 - mine["input_wait_frac"], 1e-9)
    result = {
        "machine": info, "model": "tiny", "micro_batch": batch, "workers": 1,
        "zero_stage": args.zero_stage, "steps": steps, "torch_threads": 1,
        "bare": bare, "bare_samples_per_s": bare_sps, "ours": mine,
        "ours_samples_per_s": mine["samples_per_s"], "deepspeed_no_ray": engine_only,
        "ours_compute_only_samples_per_s": compute_only,
        "ratio": ratio, "ratio_compute_only": compute_only / bare_sps,
        "target": TARGET, "verdict": C.check(ratio, TARGET),
    }
    text = C.table(["measure", "samples/s", "vs bare", "target", "verdict"], [
        ["bare PyTorch loop (mean of before/after)", bare_sps, 1.0, "", ""],
        *[[f"  bare run {i + 1}", b["samples_per_s"], b["samples_per_s"] / bare_sps, "", ""]
          for i, b in enumerate(bare)],
        [f"DeepSpeed ZeRO-{args.zero_stage} engine, no Ray", engine_only["samples_per_s"],
         engine_only["samples_per_s"] / bare_sps, "", ""],
        [f"Ray Train + DeepSpeed ZeRO-{args.zero_stage}, steady windows", mine["samples_per_s"],
         ratio, ">= 0.95", result["verdict"]],
        ["  same, input wait removed", compute_only, compute_only / bare_sps, "", ""],
        ["  input wait fraction", mine["input_wait_frac"], "", "", ""],
    ])
    text += "\nseconds per step (forward+loss / backward / step+readback): " + "; ".join(
        f"{name} " + " / ".join(f"{v:.3f}" for v in run["parts_s_per_step"].values())
        for name, run in (("bare", bare[0]), ("DeepSpeed", engine_only)))
    C.finish("overhead", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
