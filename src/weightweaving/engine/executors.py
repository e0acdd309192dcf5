"""Executors run one function over the plan's units and hand the results back in order.

Methods never see which executor runs them. ``LocalExecutor`` uses threads (PyTorch releases the GIL
in its kernels and file reads, so reading the next unit overlaps computing this one); a distributed
executor only has to implement the same ``map``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn`` over ``items``; results in the items' order, with a bounded number in flight."""
        ...


class LocalExecutor:
    """Runs units on this machine. ``workers=1`` is strictly one unit at a time (least memory)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        if self.workers == 1:
            for item in items:
                yield fn(item)
            return
        window: deque[Future[R]] = deque()
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            try:
                for item in items:
                    window.append(pool.submit(fn, item))
                    if len(window) > self.workers:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:
                for fut in window:
                    fut.cancel()


EXECUTORS = ("local", "ray")


def make_executor(
    executor: Executor | str | None, workers: int = 1, ray_address: str | None = None
) -> Executor:
    """The executor a merge asked for: an :class:`Executor` as given, or ``"local"`` (threads on
    this machine, the default) or ``"ray"`` (a Ray cluster at ``ray_address``: see
    :mod:`weightweaving.engine.ray_executor`)."""
    from ..errors import OptionError, did_you_mean

    if executor is None or executor == "local":
        if ray_address is not None:
            raise OptionError("--ray-address needs --executor ray")
        return LocalExecutor(workers)
    if executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=ray_address)
    if isinstance(executor, str):
        raise OptionError(
            f"--executor '{executor}' is not one of: {', '.join(EXECUTORS)}{did_you_mean(executor, EXECUTORS)}"
        )
    return executor
