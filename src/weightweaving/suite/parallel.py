"""Run the suite's independent jobs (fine-tunes, method scorings) in forked worker processes.

Processes, not threads: this model's operations are small, and on busy cores torch's OpenMP threads
spin-wait on each other (2-25x slower measured), whereas one single-threaded process per core does
not. Workers are forked, so they inherit the zoo (checkpoints, data) without pickling it; only job
indices go in and results come back. Every job is seeded on its own, so results do not depend on the
number of workers.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import WeightWeavingError

T = TypeVar("T")

_JOB: Callable[[int], Any] | None = None
MAX_WORKERS = 8


def default_workers() -> int:
    """``WEIGHTWEAVING_SUITE_WORKERS`` if set, else the usable cores (at most 8)."""
    env = os.environ.get("WEIGHTWEAVING_SUITE_WORKERS")
    if env:
        if not env.strip().isdigit():
            raise WeightWeavingError(f"WEIGHTWEAVING_SUITE_WORKERS must be a whole number, got {env!r}")
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as in the parent (see ``train.flush_denormals``)
    # Ctrl-C reaches the whole process group: only the parent handles it (one clean message, no
    # tracebacks from workers); leaving the pool then terminates the workers with SIGTERM, which
    # must end them quietly, not raise the CLI's KeyboardInterrupt inherited from the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call(index: int) -> Any:
    assert _JOB is not None
    return _JOB(index)


def fork_map(job: Callable[[int], T], n: int, workers: int) -> Iterator[T]:
    """``job(0), ..., job(n - 1)`` in order, computed by up to ``workers`` forked processes.

    Falls back to a plain loop for one worker, one job, or where ``fork`` does not exist. Not
    re-entrant: a job must not call ``fork_map`` itself.
    """
    global _JOB
    if workers <= 1 or n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for index in range(n):
            yield job(index)
        return
    if _JOB is not None:
        raise RuntimeError("fork_map is not re-entrant")
    _JOB = job
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, n), initializer=_init_worker) as pool:
            yield from pool.imap(_call, range(n))
    finally:
        _JOB = None


def ray_map(
    job: Callable[[int], T],
    n: int,
    address: str | None = None,
    *,
    threads: int | None = 1,
    flush_denormal: bool = True,
) -> Iterator[T]:
    """What :func:`fork_map` does, on a Ray cluster at ``address``: one task per job, in order.

    The job (a closure over the zoo) is pickled once into Ray's object store; each task sets up its
    worker as a forked one is (``threads`` torch threads, None: the driver's; denormals flushed or
    not, as the driver runs), so results equal a local run's.
    """
    from ..engine.ray_executor import RayExecutor

    task = functools.partial(_in_ray_worker, job, flush_denormal)
    return RayExecutor(address, task_bytes=1, threads=threads).map(task, range(n))


def _in_ray_worker(job: Callable[[int], T], flush_denormal: bool, index: int) -> T:
    import torch

    torch.set_flush_denormal(flush_denormal)  # a Ray worker process is reused: set it either way
    return job(index)
