"""#30.1: CPU training's process groups run their collectives on one gloo thread.

torch's gloo group has two worker threads, and both write the group's last-completed status
without a lock: a double free when two collectives finish together (melp_ray/train/gloo.py).
Two spawned ranks build the default group and a cloned group (as DeepSpeed does) with the
backend training asks for: each group has one ``pt_gloo_runloop`` thread, where torch's own
has two, and the collectives training uses (concurrent async reduce-scatters, the loss's
differentiable all-gather and its backward) still give the right numbers. A world of one (an
in-process run, the step benchmarks) gets the same backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from melp_ray.config import PretrainConfig, load_config
from melp_ray.train.gloo import ONE_THREAD_GLOO, register_one_thread_gloo
from melp_ray.train.ray_backend import OneThreadGlooConfig
from melp_ray.train.launcher import build_trainer
from melp_ray.train.session import single_process_group
from melp_ray.utils.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


def runloop_threads() -> int:
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop"
               for t in os.listdir("/proc/self/task"))


def two_ranks(rank: int, port: int, backend: str, out) -> None:
    from torch.distributed._functional_collectives import all_gather_single

    register_one_thread_gloo()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    clone = dist.new_group([0, 1])
    ok = True
    for group in (None, clone):
        outs = [torch.empty(4) for _ in range(3)]
        works = [dist.reduce_scatter_tensor(o, torch.full((8,), float(i + 1)), async_op=True,
                                            group=group) for i, o in enumerate(outs)]
        for work in works:
            work.wait()
        ok &= all(torch.equal(o, torch.full((4,), 2.0 * (i + 1))) for i, o in enumerate(outs))
    x = torch.full((3, 2), float(rank + 1), requires_grad=True)
    gathered = all_gather_single(x, 0, dist.group.WORLD)
    ok &= torch.equal(gathered, torch.tensor([[1.0] * 2] * 3 + [[2.0] * 2] * 3))
    (gathered * (rank + 1)).sum().backward()
    ok &= torch.equal(x.grad, torch.full((3, 2), 3.0))    # sum over ranks of (rank + 1)
    out.put((rank, dist.get_backend(), runloop_threads(), bool(ok)))
    dist.destroy_process_group()


def world_of_one(out) -> None:
    """What an in-process run (train.num_workers=1) and the step benchmarks start with."""
    single_process_group()
    total = torch.ones(3)
    dist.all_reduce(total)
    out.put((dist.get_backend(), runloop_threads(), total.tolist()))
    dist.destroy_process_group()


def run_two_ranks(backend: str) -> list[tuple]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=two_ranks, args=(r, port, backend, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    return results


def test_one_thread_gloo_groups_have_one_worker_thread_and_right_collectives(monkeypatch):
    # The spawned ranks unpickle ``two_ranks`` as tests.train.test_gloo (pytest's importlib
    # mode) with this process's sys.path: the repository root must be on it.
    monkeypatch.syspath_prepend(str(REPO))
    # torch's gloo: two groups x two worker threads, the pair that races.
    assert [r[2] for r in run_two_ranks("gloo")] == [4, 4]
    results = run_two_ranks(ONE_THREAD_GLOO)
    assert results == [(0, ONE_THREAD_GLOO, 2, True), (1, ONE_THREAD_GLOO, 2, True)], results


def test_cpu_training_asks_ray_train_for_one_thread_gloo():
    cfg = load_config(PretrainConfig, "melp_ray/configs/tiny.yaml", [])
    cpu = build_trainer(cfg, object, {}).backend_config
    assert isinstance(cpu, OneThreadGlooConfig) and cpu.backend == ONE_THREAD_GLOO
    gpu_cfg = load_config(PretrainConfig, "melp_ray/configs/tiny.yaml", ["train.use_gpu=true"])
    gpu = build_trainer(gpu_cfg, object, {}).backend_config
    assert not isinstance(gpu, OneThreadGlooConfig) and gpu.backend == "nccl"


def test_a_world_of_one_uses_one_thread_gloo(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=world_of_one, args=(out,))
    proc.start()
    assert out.get(timeout=120) == (ONE_THREAD_GLOO, 1, [1.0, 1.0, 1.0])
    proc.join(timeout=60)
    assert proc.exitcode == 0
