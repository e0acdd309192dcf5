"""Resource bounds: refuse a merge up front that cannot fit, and turn running out of memory into one line.

Both numbers come from the plan (the headers) before anything is written: the output's bytes against
the free space of the file system it goes to, and a lower bound of the peak memory (the largest unit's
base, T task vectors and merged result in the compute dtype, per worker; for a method merged in
chunks of rows, the largest chunk's) against the memory this
process may still take (``MemAvailable``, a container's cgroup limit, the address-space limit).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import WeightWeavingError
from .plan import Plan, Unit

OVERRIDE = "pass --no-resource-check to try anyway"
ADVICE = "try --workers 1, --compute-dtype float32, a smaller --shard-size, or fewer models"
_OOM = re.compile(r"can't allocate memory|out of memory|not enough memory|failed to allocate", re.IGNORECASE)


class ResourceError(WeightWeavingError):
    """The machine cannot hold the merge: not enough disk or memory."""


def size(n: float) -> str:
    """``1.5 GiB``: a byte count for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def output_bytes(plan: Plan) -> int:
    return sum(u.numel * u.out_dtype.itemsize for u in plan.units)


def unit_bytes(unit: Unit, num_models: int, compute_dtype: torch.dtype) -> int:
    """Memory one merged unit needs at least: base, T task vectors and the result, in the compute dtype."""
    return unit.numel * (num_models + 2) * compute_dtype.itemsize


def piece_numel(unit: Unit, num_models: int, chunk_bytes: int | None) -> int:
    """Entries of the largest piece a unit is merged in: the whole unit, or with ``chunk_bytes``
    (a method merged in chunks of rows) as many rows as the engine puts in one chunk
    (:meth:`~weightweaving.engine.execute.Runner.pieces`)."""
    rows = unit.shape[0] if len(unit.shape) >= 2 else 0
    per_entry = 4 * max(1, num_models)
    if chunk_bytes is None or rows <= 1 or unit.numel * per_entry <= chunk_bytes:
        return unit.numel
    row_numel = unit.numel // rows
    return min(rows, max(1, chunk_bytes // (per_entry * row_numel))) * row_numel


def peak_bytes(
    plan: Plan, num_models: int, compute_dtype: torch.dtype, workers: int, chunk_bytes: int | None = None
) -> int:
    """A lower bound of the merge's peak memory: ``workers`` of the largest unit (or, for a method
    merged in chunks of rows, of the largest chunk) at once."""
    units = plan.merge_units
    if not units:
        return max((u.numel * u.out_dtype.itemsize for u in plan.units), default=0)
    largest = max(piece_numel(u, num_models, chunk_bytes) for u in units)
    per_worker = largest * (num_models + 2) * compute_dtype.itemsize
    return per_worker * max(1, min(workers, len(units)))


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable`` and any address-space limit (or ``None``)."""
    limits = []
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh.read(65536).decode().splitlines():
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        limits.append(cgroup)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(max(0, soft - _address_space_used()))
    return min(limits) if limits else None


def _cgroup_room() -> int | None:
    """What a container's memory limit (cgroup v2) leaves, or ``None`` without one."""
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as fh:
            limit = fh.read(64).strip()
        with open("/sys/fs/cgroup/memory.current", "rb") as fh:
            current = int(fh.read(64).strip())
    except (OSError, ValueError):
        return None
    return None if limit == b"max" or not limit.isdigit() else max(0, int(limit) - current)


def _address_space_used() -> int:
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh.read(65536).decode().splitlines():
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def free_disk(out: Path) -> int | None:
    """Free bytes on the file system that will hold ``out`` (its nearest existing ancestor's)."""
    ancestor = Path(os.path.abspath(out))
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        usage = shutil.disk_usage(ancestor)
    except OSError:
        return None
    return usage.free if usage.total else None  # /proc and the like report no size: the writer explains


def check_resources(
    plan: Plan,
    num_models: int,
    compute_dtype: torch.dtype,
    workers: int,
    out: str | os.PathLike[str] | None,
    device: torch.device,
    chunk_bytes: int | None = None,
) -> None:
    """Refuse, with the numbers, a merge whose output cannot fit on disk or whose peak cannot fit in memory."""
    if out is not None:
        need, free = output_bytes(plan), free_disk(Path(out))
        if free is not None and need > free:
            raise ResourceError(
                f"the output needs {size(need)} ({need} bytes) but its file system has {size(free)} free; "
                f"free some space or choose another --out ({OVERRIDE})",
                path=out,
            )
    if device.type != "cpu":
        return  # device memory is the device's: its allocator reports running out (see below)
    need, have = peak_bytes(plan, num_models, compute_dtype, workers, chunk_bytes), available_memory()
    if have is not None and need > have:
        largest = max(plan.merge_units, key=lambda u: piece_numel(u, num_models, chunk_bytes))
        raise ResourceError(
            f"the merge needs at least {size(need)} of memory ('{largest.name}' {tuple(largest.shape)} × "
            f"{num_models} models + base and result in {str(compute_dtype).removeprefix('torch.')}, "
            f"× {max(1, workers)} workers) but {size(have)} is available; {ADVICE} ({OVERRIDE})"
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocators raise ``RuntimeError`` (``torch.OutOfMemoryError`` on CUDA); Python, ``MemoryError``."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM.search(str(exc)))


@contextlib.contextmanager
def out_of_memory_as_error(unit: Unit, num_models: int, compute_dtype: torch.dtype) -> Iterator[None]:
    """Inside: running out of memory on ``unit`` becomes one line with the sizes involved."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        need = unit_bytes(unit, num_models, compute_dtype)
        raise ResourceError(
            f"out of memory while merging '{unit.name}' {tuple(unit.shape)} of {num_models} models "
            f"(at least {size(need)} in {str(compute_dtype).removeprefix('torch.')} for this tensor); {ADVICE}"
        ) from None
