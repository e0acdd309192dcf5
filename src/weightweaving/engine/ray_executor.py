"""The Ray executor: a merge's passes as Ray tasks over groups of units, balanced by bytes.

What goes where:

- The per-unit function (a closure over the runner) is pickled once per pass and put in Ray's
  object store; tasks get its reference plus a list of work items (units or chunks of rows).
- Every checkpoint it reaches is pickled apart, once per executor, by reference: a safetensors
  file as its absolute path and parsed header (each worker reopens it on its first read, from the
  storage every node sees), an in-memory or ``.pt`` state dict as its tensors, put in the object
  store once. A worker keeps what it unpickled for the next task of the same merge.
- First passes (a stage's ``map``, a ``scan``) return their small partials to the driver, which
  folds them in sorted-unit order exactly as the local executor does (histograms and counts are
  summed, nothing is approximated).
- The merge pass (:meth:`RayExecutor.write_merge`) writes each output tensor from the worker that
  merged it, with ``pwrite`` at the offset the writer laid out in its staging folder; only names,
  fused stages' partials and the units to merge again come back. The driver then writes the index,
  manifest and provenance and renames the folder into place, as for a local run.
- A task that raises hands our own exception back (one line at the CLI, exit 2); a worker process
  that dies is retried by Ray (rewriting the same bytes at the same offsets).

Random draws are keyed by the seed and the parameter's name (:meth:`UnitContext.generator`), never
by the worker or the order, so DARE and the random pool give the local run's bytes too.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from ..checkpoints.base import Checkpoint
from ..errors import OptionError, WeightWeavingError
from ..methods.base import Deferred, Stage, UnitContext
from .executors import LocalExecutor

if TYPE_CHECKING:
    from ..checkpoints.writer import SafetensorsWriter
    from .execute import Piece, Runner, UnitFn

log = logging.getLogger("weightweaving")

T = TypeVar("T")
R = TypeVar("R")

INSTALL = "--executor ray needs Ray, which is not installed: pip install 'weightweaving[ray]'"
TASKS_PER_WORKER = 4  # a pass is cut in about this many groups per worker (balance), ...
TASK_BYTES = 1 << 30  # ... of at most this many input bytes each (unless one unit is larger)
MAX_RETRIES = 3  # a task whose worker dies is run again this many times


def import_ray() -> Any:
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OptionError(INSTALL) from None
    return ray


# -- pickling: checkpoints by reference ---------------------------------------------------------------


class _Pickler:
    """cloudpickle with every :class:`Checkpoint` replaced by a persistent id (put apart, once)."""

    def __init__(self, put: Callable[[Checkpoint], str]) -> None:
        self.put = put

    def dumps(self, obj: Any) -> bytes:
        from ray import cloudpickle

        put = self.put

        class Pickler(cloudpickle.Pickler):  # type: ignore[misc,name-defined]
            def persistent_id(self, value: Any) -> str | None:
                return put(value) if isinstance(value, Checkpoint) else None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return buffer.getvalue()


_WORKER_CACHE: OrderedDict[str, Any] = OrderedDict()  # on a worker: what it unpickled, by object id
_WORKER_CACHE_SIZE = 32


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key in _WORKER_CACHE:
        _WORKER_CACHE.move_to_end(key)
        return _WORKER_CACHE[key]
    value = make()
    _WORKER_CACHE[key] = value
    while len(_WORKER_CACHE) > _WORKER_CACHE_SIZE:
        _, old = _WORKER_CACHE.popitem(last=False)
        if isinstance(old, Checkpoint):
            old.close()
    return value


def _load_payload(payload: list[Any], checkpoints: dict[str, Any]) -> Any:
    """On a worker: the function (or job) of a pass, its checkpoints resolved from the object store."""
    import ray

    def checkpoint(key: str) -> Checkpoint:
        ref = checkpoints[key]
        return _cached(ref.hex(), lambda: ray.get(ref))  # type: ignore[no-any-return]

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            return checkpoint(str(pid))

    (ref,) = payload
    return _cached(ref.hex(), lambda: Unpickler(io.BytesIO(ray.get(ref))).load())


def _threads(count: int) -> None:
    """Compute with the driver's number of torch threads: an SVD's last bits depend on it."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _pause_once(pause: tuple[str, float] | None) -> None:
    """Test hook: the first task anywhere to get here writes its pid to ``marker`` and sleeps (so a
    test can kill its worker mid-task); every later task, the retry included, goes on at once."""
    if pause is None:
        return
    marker, seconds = pause
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(seconds)


