"""Execution: walk the plan one unit at a time, on one device, and stream results to a sink.

For each merged unit the runner reads the base tensor and the T fine-tuned tensors, forms the task
vectors in the compute dtype, asks a per-unit function for the merged task vector, adds it to the
base, casts to the output dtype and hands the tensor on, keeping nothing once it is passed on.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints.base import Checkpoint
from ..errors import CheckpointError, OptionError
from ..methods.base import Deferred, Stage, UnitContext
from .executors import Executor, LocalExecutor
from .plan import Plan, Unit
from .resources import out_of_memory_as_error

R = TypeVar("R")
_WORKSPACE = threading.local()  # per-thread reused buffers of the runners (Runner._buffer)
CHUNK_BYTES = 64 << 20  # task-vector bytes (T x rows x row size x 4) above which a unit is chunked
UnitFn = Callable[[Tensor, UnitContext], Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was asked for, but no CUDA device is available")
    return dev


_READING: dict[str, tuple[float, int | None]] = {}  # the last reading of _others_running: (when, value)
_READING_KEPT = 1.0  # seconds a reading stands for: many small merges in a row read it once


def _others_running(samples: int = 5, interval: float = 0.01) -> int | None:
    """How many other threads are runnable on this machine now: the fewest of a few readings of
    ``procs_running`` in ``/proc/stat``, less this one (None where there is no ``/proc/stat``).
    A reading less than :data:`_READING_KEPT` seconds old is reused (the readings take 40 ms)."""
    now = time.monotonic()
    last = _READING.get("procs_running")
    if last is not None and now - last[0] < _READING_KEPT:
        return last[1]
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat", "rb") as f:
                line = next((ln for ln in f if ln.startswith(b"procs_running")), None)
        except OSError:
            return None
        if line is None:
            return None
        counts.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(interval)
    _READING["procs_running"] = (time.monotonic(), max(0, min(counts)))
    return _READING["procs_running"][1]


def _machine_busy() -> bool:
    """True when other work occupies the CPUs this process may run on (or this cannot be told)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    others = _others_running()
    return others is None or others > cpus - 2


@contextlib.contextmanager
def entrywise_threads(device: torch.device, entrywise: bool) -> Iterator[None]:
    """One PyTorch intra-op thread while an entrywise merge runs on a busy CPU (restored afterwards).

    Entry-by-entry kernels are bound by memory, not arithmetic. On an otherwise idle machine a
    second intra-op thread still pays (8 × ViT-B/32 Task Arithmetic on 2 idle cores: 2.3 s with two
    threads, 3.0 s with one), but on a shared machine its workers spin-wait for each other at
    every kernel's end (2 cores at load 12: 2.2 s of CPU with one thread, 7.1 s with two, and 3.3x
    the wall time). So the merge keeps PyTorch's threads only when no other thread is runnable
    beside it on all but one of its CPUs (``/proc/stat``, read when the merge starts); otherwise it
    runs with one, and parallelism comes from the engine's workers (``--workers``) instead. The
    bytes are the same either way. Other methods (SVDs) keep PyTorch's setting."""
    before = torch.get_num_threads()
    if not entrywise or device.type != "cpu" or before == 1 or not _machine_busy():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _all_finite(values: Tensor) -> bool:
    """True when no value is NaN or ±Inf: one sum (NaN and Inf propagate through it), much cheaper
    than ``isfinite``; a sum that overflows from finite values is told apart by the caller."""
    return bool(torch.isfinite(values.sum()))


@dataclass(frozen=True)
class Piece:
    """A work item of a pass: a whole unit (``rows`` None) or rows ``start:stop`` of it."""

    unit: Unit
    rows: tuple[int, int] | None


