"""The atomic, streaming safetensors writer.

Every output name, shape and dtype is known once a merge is planned, so the writer lays out each
shard's header first and writes tensors straight to their offsets as they are computed: the output
never sits in memory whole. Everything goes to a hidden staging folder next to the destination and
is renamed into place only when complete, so a killed run never leaves a folder that looks finished.
Writing and hashing happen in a background thread, in the order asked, while the next tensors are
computed; a failure there comes back from the next call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import queue
import shutil
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import signals
from ..errors import WeightWeavingError
from ..files import copy_regular
from .manifest import write_manifest
from .safetensors_file import DTYPE_NAMES

STAGING_MARK = ".weightweaving-partial-"
LOCK_MARK = ".weightweaving-lock"


@dataclass(frozen=True)
class OutputEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @functools.cached_property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _layout(entries: Sequence[OutputEntry], max_shard_bytes: int | None) -> list[list[OutputEntry]]:
    shards: list[list[OutputEntry]] = [[]]
    size = 0
    for entry in entries:
        if max_shard_bytes and shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out_dir: Path, *, locked: bool = False) -> None:
    """Remove staging folders (and ``-old`` folders) that earlier runs, since killed, left next to ``out_dir``.

    With the output's lock held (``locked``), every such folder is a dead run's: a live run would hold
    the lock. Without it, a folder is removed only when the PID in its name is gone.
    """
    parent = out_dir.parent
    prefix = f".{out_dir.name}{STAGING_MARK}"
    if not parent.is_dir():
        return
    for item in parent.iterdir():
        if item.name.startswith(prefix):
            pid_text = item.name[len(prefix) :].split("-", 1)[0]
            if locked or (pid_text.isdigit() and not _pid_alive(int(pid_text))):
                shutil.rmtree(item, ignore_errors=True)


def output_path(out: str | os.PathLike[str]) -> Path:
    """Where an output really goes: absolute, through a symlink at the output's own name."""
    path = Path(os.path.abspath(out))
    try:
        if path.is_symlink():  # write where the link points, so the rename stays on that disk
            path = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # a link loop; a link into nowhere is written through
        if isinstance(exc, FileNotFoundError):
            return Path(os.path.realpath(path))
        raise WeightWeavingError(
            "cannot resolve the output path: Too many levels of symbolic links", path=out
        ) from None
    return path


