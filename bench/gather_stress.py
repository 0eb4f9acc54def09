"""The loss's differentiable all-gather alone, many times, on 2 gloo processes (no Ray, no model).

    python bench/gather_stress.py --steps 3000 --mode funcol   # torch's functional all_gather_single
    python bench/gather_stress.py --steps 3000 --mode ours     # melp_ray.model.losses.gather_with_grad

Each step gathers two (16, 256) embeddings with gradient, as MELPLoss does, and backpropagates
a loss whose gradient is known exactly: rank r weights the gathered rows by (r + 1), so every
row's gradient must be sum_r (r + 1) = 3 on both ranks. A step whose gradient is off means
the collective read or wrote memory it no longer owned. A second thread allocates and frees
tensors all the while (as the prefetch thread does), so freed memory is reused at once.
With ``MALLOC_PERTURB_`` set, glibc fills freed memory with a pattern, which makes a read
after free visible as a wrong gradient. Prints a table, writes JSON (bench/README.md).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import _common as C

WORLD = 2
ROWS, DIM = 16, 256


def parse_args():
    p = C.parser("gather_stress", __doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--mode", choices=("funcol", "ours"), default="ours")
    p.add_argument("--label", default=None, help="names the JSON (gather_stress_LABEL.json)")
    args = p.parse_args()
    if args.smoke:
        args.steps = 20
    if args.out == str(C.RESULTS_DIR / "gather_stress.json"):
        args.out = str(C.RESULTS_DIR / f"gather_stress_{args.label or args.mode}.json")
    return args


def gather(mode: str, x):
    import torch.distributed as dist

    if mode == "funcol":
        from torch.distributed._functional_collectives import all_gather_single

        return all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    from melp_ray.model.losses import gather_with_grad

    return gather_with_grad(x)


def churn(stop: threading.Event) -> None:
    """Allocate and free tensors of the embeddings' sizes, as a busy second thread does."""
    import torch

    while not stop.is_set():
        parts = [torch.empty(ROWS * WORLD, DIM).fill_(7.0) for _ in range(4)]
        del parts


def worker(rank: int, port: int, mode: str, steps: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)
    stop = threading.Event()
    thread = threading.Thread(target=churn, args=(stop,), daemon=True)
    thread.start()
    bad, start = 0, time.perf_counter()
    try:
        for _ in range(steps):
            ecg = torch.randn(ROWS, DIM, requires_grad=True)
            text = torch.randn(ROWS, DIM, requires_grad=True)
            loss = (gather(mode, ecg) * (rank + 1)).sum() + (gather(mode, text) * (rank + 1)).sum()
            loss.backward()
            expected = float(sum(r + 1 for r in range(WORLD)))
            bad += int(not (torch.all(ecg.grad == expected) and torch.all(text.grad == expected)))
    finally:
        stop.set()
        thread.join()
    queue.put({"rank": rank, "wrong_gradients": bad, "seconds": time.perf_counter() - start})
    dist.destroy_process_group()


def main() -> int:
    args = parse_args()
    machine = C.machine()
    port = 29500 + os.getpid() % 1000
    queue = C.MP_CONTEXT.Queue()
    procs = [C.MP_CONTEXT.Process(target=worker, args=(r, port, args.mode, args.steps, queue))
             for r in range(WORLD)]
    C.log(f"{args.mode}: {args.steps} steps on {WORLD} gloo processes "
          f"(MALLOC_PERTURB_={os.environ.get('MALLOC_PERTURB_')})")
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    results = []
    while not queue.empty():
        results.append(queue.get())
    exits = [p.exitcode for p in procs]
    rows = [[args.mode, r, exits[r], next((x["wrong_gradients"] for x in results if x["rank"] == r),
                                          "died")] for r in range(WORLD)]
    text = C.table(["mode", "rank", "exit code (-11: SIGSEGV)", "steps with a wrong gradient"], rows)
    C.finish("gather_stress", args,
             {"mode": args.mode, "steps": args.steps, "exit_codes": exits, "ranks": results,
              "wall_s": wall, "malloc_perturb": os.environ.get("MALLOC_PERTURB_"),
              "machine": machine}, text)
    return 0 if all(e == 0 for e in exits) else 1


if __name__ == "__main__":
    sys.exit(main())