def _map_task(
    payload: list[Any],
    checkpoints: dict[str, Any],
    items: list[Any],
    threads: int,
    pause: tuple[str, float] | None,
) -> list[Any]:
    _threads(threads)
    fn = _load_payload(payload, checkpoints)
    _pause_once(pause)
    return [fn(item) for item in items]


def _combine_task(
    payload: list[Any],
    checkpoints: dict[str, Any],
    items: list[Any],
    combine: Callable[[Any, Any], Any],
    threads: int,
    pause: tuple[str, float] | None,
) -> Any:
    """A stage whose partials only add up: the task's partials combined into one."""
    _threads(threads)
    fn = _load_payload(payload, checkpoints)
    _pause_once(pause)
    return functools.reduce(combine, (fn(item) for item in items))


# -- the merge pass on a worker -----------------------------------------------------------------------


@dataclass
class MergeJob:
    """What every task of a merge pass shares (pickled once per pass)."""

    runner: Runner
    unit_fn: UnitFn
    fused: list[tuple[Stage, Any]]  # fused stages: their map and given
    layout: dict[str, tuple[str, int, int]]  # name -> (file, offset, bytes), from the writer
    out_dir: str = ""  # the output folder, as errors name it


def _write_at(path: str, offset: int, tensor: Tensor, fds: dict[str, int]) -> None:
    if path not in fds:
        fds[path] = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    view = data.data
    done = 0
    while done < len(view):
        done += os.pwrite(fds[path], view[done:], offset + done)


def merge_pieces(
    job: MergeJob, pieces: Sequence[Piece], deferred_round: bool
) -> tuple[list[bool], list[list[Any]]]:
    """Merge ``pieces`` and write them at their offsets; per piece: whether its merge was deferred
    (it needs a fused stage's result) and the fused stages' partials (none in the second round)."""
    runner = job.runner
    done: list[bool] = []
    partials: list[list[Any]] = []
    fds: dict[str, int] = {}
    try:
        for piece in pieces:
            unit = piece.unit
            path, offset, nbytes = job.layout[unit.name]
            if piece.rows is not None:
                offset += piece.rows[0] * (nbytes // unit.shape[0])
            found: list[Any] = []
            with runner.memory_guard(unit):
                if not unit.merge:
                    out: Tensor | None = runner.base.get(unit.name).to(unit.out_dtype)
                else:
                    base, task_vectors = runner.load_piece(piece)
                    ctx = runner.context(unit, base, rows=piece.rows)
                    try:
                        out = _merged(job.unit_fn, unit.name, unit.out_dtype, base, task_vectors, ctx)
                    except Deferred:
                        if deferred_round:
                            raise
                        out = None
                    if not deferred_round:
                        found = [stage.map(task_vectors, ctx, given) for stage, given in job.fused]
            if out is not None:
                try:
                    _write_at(path, offset, out, fds)
                except OSError as exc:  # as the local writer says it (a full disk, a lost mount)
                    raise WeightWeavingError(
                        f"cannot write the output: {exc.strerror or exc}",
                        path=job.out_dir,
                        parameter=unit.name,
                    ) from None
            done.append(out is not None)
            partials.append(found)
        try:
            for fd in fds.values():
                os.fsync(fd)  # on the shared storage before the driver commits
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=job.out_dir
            ) from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return done, partials


def _merged(
    unit_fn: UnitFn, name: str, out_dtype: torch.dtype, base: Tensor, task_vectors: Tensor, ctx: UnitContext
) -> Tensor:
    merged = unit_fn(task_vectors, ctx)
    if tuple(merged.shape) != tuple(base.shape):
        raise RuntimeError(
            f"{name}: method returned shape {tuple(merged.shape)}, expected {tuple(base.shape)}"
        )
    return (base + merged.to(base.dtype)).to("cpu", out_dtype)


def _merge_task(
    payload: list[Any],
    checkpoints: dict[str, Any],
    pieces: list[Any],
    deferred_round: bool,
    threads: int,
    pause: tuple[str, float] | None,
) -> tuple[list[bool], list[list[Any]]]:
    _threads(threads)
    job = _load_payload(payload, checkpoints)
    _pause_once(pause)
    return merge_pieces(job, pieces, deferred_round)


# -- the driver ---------------------------------------------------------------------------------------


