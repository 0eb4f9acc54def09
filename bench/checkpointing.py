"""Activation checkpointing (``model.gradient_checkpointing``): memory and time of a
training step with and without it.

    python bench/checkpointing.py            # "mid" MELP (bench/zero_memory.py), batch 16, fp32, CPU
    python bench/checkpointing.py --smoke    # the tiny preset, batch 2
    python bench/checkpointing.py --device cuda --batch 64

Each mode runs in a fresh process (peak RSS is per process): build the model and plain
AdamW, one warm-up step, then timed steps (forward, the three losses, backward, AdamW) on
synthetic batches. Memory of the step: on CPU the peak RSS minus the RSS after the warm-up's
setup (model, gradients, AdamW moments are then allocated, so the difference is mostly
activations); on CUDA ``max_memory_allocated`` during the timed steps. Dropout stays on (the
recompute re-draws the same masks).
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import _common as C

N_SAMPLES = 1000   # 10 s at 100 Hz


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_mode(checkpointing: bool, smoke: bool, batch: int, steps: int, device: str,
             out: str) -> None:
    import torch

    from melp_ray.model.losses import compute_losses
    from melp_ray.model import MELP
    from zero_memory import model_config

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2) if device == "cpu" else 1)
    cfg = model_config(smoke)
    cfg.gradient_checkpointing = checkpointing
    torch.manual_seed(0)
    model = MELP(cfg).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    length = cfg.max_text_length
    ecg = torch.randn(batch, cfg.ecg_leads, N_SAMPLES, generator=gen).to(device)
    ids = torch.randint(1000, 2000, (batch, length), generator=gen).to(device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    sentence_ids = (torch.arange(length).repeat(batch, 1) % 3).to(device)

    def step() -> float:
        loss = compute_losses(model(ecg, ids, mask, sentence_ids))["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)   # gradients stay allocated, as under DeepSpeed
        return float(loss.detach())

    step()                                   # warm-up: gradients and AdamW state allocated
    rss_setup = rss_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    report = {"checkpointing": checkpointing, "step_s": seconds, "losses": losses,
              "parameters": sum(p.numel() for p in model.parameters()),
              "rss_setup": rss_setup,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    report["step_memory"] = report["peak_rss"] - rss_setup
    if device == "cuda":
        report["cuda_step_memory"] = torch.cuda.max_memory_allocated() - base_cuda
    Path(out).write_text(json.dumps(report))


def measure(checkpointing: bool, args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="melp-bench-ckpt-") as tmp:
        out = str(Path(tmp, "mode.json"))
        mp.start_processes(_child, args=(checkpointing, args.smoke, args.batch, args.steps,
                                         args.device, out),
                           nprocs=1, start_method="spawn", join=True)
        return json.loads(Path(out).read_text())


def _child(_index: int, *args) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))   # _common and zero_memory in the child
    run_mode(*args)


def main(argv=None) -> int:
    p = C.parser("checkpointing", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 16; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; smoke 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 16)
    args.steps = args.steps or (1 if args.smoke else 3)
    info = C.machine()
    modes = {}
    for checkpointing in (False, True):
        C.log(f"gradient_checkpointing={checkpointing}: batch {args.batch}, {args.steps} steps")
        modes["on" if checkpointing else "off"] = measure(checkpointing, args)
    off, on = modes["off"], modes["on"]
    mb = 1 / 2**20
    key = "cuda_step_memory" if args.device == "cuda" else "step_memory"
    rows = [[name, m["step_s"], m[key] * mb, m["peak_rss"] * mb] for name, m in modes.items()]
    result = {"machine": info, "model": "tiny" if args.smoke else "mid", "device": args.device,
              "batch": args.batch, "steps": args.steps, "parameters": off["parameters"],
              "modes": modes, "time_ratio": on["step_s"] / off["step_s"],
              "memory_ratio": on[key] / off[key] if off[key] else None,
              "memory_measure": key}
    text = (f"model: {result['model']}, {off['parameters'] / 1e6:.1f} M parameters, batch "
            f"{args.batch}, {args.device}\n"
            + C.table(["checkpointing", "s/step", f"{key} MiB", "peak RSS MiB"], rows)
            + f"\ncheckpointing on/off: time {result['time_ratio']:.2f}x, step memory "
              f"{result['memory_ratio'] if result['memory_ratio'] is None else round(result['memory_ratio'], 2)}x\n")
    C.finish("checkpointing", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
