"""CPU process groups whose collectives run on one gloo thread (#30.1).

torch's gloo process group runs its collectives on two worker threads (``pt_gloo_runloop``).
After each collective, the thread that ran it records the group's last completed operation in
a status shared by both threads (``ProcessGroupGloo::runLoop``: ``lastCompletedWorkName``, a
``std::string``), without a lock. When two collectives finish together, both threads replace
that string at once, and both free its old buffer: a double free (bench/README.md, "freed
guard", shows it caught: the same 24-byte block freed by the two ``pt_gloo_runloop`` threads
of one worker, both from ``runLoop``). Op names longer than 15 characters live on the heap
(``_REDUCE_SCATTER_BASE``: the backward of the contrastive loss's all-gather), so the freed
block goes into two threads' malloc caches, and a later malloc on one of them crashes: the
worker SIGSEGVs or aborts in ``malloc``, now and then, in its first steps.

With one worker thread per group nothing can race there. Training asks Ray Train for this
backend on CPU (``ONE_THREAD_GLOO``, through ``melp_ray.train.ray_backend``), and a world of
one uses it too (``session.single_process_group``); DeepSpeed's own group, cloned from the
default one, gets it as well. On GPUs the backend is nccl and none of this applies. This
module imports no Ray: a config check imports it before any cluster is asked for.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

ONE_THREAD_GLOO = "gloo_one_thread"


def one_thread_gloo(store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroupGloo:
    """torch's gloo process group, as ``init_process_group("gloo")`` builds it (the network
    interfaces of GLOO_SOCKET_IFNAME, else the default one), with one worker thread."""
    gloo = dist.ProcessGroupGloo
    options = gloo._Options()
    options._timeout = timeout
    interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
    options._devices = ([gloo.create_device(interface=i) for i in interfaces] if interfaces
                        else [gloo.create_default_device()])
    options._threads = 1
    return gloo(store, rank, size, options)


def register_one_thread_gloo() -> None:
    """Make ``ONE_THREAD_GLOO`` a torch.distributed backend in this process (idempotent)."""
    if not hasattr(dist.Backend, ONE_THREAD_GLOO.upper()):
        dist.Backend.register_backend(ONE_THREAD_GLOO, one_thread_gloo, devices=["cpu"])