class Runner:
    """Reads units of a plan as task vectors; used for first passes (``scan``) and the merge (``run``)."""

    def __init__(
        self,
        plan: Plan,
        base: Checkpoint,
        models: Sequence[Checkpoint],
        *,
        device: str | torch.device | None = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        allow_nonfinite: bool = False,
        executor: Executor | None = None,
        progress: bool | None = None,
        extras: dict[str, Any] | None = None,
        chunk_bytes: int | None = None,
    ) -> None:
        self.plan = plan
        self.base = base
        self.models = list(models)
        self.device = resolve_device(device)
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.allow_nonfinite = allow_nonfinite
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.extras = extras or {}
        self.passes = 0  # how many full passes over the checkpoints have been made (for benchmarks)
        self.pass_log: list[str] = []  # what each pass was (stage names), for benchmarks and the plan
        self._fused: list[tuple[Stage, Any, Callable[[Any], None]]] = []
        self._units = {u.name: u for u in plan.units}
        # merge units of more than chunk_bytes of task vectors in chunks of rows, when the method
        # says each row's result depends only on that row (Method.row_chunks); set per merge
        self.row_chunks = False
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.task_scales: list[float] | None = None  # Δ_t ← scale_t·Δ_t before any method sees it
        # the merge pass checks the merged task vector for NaN/Inf instead of the task vectors (T
        # times fewer values), for a method whose output is not finite whenever an input is not
        # (Method.propagates_nonfinite); set per merge
        self.check_merged = False
        # a full pass has read every merged unit and found no NaN/Inf: later passes need not look
        # again (the files are checked unchanged before the output is committed)
        self.checked_all = False

    # -- reading ------------------------------------------------------------------------------------
    def load(self, unit: Unit, *, reuse: bool = False) -> tuple[Tensor, Tensor]:
        """The base tensor and the task vectors (T, *shape), both in the compute dtype on the device.

        With ``reuse``, both live in this runner's buffers for the current thread, overwritten by the
        next ``reuse`` load: for a pass whose per-unit function keeps nothing of them (see
        :class:`~weightweaving.methods.base.Stage`)."""
        return self._read(unit, None, reuse)

    def _read(
        self, unit: Unit, rows: tuple[int, int] | None, reuse: bool, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Base and task vectors of a unit or of its rows ``start:stop``: each checkpoint's bytes are
        read straight into the task-vector buffer (converted to the compute dtype there), then the
        base is subtracted in place. ``check``: refuse NaN/Inf in the task vectors (the caller
        checks what it computes from them otherwise)."""
        start, stop = rows if rows is not None else (None, None)
        shape = unit.shape if rows is None else (rows[1] - rows[0], *unit.shape[1:])
        if reuse:
            base = self._buffer("base", shape)
            task_vectors = self._buffer("task_vectors", (len(self.models), *shape))
            self.base.read_into(unit.name, base, start, stop)
        else:
            raw = self.base.get(unit.name) if rows is None else self.base.get_row_range(unit.name, *rows)
            base = raw.to(self.device, self.compute_dtype)
            task_vectors = torch.empty(
                (len(self.models), *shape), dtype=self.compute_dtype, device=self.device
            )
        for i, model in enumerate(self.models):
            model.read_into(unit.name, task_vectors[i], start, stop)
            task_vectors[i].sub_(base)
        if check and not self.allow_nonfinite and not _all_finite(task_vectors):
            self._refuse_nonfinite(unit, task_vectors)  # NaN/Inf anywhere shows up in the task vectors
        return base, self._scaled(task_vectors)

    def _buffer(self, slot: str, shape: tuple[int, ...]) -> Tensor:
        """A buffer of ``shape`` in the compute dtype, reused by this thread from call to call (no
        fresh pages to fault in for every unit); grown to the largest size asked."""
        store: dict[tuple[int, str], Tensor] = _WORKSPACE.__dict__.setdefault("buffers", {})
        numel = math.prod(shape)
        held = store.get((id(self), slot))
        if (
            held is None
            or held.numel() < numel
            or held.dtype != self.compute_dtype
            or held.device != self.device
        ):
            held = store[(id(self), slot)] = torch.empty(numel, dtype=self.compute_dtype, device=self.device)
        return held[:numel].view(shape)

    @property
    def reuses_buffers(self) -> bool:
        """Passes reuse per-thread buffers only on this machine's executor (threads that end with
        the pass); a remote executor's workers would keep them past it."""
        return isinstance(self.executor, LocalExecutor)

    def release_buffers(self) -> None:
        """Free this thread's reused buffers (after a pass)."""
        store: dict[tuple[int, str], Tensor] = _WORKSPACE.__dict__.get("buffers", {})
        for key in [k for k in store if k[0] == id(self)]:
            del store[key]

    def _scaled(self, task_vectors: Tensor) -> Tensor:
        """Apply :attr:`task_scales` (in place) to task vectors (T, ...) of a unit or of its rows."""
        if self.task_scales is not None:
            scales = torch.tensor(self.task_scales, dtype=self.compute_dtype, device=self.device)
            task_vectors.mul_(scales.reshape(-1, *[1] * (task_vectors.dim() - 1)))
        return task_vectors

    def load_sample(self, unit: Unit, fraction: float) -> Tensor:
        """Task vectors of about ``fraction`` of the unit's rows, evenly spread: (T, r, *rest).

        A unit of fewer than two dimensions is read whole. Only the sampled rows are read.
        """
        rows = unit.shape[0] if len(unit.shape) >= 2 else 0
        wanted = min(rows, max(1, math.ceil(rows * fraction)))
        if rows < 2 or wanted >= rows:
            return self.load(unit)[1]
        starts = sorted({(i * rows) // wanted for i in range(wanted)})
        out = torch.empty(
            (len(self.models), len(starts), *unit.shape[1:]), dtype=self.compute_dtype, device=self.device
        )
        base = torch.empty(out.shape[1:], dtype=self.compute_dtype, device=self.device)
        for j, r in enumerate(starts):  # each row read straight into its place, converted there
            self.base.read_into(unit.name, base[j : j + 1], r, r + 1)
        for i, model in enumerate(self.models):
            for j, r in enumerate(starts):
                model.read_into(unit.name, out[i, j : j + 1], r, r + 1)
            out[i].sub_(base)
        if not self.allow_nonfinite and not _all_finite(out):
            self.load(unit)  # names the culprit
        return self._scaled(out)

    def _refuse_nonfinite(self, unit: Unit, task_vectors: Tensor) -> None:
        """Name the checkpoint that holds NaN or Inf (looked up only once a unit has failed the check)."""
        if bool(torch.isfinite(task_vectors).all()):
            return  # the quick check's sum overflowed: every value is finite
        for ckpt in [self.base, *self.models]:
            tensor = ckpt.get(unit.name)
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    "contains NaN or Inf values (pass --allow-nonfinite to merge anyway)",
                    path=ckpt.label(),
                    parameter=unit.name,
                )
        culprit = next(
            m for m, tv in zip(self.models, task_vectors, strict=True) if not bool(torch.isfinite(tv).all())
        )
        raise CheckpointError(
            f"differs from the base by more than {self.compute_dtype} can hold (try --compute-dtype float64)",
            path=culprit.label(),
            parameter=unit.name,
        )

    def context(
        self,
        unit: Unit,
        base: Tensor | None = None,
        stats: Any = None,
        rows: tuple[int, int] | None = None,
        checked: bool = False,
    ) -> UnitContext:
        """The context a method sees for ``unit``; ``checked``: its task vectors were read with the NaN/Inf
        check (now or in an earlier full pass), so they are finite unless scaled up after it."""
        scales = self.task_scales
        return UnitContext(
            finite=checked
            and not self.allow_nonfinite
            and (scales is None or all(abs(s) <= 1 for s in scales)),
            name=unit.name,
            seed=self.seed,
            stats=stats,
            extras=self.extras,
            shape=unit.shape,
            base=base,
            stored_dtype=unit.base_dtype,
            rows=rows,
        )

    def memory_guard(self, unit: Unit) -> AbstractContextManager[None]:
        """Running out of memory on ``unit`` becomes a one-line error with its sizes."""
        return out_of_memory_as_error(unit, len(self.models), self.compute_dtype)

    # -- passes -------------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str) -> Any:
        disable = (not sys.stderr.isatty()) if self.progress is None else not self.progress
        return tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=False
        )

    def scan(self, fn: Callable[[Tensor, UnitContext], R], desc: str = "scanning") -> list[R]:
        """``fn(task_vectors, ctx)`` over every merged unit in sorted-name order (a first pass); in
        chunks of rows (``ctx.rows``) where :attr:`row_chunks` allows it, one result per chunk."""
        units = self.plan.merge_units
        self.passes += 1

        def one(piece: Piece) -> R:
            with self.memory_guard(piece.unit):
                base, task_vectors = self.load_piece(piece)
                return fn(task_vectors, self.context(piece.unit, base, rows=piece.rows))

        work = self.pieces(units)
        results = []
        with self._bar(sum(u.numel for u in units) * 4 * (len(self.models) + 1), desc) as bar:
            for piece, result in zip(work, self.executor.map(one, work), strict=True):
                results.append(result)
                bar.update(piece.unit.numel * 4 * (len(self.models) + 1) if piece.rows is None else 0)
        return results

    def stage_partials(self, stage: Stage, given: Any) -> Iterator[Any]:
        """``stage.map`` over every merged unit (or chunk of rows) in sorted-name order (one pass,
        or a sample of rows)."""
        units = self.plan.merge_units
        fraction = None
        if stage.sample is not None:
            fraction = min(1.0, stage.sample / max(1, sum(u.numel for u in units)))
        self.passes += fraction is None
        self.pass_log.append(stage.name if fraction is None else f"{stage.name} (sample)")
        work = [Piece(u, None) for u in units] if fraction is not None else self.pieces(units)
        reuse = self.reuses_buffers
        checked = self.checked_all

        def one(piece: Piece) -> Any:
            ctx = self.context(piece.unit, rows=piece.rows, checked=fraction is None)
            with self.memory_guard(piece.unit):
                if fraction is not None:
                    return stage.map(self.load_sample(piece.unit, fraction), ctx, given)
                return stage.map(self.load_piece(piece, reuse=reuse, check=not checked)[1], ctx, given)

        map_combined = getattr(self.executor, "map_combined", None)
        if stage.combine is not None and map_combined is not None:
            # a distributed executor combines each task's partials on its worker: fewer, same sum
            yield from map_combined(one, work, stage.combine)
            self.checked_all = self.checked_all or fraction is None
            return

        nbytes = 4 * (len(self.models) + 1)
        try:
            with self._bar(sum(u.numel for u in units) * nbytes, stage.name) as bar:
                for piece, partial in zip(work, self.executor.map(one, work), strict=True):
                    yield partial
                    bar.update(piece.unit.numel * nbytes if piece.rows is None else 0)
            self.checked_all = self.checked_all or fraction is None
        finally:
            self.release_buffers()

    def run_stages(self, stages: Sequence[Stage], deliver: Callable[[Any], None] | None = None) -> Any:
        """Run a method's stages; return the last fold's result (its statistics).

        With ``deliver``, a final fused stage is not run now but registered for the merge pass
        (:meth:`run`), which calls ``deliver(result)`` when its fold is known; the value returned
        is then the ``given`` of that fused stage (the statistics so far).
        """
        given: Any = None
        for i, stage in enumerate(stages):
            if stage.when is not None and not stage.when(given):
                continue
            if stage.fused and deliver is not None and i == len(stages) - 1:
                self._fused.append((stage, given, deliver))
                return stage.pending(given) if stage.pending is not None else given
            given = stage.fold(given, self.stage_partials(stage, given))
        return given

    def run(self, unit_fn: UnitFn, desc: str = "merging") -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, output tensor)`` for every unit; merged units go through ``unit_fn``.

        Units come in plan order, except those whose merge raised :class:`Deferred` (it needs a
        fused stage's result): they come last, merged again once the fused stages are folded.
        Units merged in chunks of rows (:attr:`row_chunks`) are put together here; a writer that
        takes rows should use :meth:`run_pieces` instead, so that no whole tensor is held.
        """
        return self.assemble(self.run_pieces(unit_fn, desc))

    def assemble(
        self, pieces: Iterator[tuple[str, tuple[int, int] | None, Tensor]]
    ) -> Iterator[tuple[str, Tensor]]:
        """Whole output tensors from :meth:`run_pieces`, each as soon as all its rows are in."""
        building: dict[str, tuple[Tensor, int]] = {}
        for name, rows, tensor in pieces:
            if rows is None:
                yield name, tensor
                continue
            unit = self._units[name]
            if name in building:
                whole, left = building.pop(name)
            else:
                whole, left = torch.empty(unit.shape, dtype=unit.out_dtype), unit.shape[0]
            whole[rows[0] : rows[1]] = tensor
            left -= rows[1] - rows[0]
            if left:
                building[name] = (whole, left)
            else:
                yield name, whole

    def pieces(self, units: Sequence[Unit]) -> list[Piece]:
        """The units as work items: merged units of more than ``chunk_bytes`` of task vectors are
        split into chunks of rows when :attr:`row_chunks` allows it."""
        out: list[Piece] = []
        per_entry = 4 * max(1, len(self.models))
        for unit in units:
            rows = unit.shape[0] if len(unit.shape) >= 2 else 0
            if not (
                self.row_chunks and unit.merge and rows > 1 and unit.numel * per_entry > self.chunk_bytes
            ):
                out.append(Piece(unit, None))
                continue
            step = max(1, self.chunk_bytes // (per_entry * (unit.numel // rows)))
            out.extend(Piece(unit, (r, min(rows, r + step))) for r in range(0, rows, step))
        return out

    def load_piece(self, piece: Piece, *, reuse: bool = False, check: bool = True) -> tuple[Tensor, Tensor]:
        """Like :meth:`load`, for one piece: the whole unit or only its rows."""
        return self._read(piece.unit, piece.rows, reuse, check)

    def run_pieces(
        self, unit_fn: UnitFn, desc: str = "merging"
    ) -> Iterator[tuple[str, tuple[int, int] | None, Tensor]]:
        """Yield ``(name, rows, output)`` for every unit, or every chunk of rows ``rows = (start,
        stop)`` of a unit merged in chunks (``rows`` is None for a whole unit)."""
        self.passes += 1
        fused, self._fused = self._fused, []
        if fused:
            self.pass_log.append("merge + " + " + ".join(stage.name for stage, _, _ in fused))
        else:
            self.pass_log.append("merge")
        partials: list[list[Any]] = [[] for _ in fused]
        reuse = self.reuses_buffers
        # fused stages see the task vectors themselves: those are checked when they read them
        check_merged = self.check_merged and not self.allow_nonfinite and not fused
        check_read = not (check_merged or self.checked_all)

        def merged_output(piece: Piece, base: Tensor, task_vectors: Tensor, ctx: UnitContext) -> Tensor:
            merged = unit_fn(task_vectors, ctx)
            if check_merged and not _all_finite(merged):
                self._refuse_nonfinite(piece.unit, task_vectors)  # raises unless a finite sum overflowed
            if tuple(merged.shape) != tuple(base.shape):
                raise RuntimeError(
                    f"{piece.unit.name}: method returned shape {tuple(merged.shape)}, expected {tuple(base.shape)}"
                )
            out = base + merged.to(base.dtype)  # never in place: ``base`` may be the caller's own tensor
            return out.to("cpu", piece.unit.out_dtype)

        def one(piece: Piece) -> tuple[Tensor | None, list[Any]]:
            unit = piece.unit
            with self.memory_guard(unit):
                if not unit.merge:
                    return self.base.get(unit.name).to(unit.out_dtype), []
                base, task_vectors = self.load_piece(piece, reuse=reuse, check=check_read)
                ctx = self.context(unit, base, rows=piece.rows, checked=not check_merged)
                try:
                    out: Tensor | None = merged_output(piece, base, task_vectors, ctx)
                except Deferred:
                    out = None
                # fused stages after the merge, which may leave in ctx.scratch what they can reuse
                return out, [stage.map(task_vectors, ctx, given) for stage, given, _ in fused]

        def size(piece: Piece) -> int:
            unit = piece.unit
            numel = (
                unit.numel
                if piece.rows is None
                else unit.numel // unit.shape[0] * (piece.rows[1] - piece.rows[0])
            )
            return numel * unit.base_dtype.itemsize * (len(self.models) + 1 if unit.merge else 1)

        work = self.pieces(self.plan.units)
        deferred: list[Piece] = []
        try:
            with self._bar(sum(size(w) for w in work), desc) as bar:
                bar.set_postfix_str(f"{len(self.plan.units)} parameters")
                for piece, (tensor, found) in zip(work, self.executor.map(one, work), strict=True):
                    if piece.unit.merge:
                        for store, partial in zip(partials, found, strict=True):
                            store.append(partial)
                    if tensor is None:
                        deferred.append(piece)
                    else:
                        yield piece.unit.name, piece.rows, tensor
                    bar.update(size(piece))
            for (stage, given, deliver), store in zip(fused, partials, strict=True):
                deliver(stage.fold(given, iter(store)))
            for piece in deferred:  # read again: their merge needed what the fused stages found
                with self.memory_guard(piece.unit):  # checked when first read
                    base, task_vectors = self.load_piece(piece, reuse=True, check=False)
                    ctx = self.context(piece.unit, base, rows=piece.rows, checked=not check_merged)
                    merged = merged_output(piece, base, task_vectors, ctx)
                yield piece.unit.name, piece.rows, merged
        finally:
            self.release_buffers()

    def run_deltas(
        self, unit_fn: UnitFn, units: Sequence[Unit], desc: str = "merging"
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, merged task vector)`` for ``units`` (merged ones), in order, in the compute
        dtype on the CPU: what a LoRA output factorises, without the base added and cast away."""
        fused, self._fused = self._fused, []
        for stage, given, deliver in fused:  # no merge pass to fuse with here: a pass of their own
            deliver(stage.fold(given, self.stage_partials(stage, given)))
        self.passes += 1

        def one(unit: Unit) -> Tensor:
            base, task_vectors = self.load(unit)
            return unit_fn(task_vectors, self.context(unit, base)).to("cpu")

        with self._bar(
            sum(u.numel * u.base_dtype.itemsize * (len(self.models) + 1) for u in units), desc
        ) as bar:
            for unit, delta in zip(units, self.executor.map(one, units), strict=True):
                yield unit.name, delta
                bar.update(unit.numel * unit.base_dtype.itemsize * (len(self.models) + 1))
