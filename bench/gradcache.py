"""What the contrastive batch costs (#35): step time and memory of one optimizer step at equal
global batch, with gradient accumulation, as ``train.contrastive_accumulation=cached`` (one
rhythm loss over the whole global batch: gradient caching) and ``per_micro_batch`` (one loss
per micro-batch), beside the same batch in one micro-batch (no accumulation).

    python bench/gradcache.py             # "mid" MELP (bench/zero_memory.py), global batch 32 = 4 x 8, CPU
    python bench/gradcache.py --smoke     # the tiny preset, 8 = 2 x 4, one step, all in this process
    python bench/gradcache.py --global-batch 64 --accum 8 --steps 3

Each mode runs in a fresh process (peak memory is per process) with one torch thread, so
its CPU seconds are its work even on a shared machine: the recipe's own step
(``PretrainRecipe.train_micro_batches``: lead masking, forwards, the three losses,
``engine.backward``, ``engine.step``) on the DeepSpeed engine of a world of 1 (ZeRO-2, fp32).
One warm-up step, then timed steps. Memory of the step: the peak RSS during the timed steps
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the RSS before them,
with glibc's mmap threshold fixed so that freed activations leave the RSS. ``--smoke`` runs
the modes in this process instead (its memory numbers mean nothing).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import _common as C

MODES = ("one_micro_batch", "per_micro_batch", "cached")
MMAP_THRESHOLD = str(128 * 1024)   # fixed: glibc would raise it (up to 32 MiB) as tensors free


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mode_config(mode: str, args):
    from melp_ray.config import PretrainConfig, load_config
    from zero_memory import model_config

    micro = args.global_batch if mode == "one_micro_batch" else args.global_batch // args.accum
    accumulation = "per_micro_batch" if mode == "per_micro_batch" else "cached"
    cfg = load_config(PretrainConfig, "tiny", [
        "train.num_workers=1", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={micro}", f"train.contrastive_accumulation={accumulation}",
        "deepspeed.zero_stage=2", "train.max_steps=1000", "train.warmup_steps=2",
        *(["data.seconds=2.5", "model.max_text_length=32", "model.text_model=minilm-reports"]
          if args.smoke else [])])
    if not args.smoke:
        cfg.model = model_config(False)
    return cfg


def run_mode(mode: str, args) -> dict:
    """One mode's step time and memory, in this process (a world of 1)."""
    import gc

    import torch

    from gpu_step import build_recipe, one_batch
    from melp_ray.train.session import single_process_group

    single_process_group()
    cfg = mode_config(mode, args)
    recipe = build_recipe(cfg, torch.device("cpu"))
    batch = one_batch(cfg, torch.device("cpu"))
    micro, per_call = cfg.train.micro_batch_size, recipe.micro_batches_per_call()
    micro_batches = [{k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
                     for i in range(args.global_batch // micro)]

    def step(n: int) -> list[dict]:
        """One optimizer step: every micro-batch, in calls of ``per_call`` (seeded as in
        training: one seed per micro-batch)."""
        group = [(b, 1000 * n + i) for i, b in enumerate(micro_batches)]
        losses = []
        for start in range(0, len(group), per_call):
            losses += recipe.train_micro_batches(group[start:start + per_call])
        return losses

    before = recipe.engine.global_steps
    step(0)                                  # warm-up: gradients and optimizer state allocated
    assert recipe.engine.global_steps == before + 1, "one optimizer step per step()"
    gc.collect()
    peak_reset = reset_peak_rss()
    rss_before = status_kib("VmRSS")
    wall, cpu, losses = time.perf_counter(), time.process_time(), []
    for n in range(1, args.steps + 1):
        losses.append(step(n))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = status_kib("VmHWM") if peak_reset else None
    rhythm = [sum(d["rhythm"] for d in s) / len(s) for s in losses]
    result = {"mode": mode, "micro_batch": micro, "accumulation": cfg.train.grad_accum,
              "pairs_per_rhythm_loss": cfg.train.contrastive_negatives,
              "step_s": wall / args.steps, "cpu_s_per_step": cpu / args.steps,
              "rhythm_loss": rhythm, "torch_threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in recipe.model.parameters()),
              "rss_before_mib": rss_before / 1024,
              "step_memory_mib": None if peak is None else (peak - rss_before) / 1024}
    recipe.engine.destroy()
    return result


def _child(_index: int, mode: str, args, out: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))   # _common, gpu_step, zero_memory
    import torch

    torch.set_num_threads(1)
    Path(out).write_text(json.dumps(run_mode(mode, args)))


def measure(mode: str, args) -> dict:
    if args.smoke:
        return run_mode(mode, args)
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD   # read by the child's glibc at start
    with tempfile.TemporaryDirectory(prefix="melp-bench-gradcache-") as tmp:
        out = str(Path(tmp, "mode.json"))
        mp.start_processes(_child, args=(mode, args, out), nprocs=1, start_method="spawn",
                           join=True)
        return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    p = C.parser("gradcache", __doc__.splitlines()[0])
    p.add_argument("--global-batch", type=int, default=None, help="global batch (default 32; smoke 8)")
    p.add_argument("--accum", type=int, default=None, help="accumulation steps (default 4; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; smoke 1)")
    args = p.parse_args(argv)
    args.global_batch = args.global_batch or (8 if args.smoke else 32)
    args.accum = args.accum or (2 if args.smoke else 4)
    args.steps = args.steps or (1 if args.smoke else 3)
    if args.global_batch % args.accum:
        p.error("--global-batch must be a multiple of --accum")
    info = C.machine()
    modes = {}
    for mode in MODES:
        C.log(f"{mode}: global batch {args.global_batch}, {args.steps} timed steps")
        modes[mode] = measure(mode, args)
    base, per_micro, cached = (modes[m] for m in MODES)
    ratios = {"cached_vs_per_micro_batch_cpu": cached["cpu_s_per_step"] / per_micro["cpu_s_per_step"],
              "cached_vs_per_micro_batch_wall": cached["step_s"] / per_micro["step_s"],
              "cached_vs_one_micro_batch_cpu": cached["cpu_s_per_step"] / base["cpu_s_per_step"]}
    if all(m["step_memory_mib"] for m in modes.values()):
        ratios["cached_vs_per_micro_batch_memory"] = (cached["step_memory_mib"]
                                                      / per_micro["step_memory_mib"])
        ratios["cached_vs_one_micro_batch_memory"] = (cached["step_memory_mib"]
                                                      / base["step_memory_mib"])
    embed = mode_config("cached", args).model.embed_dim
    # What gradient caching keeps on top of one micro-batch: the step's ECG and text
    # embeddings and their gradients, fp32.
    cache_mib = args.global_batch * embed * 2 * 2 * 4 / 2**20
    result = {"machine": info, "model": "tiny" if args.smoke else "mid",
              "global_batch": args.global_batch, "accum": args.accum, "steps": args.steps,
              "modes": modes, "ratios": ratios, "embedding_cache_mib": cache_mib}
    rows = [[m, r["micro_batch"], r["accumulation"], r["pairs_per_rhythm_loss"], r["step_s"],
             r["cpu_s_per_step"], r["step_memory_mib"]] for m, r in modes.items()]
    text = (f"model: {result['model']}, {base['parameters'] / 1e6:.1f} M parameters, global batch "
            f"{args.global_batch}, CPU, 1 thread a mode\n"
            + C.table(["mode", "micro", "accum", "pairs/rhythm loss", "s/step", "CPU s/step",
                       "step memory MiB"], rows)
            + "\n" + "; ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            + f"\nembedding cache of the step: {cache_mib:.3f} MiB\n")
    C.finish("gradcache", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
