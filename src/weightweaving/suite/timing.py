"""Per-stage wall and CPU seconds of a suite run (results.json ``timings``), so every part's share shows.

CPU seconds are the process's own (``time.process_time``): a worker's jobs count in that worker, and
they are what a quiet machine would spend, whereas wall seconds grow with the machine's load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Stopwatch:
    """Wall and CPU seconds summed per label."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(label, time.perf_counter() - wall, time.process_time() - cpu)

    def add(self, label: str, wall: float, cpu: float) -> None:
        self.wall[label] = self.wall.get(label, 0.0) + wall
        self.cpu[label] = self.cpu.get(label, 0.0) + cpu

    def merge(self, other: dict[str, dict[str, float]], prefix: str = "") -> None:
        """Add a ``snapshot()`` (e.g. a worker's) under ``prefix``."""
        for label, wall in other["wall"].items():
            self.add(prefix + label, wall, other["cpu"][label])

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"wall": dict(self.wall), "cpu": dict(self.cpu)}

    def table(self) -> dict[str, Any]:
        """``{label: {"wall": s, "cpu": s}}`` rounded to 0.1 s, in insertion order."""
        return {k: {"wall": round(self.wall[k], 1), "cpu": round(self.cpu[k], 1)} for k in self.wall}
