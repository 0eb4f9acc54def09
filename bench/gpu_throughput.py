"""Samples/s and MFU of the paper-size MELP in bf16 on one GPU, ZeRO 1/2/3.

    python bench/gpu_throughput.py                 # needs a CUDA GPU; refuses without one
    python bench/gpu_throughput.py --smoke         # CPU: tiny preset, fp32, the worker in-process
    python bench/gpu_throughput.py --text-folder DIR   # text tower from DIR's config, random init

Each stage is a real ``melp_ray.pretrain`` run (1 worker, use_gpu=true, bf16, the ``paper``
config) on PTB-XL prepared at 500 Hz: by default the bundled 100 Hz sample resampled by
``melp_ray.prepare`` (the rate, not the waveform detail, sets the cost), or ``--root`` for
a raw PTB-XL / MIMIC root. Throughput is the mean ``samples_per_s`` of the log windows
after the first; MFU = training FLOPs per sample (``melp_ray.model.flops``) x samples/s
over the GPU's dense bf16 peak (``PEAK_FLOPS``: H100 SXM / H200 989 TFLOP/s).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def peak_key(device_name: str) -> str:
    name = device_name.upper()
    if "H200" in name:
        return "h200-bf16"
    if "H100" in name:
        return "h100-pcie-bf16" if "PCIE" in name else "h100-sxm-bf16"
    if "A100" in name:
        return "a100-bf16"
    return "h100-sxm-bf16"   # unknown GPU: compare against H100 and say so in the JSON


def run_stage(stage: int, shards_root: str, storage: str, *, smoke: bool, steps: int,
              batch: int, cpus_per_worker: float, use_gpu: bool,
              text_folder: str | None = None) -> dict:
    from melp_ray.pretraining import run as pretrain
    from melp_ray.config import PretrainConfig, load_config

    config = "tiny" if smoke else "paper"
    overrides = [
        "train.num_workers=1", f"train.use_gpu={str(use_gpu).lower()}",
        f"train.cpus_per_worker={cpus_per_worker}", f"train.global_batch_size={batch}",
        f"train.max_steps={steps}", f"train.log_every={max(steps // 6, 1)}",
        "train.val_every=0", f"train.checkpoint_every={steps}", "train.val_batches=1",
        "train.warmup_steps=2", f"deepspeed.zero_stage={stage}",
        f"run.storage_path={storage}", f"run.name=gpu-zero{stage}-{int(time.time())}",
    ]
    if not smoke:
        overrides += ["data.sample_rate=500", "train.precision=bf16"]
    if text_folder:   # weights need not travel to the GPU machine: they do not change the cost
        overrides += [f"model.text_model={text_folder}", "model.text_pretrained=false"]
    cfg = load_config(PretrainConfig, config, overrides)
    cfg.data.root = shards_root          # set after prepare: the config checks that it exists
    # --smoke checks this script's code path: its one worker trains in this process. Ray
    # Train's own start-up (controller, worker actor, placement group: ~25 CPU-s) adds
    # nothing that the pretraining tests' real Ray Train runs do not check already.
    summary = pretrain.run(cfg, in_process=smoke)
    windows = C.run_windows(summary)
    steady = C.steady(windows)
    return {"cfg": cfg, "samples_per_s": C.mean_of(steady, "samples_per_s"),
            "input_wait_frac": C.mean_of(steady, "input_wait_frac"),
            "windows": [{k: w[k] for k in ("step", "samples_per_s", "input_wait_frac")} for w in windows],
            "wall_seconds": summary["wall_seconds"]}


def main(argv=None) -> int:
    p = C.parser("gpu_throughput", __doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="raw PTB-XL / MIMIC root (default: bundled sample)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64, help="micro-batch = global batch (1 GPU)")
    p.add_argument("--text-folder", help="folder with a BERT-style config.json + tokenizer: the "
                                         "text tower at random init (default: the config's own)")
    p.set_defaults(num_cpus=None)
    args = p.parse_args(argv)

    import torch

    use_gpu = torch.cuda.is_available()
    if not use_gpu and not args.smoke:
        print("gpu_throughput: refused: no CUDA GPU is visible (torch.cuda.is_available() is False). "
              "Run it on a GPU machine, or use --smoke to check the code path on CPU.",
              file=sys.stderr)
        return 2
    smoke = args.smoke
    stages = [2] if smoke else [int(s) for s in args.stages.split(",")]
    steps = 4 if smoke else args.steps
    batch = 4 if smoke else args.batch
    num_cpus = args.num_cpus or (2 if smoke else os.cpu_count())
    info = C.machine()

    from melp_ray.data.sources import bundled_root
    from melp_ray.model.flops import PEAK_FLOPS, estimate_mfu, mean_training_flops
    from melp_ray.data.prepare import PrepareSettings, prepare

    root = args.root or bundled_root()
    rate = 100 if smoke else 500
    tmp = tempfile.TemporaryDirectory(prefix="melp-bench-gpu-")
    shards_root = str(Path(tmp.name) / "shards")
    C.log(f"starting Ray ({num_cpus} CPUs{', 1 GPU' if use_gpu else ''}); preparing {root} at {rate} Hz")
    ray = C.start_ray(num_cpus, **({"num_gpus": 1} if use_gpu else {}))
    if smoke:
        C.smoke_data_limit()
    prepare(PrepareSettings(dataset="ptb-xl", root=root, out=shards_root, sample_rate=rate,
                            seconds=10.0, shard_size=8 if smoke else 64, limit=48 if smoke else None))
    device = torch.cuda.get_device_name(0) if use_gpu else "cpu (smoke)"
    peak_name = peak_key(device)
    peak = PEAK_FLOPS[peak_name]
    cpus_per_worker = 0.5 if smoke else max(num_cpus // 2, 1)
    results = {}
    for stage in stages:
        C.log(f"ZeRO-{stage}: {steps} steps at batch {batch}")
        r = run_stage(stage, shards_root, str(Path(tmp.name) / "runs"), smoke=smoke, steps=steps,
                      batch=batch, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                      text_folder=args.text_folder)
        cfg = r.pop("cfg")
        # The model runs each batch on its longest report (text_columns): FLOPs at the mean
        # width of random micro-batches of these reports, not at the padded length.
        tokens = C.report_token_counts(shards_root, cfg.model.text_model, cfg.model.max_text_length)
        flops = mean_training_flops(cfg.model, int(cfg.data.sample_rate * cfg.data.seconds),
                                    tokens, micro_batch=batch)
        r["train_flops_per_sample"] = flops
        r["mfu"] = estimate_mfu(flops, r["samples_per_s"], peak)
        results[str(stage)] = r
    ray.shutdown()
    tmp.cleanup()

    result = {"machine": info, "device": device, "preset": "tiny" if smoke else "paper",
              "precision": "bf16" if use_gpu and not smoke else "fp32", "sample_rate": rate,
              "batch": batch, "steps": steps, "peak": peak_name, "peak_flops": peak,
              "peak_note": None if use_gpu else "CPU smoke run: MFU is against a GPU peak, meaningless",
              "stages": results}
    text = C.table(["ZeRO", "samples/s", "input wait", "TFLOP/s", "MFU"], [
        [k, v["samples_per_s"], v["input_wait_frac"], v["train_flops_per_sample"] * v["samples_per_s"] / 1e12,
         v["mfu"]] for k, v in results.items()])
    text += f"\ndevice: {device}; peak {peak_name} = {peak / 1e12:.0f} TFLOP/s"
    C.finish("gpu_throughput", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