def _weight(item: Any) -> int:
    """Input bytes of a work item (a Unit, or a Piece of one): what groups are balanced by."""
    unit = getattr(item, "unit", item)
    numel = getattr(unit, "numel", 1)
    rows = getattr(item, "rows", None)
    if rows is not None and unit.shape:
        numel = numel // unit.shape[0] * (rows[1] - rows[0])
    dtype = getattr(unit, "base_dtype", torch.float32)
    return max(1, numel * dtype.itemsize)


def balanced_groups(items: Sequence[T], parallelism: int, task_bytes: int = TASK_BYTES) -> list[list[T]]:
    """Cut ``items`` (in order) into contiguous groups of about equal bytes: about
    ``TASKS_PER_WORKER`` groups per worker, none above ``task_bytes`` unless one item is."""
    if not items:
        return []
    weights = [_weight(item) for item in items]
    total = sum(weights)
    target = max(1, min(task_bytes, -(-total // max(1, parallelism * TASKS_PER_WORKER))))
    groups: list[list[T]] = [[]]
    size = 0
    for item, weight in zip(items, weights, strict=True):
        if groups[-1] and size + weight > target:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += weight
    return groups


class RayExecutor:
    """Runs a merge's passes as Ray tasks; ``address`` as ``ray.init`` takes it (``None``:
    ``RAY_ADDRESS`` or a new local cluster). Inputs and output must be on a path every node sees."""

    def __init__(
        self,
        address: str | None = None,
        *,
        task_bytes: int = TASK_BYTES,
        max_retries: int = MAX_RETRIES,
        threads: int | None = None,
    ) -> None:
        self.ray = import_ray()
        self.address = address
        self.task_bytes = task_bytes
        self.max_retries = max_retries
        # torch threads per task: the driver's, so that SVD-based methods (TSV, ISO-C, ISO-CTS)
        # give the local run's bytes; each task still reserves one CPU of the cluster
        self.threads = torch.get_num_threads() if threads is None else max(1, threads)
        self._pause: str | None = None  # test hook (see _pause_once): a marker file's path ...
        self._pause_seconds = 120.0  # ... and how long the first task sleeps
        self._checkpoints: dict[int, tuple[Checkpoint, str, Any]] = {}  # id -> (kept alive, key, ref)
        self._remote: dict[str, Any] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # a closure that reaches the runner pickles its executor too: on a worker it runs in place
        return (LocalExecutor, ())

    @property
    def _pause_arg(self) -> tuple[str, float] | None:
        return None if self._pause is None else (self._pause, self._pause_seconds)

    # -- cluster -------------------------------------------------------------------------------
    def _start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
                raise WeightWeavingError(
                    f"cannot start or join the Ray cluster ({where}): {_first_line(exc)}"
                ) from None
        if not self._remote:
            options = {"num_cpus": 1, "max_retries": self.max_retries, "retry_exceptions": False}
            self._remote = {
                "map": ray.remote(**options)(_map_task),
                "merge": ray.remote(**options)(_merge_task),
                "combine": ray.remote(**options)(_combine_task),
            }

    @property
    def parallelism(self) -> int:
        """How many tasks the cluster runs at once (its CPUs)."""
        self._start()
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def _put_checkpoint(self, ckpt: Checkpoint) -> str:
        known = self._checkpoints.get(id(ckpt))
        if known is None:
            key = str(len(self._checkpoints))
            known = (ckpt, key, self.ray.put(ckpt))  # once: a state dict's tensors go over once
            self._checkpoints[id(ckpt)] = known
        return known[1]

    def _payload(self, obj: Any) -> tuple[list[Any], dict[str, Any]]:
        blob = _Pickler(self._put_checkpoint).dumps(obj)
        refs = {key: ref for _, key, ref in self._checkpoints.values()}
        return [self.ray.put(blob)], refs

    def _results(self, calls: Iterable[Any]) -> Iterator[Any]:
        """Results of the task submitted by each call, in order, with a bounded number in flight;
        a task's exception comes back as itself (our one-line errors stay one line)."""
        ray = self.ray
        window: deque[Any] = deque()
        limit = 2 * self.parallelism
        try:
            for submit in calls:
                window.append(submit())
                if len(window) >= limit:
                    yield self._get(window.popleft())
            while window:
                yield self._get(window.popleft())
        finally:
            for ref in window:  # interrupted: no task of this pass goes on writing
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # pragma: no cover - already finished
                    pass

    def _get(self, ref: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if cause is not None:
                raise cause from None
            raise WeightWeavingError(f"a Ray task failed: {_first_line(exc)}") from None
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError,
        ) as exc:
            raise WeightWeavingError(
                f"a Ray worker died {self.max_retries + 1} times running the same task: {_first_line(exc)}"
            ) from None

    # -- the executor interface -----------------------------------------------------------------
    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn`` over ``items`` on the cluster, results in order (first passes: small partials)."""
        self._start()
        work = list(items)
        if not work:
            return
        payload, refs = self._payload(fn)
        remote = self._remote["map"]
        groups = balanced_groups(work, self.parallelism, self.task_bytes)
        calls = (
            lambda g=group: remote.remote(payload, refs, g, self.threads, self._pause_arg) for group in groups
        )
        for results in self._results(calls):
            yield from results

    def map_combined(
        self, fn: Callable[[T], R], items: Iterable[T], combine: Callable[[R, R], R]
    ) -> Iterator[R]:
        """Like :meth:`map` for partials that only add up: one ``combine``-d partial per task."""
        self._start()
        work = list(items)
        if not work:
            return
        payload, refs = self._payload(fn)
        remote = self._remote["combine"]
        groups = balanced_groups(work, self.parallelism, self.task_bytes)
        calls = (
            lambda g=group: remote.remote(payload, refs, g, combine, self.threads, self._pause_arg)
            for group in groups
        )
        yield from self._results(calls)

    def write_merge(
        self, runner: Runner, unit_fn: UnitFn, writer: SafetensorsWriter, desc: str = "merging"
    ) -> None:
        """The merge pass: workers merge groups of units and write them into ``writer``'s files.

        Fused stages (``runner.run_stages(..., deliver)``) run with it: their partials come back and
        are folded here in sorted-unit order; units whose merge needed that result are merged again.
        """
        self._start()
        runner.passes += 1
        fused, runner._fused = runner._fused, []
        runner.pass_log.append("merge" + "".join(f" + {stage.name}" for stage, _, _ in fused))
        layout = writer.direct_layout()
        pieces = runner.pieces(runner.plan.units)
        rows_left: dict[str, int] = {}  # units merged in chunks of rows: rows not yet written
        deferred = self._merge_round(runner, unit_fn, pieces, fused, layout, writer, rows_left, desc)
        if deferred:  # read again: their merge needed what the fused stages found
            self._merge_round(runner, unit_fn, deferred, None, layout, writer, rows_left, desc)

    def _merge_round(
        self,
        runner: Runner,
        unit_fn: UnitFn,
        pieces: list[Piece],
        fused: list[tuple[Stage, Any, Callable[[Any], None]]] | None,
        layout: dict[str, tuple[str, int, int]],
        writer: SafetensorsWriter,
        rows_left: dict[str, int],
        desc: str,
    ) -> list[Piece]:
        """One round of tasks over ``pieces``; ``fused`` None: the second round (deferred units)."""
        second = fused is None
        fused = fused or []
        job = MergeJob(
            runner, unit_fn, [(stage, given) for stage, given, _ in fused], layout, str(writer.out_dir)
        )
        payload, refs = self._payload(job)
        remote = self._remote["merge"]
        groups = balanced_groups(pieces, self.parallelism, self.task_bytes)
        calls = (
            lambda g=group: remote.remote(payload, refs, g, second, self.threads, self._pause_arg)
            for group in groups
        )
        partials: list[list[Any]] = [[] for _ in fused]
        deferred: list[Piece] = []
        with runner._bar(sum(_weight(p) * (len(runner.models) + 1) for p in pieces), desc) as bar:
            for group, (done, found) in zip(groups, self._results(calls), strict=True):
                for piece, ok, parts in zip(group, done, found, strict=True):
                    if piece.unit.merge and not second:
                        for store, part in zip(partials, parts, strict=True):
                            store.append(part)
                    if not ok:
                        deferred.append(piece)
                    elif piece.rows is None:
                        writer.mark_written(piece.unit.name)
                    else:
                        name = piece.unit.name
                        left = rows_left.get(name, piece.unit.shape[0]) - (piece.rows[1] - piece.rows[0])
                        rows_left[name] = left
                        if left == 0:
                            writer.mark_written(name)
                    bar.update(_weight(piece) * (len(runner.models) + 1))
        for (stage, given, deliver), store in zip(fused, partials, strict=True):
            deliver(stage.fold(given, iter(store)))
        return deferred


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