_HELD: dict[Path, list[int]] = {}  # output -> [lock fd, depth]: one process locks an output once


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``out_dir`` (a ``flock`` on a file next to it) while inside.

    A second run writing the same output at the same time stops with one line. The lock dies with its
    process, so a ``kill -9`` never blocks the next run. Yields whether the lock is held (not when the
    parent folder does not exist yet, or the file system has no locks: the writer locks once it exists).
    """
    if out_dir in _HELD:
        _HELD[out_dir][1] += 1
        try:
            yield True
        finally:
            _HELD[out_dir][1] -= 1
        return
    lock_path = out_dir.parent / f".{out_dir.name}{LOCK_MARK}"
    fd = _acquire(lock_path, out_dir) if out_dir.parent.is_dir() else None
    if fd is None:
        yield False
        return
    _HELD[out_dir] = [fd, 1]
    try:
        yield True
    finally:
        del _HELD[out_dir]
        with signals.deferred():
            try:
                os.unlink(lock_path)  # remove before unlocking: a waiter then re-checks the inode
            except OSError:
                pass
            os.close(fd)


def _acquire(lock_path: Path, out_dir: Path) -> int | None:
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None  # cannot create it (a read-only folder): the writer reports the real problem
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise WeightWeavingError(
                f"another weightweaving run{who} is writing this output folder now; "
                "wait for it to finish or choose another --out",
                path=out_dir,
            ) from None
        except OSError:  # no locks on this file system
            os.close(fd)
            return None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)  # the holder finished and removed the file between our open and lock: again


class SafetensorsWriter:
    """Writes ``model.safetensors`` (or shards plus an index) into ``out_dir``, atomically.

    Use as a context manager: leaving it with an exception removes everything it wrote.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        entries: Sequence[OutputEntry],
        *,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        basename: str = "model",
    ) -> None:
        self.out_dir = output_path(out_dir)
        self.basename = basename
        self._lock: contextlib.AbstractContextManager[bool] | None = None
        self._check_target(overwrite)
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot create the output folder: {exc.strerror}", path=parent
            ) from None
        if not os.access(parent, os.W_OK):
            raise WeightWeavingError("the output folder's parent is not writable", path=parent)
        self._lock = output_lock(self.out_dir)  # held until commit or abort: a second run stops here
        locked = self._lock.__enter__()
        try:
            self._check_target(overwrite)  # again, under the lock
            clean_stale_staging(self.out_dir, locked=locked)
        except BaseException:
            self._release_lock()
            raise
        self.staging = parent / f".{self.out_dir.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self._files: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self._nbytes: dict[str, int] = {}
        self._fds: list[int] = []
        # SHA-256 of each weight file, fed as its bytes are written in order (``None``: re-read at commit)
        self._hashes: dict[int, tuple[str, hashlib._Hash | None, int]] = {}
        self._written: set[str] = set()
        self._rows_written: dict[str, int] = {}
        self._shards = _layout(entries, max_shard_bytes)
        self._entries = {e.name: e for e in entries}
        if len(self._entries) != len(entries):
            raise ValueError("duplicate output tensor names")
        self._committed = False
        # (name, fd, offset, bytes, digest to feed or None) for the background thread; a few at most
        self._jobs: queue.Queue[tuple[str, int, int, Any, Any] | None] = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        try:
            self.staging.mkdir()
            self._prepare()
        except OSError as exc:
            self.abort()
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=self.out_dir
            ) from None
        except BaseException:  # Ctrl-C while laying out: leave nothing behind
            self.abort()
            raise

    def _check_target(self, overwrite: bool) -> None:
        if self.out_dir.exists() and not overwrite:
            raise WeightWeavingError(
                "the output folder exists; pass --overwrite to replace it", path=self.out_dir
            )
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise WeightWeavingError("the output path exists and is not a folder", path=self.out_dir)

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    # -- layout -------------------------------------------------------------------------------------
    def shard_names(self) -> list[str]:
        n = len(self._shards)
        if n == 1:
            return [f"{self.basename}.safetensors"]
        return [f"{self.basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def _prepare(self) -> None:
        self.weight_map: dict[str, str] = {}
        for shard, file_name in zip(self._shards, self.shard_names(), strict=True):
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            for entry in shard:
                header[entry.name] = {
                    "dtype": DTYPE_NAMES[entry.dtype],
                    "shape": list(entry.shape),
                    "data_offsets": [offset, offset + entry.nbytes],
                }
                offset += entry.nbytes
                self.weight_map[entry.name] = file_name
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
            fd = os.open(self.staging / file_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            head = struct.pack("<Q", len(raw)) + raw
            os.pwrite(fd, head, 0)
            self._hashes[fd] = (file_name, hashlib.sha256(head), len(head))
            data_start = 8 + len(raw)
            os.ftruncate(fd, data_start + offset)
            pos = 0
            for entry in shard:
                self._files[entry.name] = (fd, data_start + pos)
                self._nbytes[entry.name] = entry.nbytes
                pos += entry.nbytes
        self.total_size = sum(e.nbytes for e in self._entries.values())

    # -- writing ------------------------------------------------------------------------------------
    def write(self, name: str, tensor: Tensor) -> None:
        """Write one tensor (already of its planned dtype and shape) to its place."""
        entry = self._entries[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {entry.shape} {entry.dtype}"
            )
        fd, offset = self._files[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._submit(name, fd, offset, data)
        self._written.add(name)

    def write_rows(self, name: str, start: int, tensor: Tensor) -> None:
        """Write rows ``start:start + len(tensor)`` of one tensor (the rest comes in other calls)."""
        entry = self._entries[name]
        rows = entry.shape[0] if entry.shape else 0
        if (
            tuple(tensor.shape[1:]) != entry.shape[1:]
            or tensor.dtype != entry.dtype
            or not (0 <= start and start + tensor.shape[0] <= rows)
        ):
            raise ValueError(
                f"{name}: rows {start}+{tuple(tensor.shape)} {tensor.dtype} do not fit {entry.shape} {entry.dtype}"
            )
        fd, offset = self._files[name]
        row_bytes = entry.nbytes // rows
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._submit(name, fd, offset + start * row_bytes, data)
        self._rows_written[name] = self._rows_written.get(name, 0) + tensor.shape[0]
        if self._rows_written[name] == rows:
            self._written.add(name)

    def _submit(self, name: str, fd: int, position: int, data: Any) -> None:
        """Hand bytes to the background thread (which keeps ``data``, and so the tensor, alive until
        written); feed the file's digest too when they come next in file order."""
        self._raise_failure()
        file_name, digest, expected = self._hashes[fd]
        if digest is not None and position == expected and name not in self._written:
            self._hashes[fd] = (file_name, digest, expected + data.nbytes)  # in order: hashed as written
        else:  # written out of order: hash the file at commit instead
            self._hashes[fd] = (file_name, None, expected)
            digest = None
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="weightweaving-writer", daemon=True)
            self._thread.start()
        self._jobs.put((name, fd, position, data, digest))

    def _drain(self) -> None:
        """The background thread: write (and hash) each job in order; after a failure, skip the rest."""
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._failure is not None:
                    continue
                name, fd, position, data, digest = job
                view = data.data
                done = 0
                try:
                    while done < len(view):
                        done += os.pwrite(fd, view[done:], position + done)
                    if digest is not None:
                        digest.update(view)
                except OSError as exc:
                    self._failure = WeightWeavingError(
                        f"cannot write the output: {exc.strerror or exc}", path=self.out_dir, parameter=name
                    )
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._failure = exc
            finally:
                self._jobs.task_done()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def flush(self) -> None:
        """Wait until everything handed over is written; raise what went wrong there."""
        if self._thread is not None:
            self._jobs.join()
        self._raise_failure()

    def _stop(self) -> None:
        """Let the background thread finish what it holds, then end it."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def direct_layout(self) -> dict[str, tuple[str, int, int]]:
        """Where each tensor goes: ``name -> (staging file's absolute path, byte offset, bytes)``.

        For writers in other processes (Ray workers) that write their tensors themselves with
        ``pwrite`` into the laid-out files; they report each one done with :meth:`mark_written`.
        """
        files = {
            fd: str((self.staging / file_name).absolute()) for fd, (file_name, _, _) in self._hashes.items()
        }
        return {name: (files[fd], offset, self._nbytes[name]) for name, (fd, offset) in self._files.items()}

    def mark_written(self, name: str) -> None:
        """``name`` was written whole by another process (its file is then hashed at commit)."""
        fd, _ = self._files[name]
        file_name, _, expected = self._hashes[fd]
        self._hashes[fd] = (file_name, None, expected)
        self._written.add(name)

    def add_file(self, name: str, content: bytes) -> None:
        try:
            (self.staging / name).write_bytes(content)
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=self.out_dir
            ) from None

    def copy_file(self, source: Path) -> None:
        try:
            copy_regular(source, self.staging / source.name)  # only a regular file, only its size
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot copy '{source.name}' into the output: {exc.strerror or exc}", path=self.out_dir
            ) from None

    def commit(self) -> Path:
        """Finish: check that everything was written, fsync, and move the folder into place."""
        self.flush()
        self._stop()
        missing = set(self._entries) - self._written
        if missing:
            raise RuntimeError(
                f"writer committed with {len(missing)} tensors unwritten, e.g. {sorted(missing)[0]}"
            )
        try:
            if len(self._shards) > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
                self.add_file(f"{self.basename}.safetensors.index.json", json.dumps(index, indent=2).encode())
            for fd in self._fds:
                os.fsync(fd)
                os.close(fd)
            self._fds = []
            write_manifest(self.staging, self._streamed_hashes())  # last, so it covers every file
            if self.out_dir.exists() and not self.overwrite:
                raise FileExistsError(errno.EEXIST, "the output folder appeared while the merge ran")
            try:
                with signals.deferred():  # never stopped between the renames: nothing moved aside for good
                    old: Path | None = None
                    if self.out_dir.exists():
                        old = self.staging.with_name(self.staging.name + "-old")  # stale-cleaned too
                        os.rename(self.out_dir, old)
                    os.rename(self.staging, self.out_dir)
                    self._committed = True
                    if old is not None:
                        shutil.rmtree(old, ignore_errors=True)
            except KeyboardInterrupt:  # held back until the output was in place: say so
                if self._committed:
                    raise signals.InterruptedAfterOutput(self.out_dir) from None
                raise
            _fsync_dir(self.out_dir.parent)
        except OSError as exc:
            self.abort()
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=self.out_dir
            ) from None
        finally:
            if self._committed:
                self._release_lock()
        return self.out_dir

    def _streamed_hashes(self) -> dict[str, str]:
        """Digests of the weight files hashed while written, for those written whole and in order."""
        known = {}
        for file_name, digest, length in self._hashes.values():
            if digest is not None and (self.staging / file_name).stat().st_size == length:
                known[file_name] = digest.hexdigest()
        return known

    def abort(self) -> None:
        """Remove everything this writer wrote (a signal waits until the staging folder is gone)."""
        with signals.deferred():
            self._stop()
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds = []
            if self.staging.exists():
                shutil.rmtree(self.staging, ignore_errors=True)
            self._release_lock()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._committed:
            self.abort()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
