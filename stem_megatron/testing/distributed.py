"""Spawn N gloo ranks on a free loopback port, run one function on each, collect every failure.

Usage (the function must be importable at module level so spawned children can unpickle it)::

    def _check(rank, world_size, x):
        ...  # torch.distributed is initialised (gloo) when this runs

    results = run_distributed(_check, world_size=2, args=(3,))   # list of per-rank return values

A failure on any rank raises `DistributedTestError` listing every failing rank's traceback; a
rank that hangs past `timeout` is killed and reported, so a test never blocks CI.

Devices: gloo ranks are CPU ranks, on machines with GPUs too (CUDA is hidden from them): gloo
moves CUDA tensors only for all_reduce and broadcast (no send/recv, no all-to-all), and ranks
cannot share one GPU under NCCL. `backend="nccl"` gives each rank its own GPU (rank % count).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any


class DistributedTestError(AssertionError):
    """One or more ranks failed or timed out."""


# Environment that keeps a process (and its children) off the GPUs: for tests of CPU behaviour.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": ""}


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, kwargs, queue, env, backend):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(env.get("STEM_TEST_THREADS", "1")))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if "megatron.core.parallel_state" in sys.modules:  # importing megatron costs seconds: only if used
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned ranks (gloo on CPUs, or nccl on GPUs).

    Returns the per-rank return values (they must be picklable). Raises DistributedTestError
    naming every rank that raised or did not finish within `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    child_env = {"STEM_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if backend == "gloo":
        child_env.update(CPU_ONLY_ENV)
    child_env.update(env or {})
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, args, kwargs or {}, queue, child_env, backend),
            daemon=False,
        )
        for r in range(world_size)
    ]
    # Spawned children take the parent's environment at start: set it there, so that CUDA is hidden
    # even from torch calls made while the children import the test module (before _worker runs).
    with _environ(child_env):
        for p in procs:
            p.start()
    results: dict[int, tuple[str, Any]] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            results[rank] = (status, payload)
        except queue_mod.Empty:
            # A rank that died without reporting (segfault, os._exit) would otherwise wait out the timeout.
            dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
            if dead:
                time.sleep(0.5)  # let in-flight queue messages from other ranks arrive
                while True:
                    try:
                        rank, status, payload = queue.get_nowait()
                        results[rank] = (status, payload)
                    except queue_mod.Empty:
                        break
                for r in dead:
                    results.setdefault(r, ("error", f"rank {r} exited with code {procs[r].exitcode}"))
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    failures = []
    for r in range(world_size):
        status, payload = results.get(r, ("timeout", f"rank {r} did not finish within {timeout:.0f}s"))
        if status != "ok":
            failures.append(f"--- rank {r} ({status}) ---\n{payload}")
    if failures:
        raise DistributedTestError(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures))
    return [results[r][1] for r in range(world_size)]
