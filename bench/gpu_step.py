"""The paper model's training step on one GPU, without Ray: samples/s, MFU and memory per
ZeRO stage in bf16 (the GPU side of the sizing rule in docs/cluster.md).

    python bench/gpu_step.py --text-folder DIR    # CUDA GPU; DIR: a BERT-style config + tokenizer
    python bench/gpu_step.py --smoke              # CPU: tiny preset, fp32, gloo, 3 steps

``bench/gpu_throughput.py`` measures the whole path (Ray Data -> Ray Train -> DeepSpeed).
This one measures the step alone, so it runs where Ray cannot be installed (the lent GPU
machine: Ray's wheel is larger than what may travel there) and says how many samples/s one
GPU can take at most. It runs the training recipe's own step: ``PretrainRecipe.micro_step``
(lead masking, the forward in bf16, the three losses in fp32, ``engine.backward`` and
``engine.step``), on the DeepSpeed engine ``DeepSpeedRecipe.build_engine`` builds (``param_groups``,
``lr_schedule``, ``deepspeed_config``; ``setup`` calls it in a Ray Train worker), in one process with a world of 1
(nccl on a GPU). The batch is one real worker-side batch (``finish_batch``: min-max
normalised ECGs, tokenised reports): bundled PTB-XL reports, ECGs drawn at random (the
waveform's values do not change the cost), kept on the GPU, so no input time is counted.
The text tower is built from ``--text-folder``'s config at random init
(``model.text_pretrained=false``): weights do not change the cost either.
"""
from __future__ import annotations

import gc
import os
import time

import _common as C
from gpu_throughput import peak_key


def paper_config(stage: int, batch: int, text_folder: str | None, smoke: bool):
    from melp_ray.config import PretrainConfig, load_config

    overrides = ["train.num_workers=1", f"train.global_batch_size={batch}",
                 f"deepspeed.zero_stage={stage}", "train.max_steps=1000", "train.warmup_steps=2"]
    if text_folder:
        overrides += [f"model.text_model={text_folder}", "model.text_pretrained=false"]
    if smoke:   # the tiny model with the paper's optimizer and schedule settings
        return load_config(PretrainConfig, "tiny", [*overrides, "train.use_gpu=false",
                                                    "train.decay_all_parameters=true",
                                                    "train.schedule=cosine_restarts",
                                                    "train.grad_clip=0"])
    return load_config(PretrainConfig, "paper", [*overrides, "data.sample_rate=500",
                                                  "train.use_gpu=true", "train.precision=bf16"])


def one_batch(cfg, device, reports: list[str] | None = None) -> dict:
    """A worker-side batch of global_batch_size rows (real reports, random ECGs), on device.
    ``reports``: the report strings (default: the bundled PTB-XL reports, cycled)."""
    import numpy as np
    import torch

    from melp_ray.data.ptbxl import read_database
    from melp_ray.data.sources import bundled_root
    from melp_ray.train.stream import finish_batch
    from melp_ray.train.stream import stream_spec

    spec = stream_spec(cfg)
    n = cfg.train.global_batch_size
    if reports is None:
        reports = [r for r in read_database(bundled_root())["report"] if str(r).strip()]
        reports = [reports[i % len(reports)] for i in range(n)]
    ecg = np.random.default_rng(0).normal(size=(n, 12, spec.n_samples)).astype(np.float32)
    batch = finish_batch(ecg, reports, [[] for _ in reports], spec)   # labels: unused here
    return {k: torch.as_tensor(v).to(device) for k, v in batch.items()}


def build_recipe(cfg, device):
    """A PretrainRecipe with its engine and loss built as in a Ray Train worker (no Ray)."""
    from melp_ray.pretraining.recipe import PretrainRecipe

    recipe = PretrainRecipe(cfg)
    recipe.rank, recipe.world, recipe.device = 0, 1, device
    recipe.build_engine()
    recipe.loss_fn = recipe.build_loss()
    return recipe


def measure_stage(stage: int, args, device) -> dict:
    import torch

    from melp_ray.model import flops as F
    from melp_ray.model.text_tower import text_columns

    cfg = paper_config(stage, args.batch, args.text_folder, args.smoke)
    recipe = build_recipe(cfg, device)
    batch = one_batch(cfg, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def steps(n: int) -> tuple[float, list[dict]]:
        losses = []
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            losses.append(recipe.micro_step(batch))
            recipe.state.micro_in_epoch += 1
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, losses

    steps(args.warmup)
    seconds, losses = steps(args.steps)
    samples_per_s = args.steps * args.batch / seconds
    # At the width the model runs this batch's text on (its longest report), not the padding.
    width = len(text_columns(batch["attention_mask"]))
    per_sample = F.training_flops(cfg.model, cfg.data.sample_rate * cfg.data.seconds,
                                  text_length=width)
    peak = peak_key(torch.cuda.get_device_name(0) if cuda else "")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in recipe.engine.module.parameters()})
    row = {"samples_per_s": samples_per_s, "step_seconds": seconds / args.steps,
           "train_flops_per_sample": per_sample, "text_width": width, "tflops": per_sample * samples_per_s / 1e12,
           "mfu": F.estimate_mfu(per_sample, samples_per_s, F.PEAK_FLOPS[peak]),
           "peak_key": peak, "param_dtypes": dtypes,
           "losses_first": losses[0], "losses_last": losses[-1],
           "params": sum(p.numel() for p in recipe.engine.module.parameters()),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    return row


def main(argv=None) -> int:
    import math

    p = C.parser("gpu_step", __doc__.splitlines()[0])
    p.add_argument("--text-folder", help="folder with a BERT-style config.json + tokenizer "
                                         "(default: the model config's own text model)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="micro-batch of the one GPU")
    args = p.parse_args(argv)
    import torch

    if args.smoke:
        args.steps, args.warmup, args.batch = 3, 1, 4
    elif not torch.cuda.is_available():
        p.exit(2, "gpu_step: no CUDA GPU here (use --smoke for the CPU code path)\n")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if not args.smoke else "cpu")
    device = torch.device("cuda", 0) if not args.smoke else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from melp_ray.train.session import single_process_group

    if device.type == "cuda":
        single_process_group("nccl")
    else:
        single_process_group()
    info = C.machine()
    stages = {}
    for stage in (int(s) for s in args.stages.split(",")):
        C.log(f"ZeRO-{stage}: {args.warmup} + {args.steps} steps at batch {args.batch}")
        stages[str(stage)] = measure_stage(stage, args, device)
        gc.collect()   # the stage's engine and optimizer states, before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        C.log(f"ZeRO-{stage}: {stages[str(stage)]['samples_per_s']:.1f} samples/s")
    finite = all(math.isfinite(v) for row in stages.values() for v in row["losses_last"].values())
    result = {"machine": info, "config": "tiny" if args.smoke else "paper", "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "text_folder": args.text_folder,
              "backend": "nccl" if device.type == "cuda" else "gloo", "losses_finite": finite,
              "stages": stages}
    text = C.table(["ZeRO", "samples/s", "s/step", "TFLOP/s", "MFU", "peak GiB", "params dtype"], [
        [s, r["samples_per_s"], r["step_seconds"], r["tflops"], r["mfu"],
         r["peak_memory_gib"] if r["peak_memory_gib"] is not None else "n/a",
         ",".join(r["param_dtypes"])] for s, r in stages.items()])
    C.finish("gpu_step", args, result, text)
    return 0 if finite else 1


if __name__ == "__main__":
    C.as_a_training_worker()
    raise SystemExit(main())
