"""Careful file access: only regular files, never more bytes than they declare, one-line errors.

Every input (checkpoints, shard indexes, YAML configs, files copied into an output) goes through
:func:`check_regular` before a byte is read: a device that never ends (``/dev/zero``), a FIFO that
blocks, a socket, or a ``/proc`` file whose size is not what ``stat`` says is refused by name. Reads
are bounded by the size ``stat`` reported, and every ``OSError`` becomes ``<file>: <problem>``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, WeightWeavingError

KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}
_KERNEL_FS: dict[int, str] = {}  # st_dev of /proc and /sys: their files' sizes are not their contents


def _kernel_fs() -> dict[int, str]:
    if not _KERNEL_FS:
        for root in ("/proc", "/sys"):
            try:
                _KERNEL_FS[os.stat(root).st_dev] = root
            except OSError:
                pass
        _KERNEL_FS.setdefault(-1, "")
    return _KERNEL_FS


def problem(exc: OSError) -> str:
    """The readable part of an ``OSError`` (``Too many levels of symbolic links``)."""
    if exc.errno == errno.ENAMETOOLONG:
        return "File name too long"
    return exc.strerror or str(exc)


def os_error(exc: OSError, path: object, what: str = "cannot read") -> WeightWeavingError:
    """``<path>: <what>: <problem>`` for an ``OSError`` met while handling ``path``."""
    return CheckpointError(f"{what}: {problem(exc)}", path=path)


@dataclass(frozen=True)
class Snapshot:
    """What ``stat`` said of a file when it was planned; a later change means it was replaced."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Snapshot:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self, st: os.stat_result) -> str | None:
        """Why ``st`` is not the planned file, or ``None``."""
        # dev -1: a copy pickled for another machine, where the shared file system has its own dev
        if st.st_ino != self.ino or (self.dev != -1 and st.st_dev != self.dev):
            return "the file was replaced while the merge ran"
        if st.st_size != self.size:
            return f"the file changed size while the merge ran ({self.size} -> {st.st_size} bytes)"
        if st.st_mtime_ns != self.mtime_ns:
            return "the file was modified while the merge ran"
        return None


def check_regular(path: Path, st: os.stat_result | None = None, *, folder_ok: bool = False) -> os.stat_result:
    """``stat`` ``path`` (following links) and refuse it unless it is a regular file (or a folder)."""
    if st is None:
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise CheckpointError("no such file or folder", path=path) from None
            raise os_error(exc, path) from None
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFDIR and folder_ok:
        return st
    if fmt != stat.S_IFREG:
        kind = KINDS.get(fmt, "a special file")
        raise CheckpointError(f"is {kind}, not a regular file; refusing to read it", path=path)
    root = _kernel_fs().get(st.st_dev)
    if root:
        raise CheckpointError(
            f"is a file of the kernel's {root} file system (its size is not its content); refusing to read it",
            path=path,
        )
    return st


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open a regular file for reading; refuse anything else, even if swapped in after ``stat``.

    ``O_NONBLOCK`` keeps a FIFO put in the file's place from blocking the ``open`` itself.
    """
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        st = check_regular(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def pread_exact(fd: int, size: int, offset: int, path: object) -> bytes:
    """Exactly ``size`` bytes at ``offset``, however short the reads the file system returns."""
    chunks = []
    got = 0
    while got < size:
        try:
            chunk = os.pread(fd, size - got, offset + got)
        except OSError as exc:
            raise os_error(exc, path) from None
        if not chunk:
            raise CheckpointError(
                f"the file ended after {offset + got} bytes: it was truncated while being read", path=path
            )
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_small_file(path: Path, limit: int) -> bytes:
    """The whole content of a small regular file (an index, a config), at most ``limit`` bytes."""
    fd, st = open_regular(path)
    try:
        if st.st_size > limit:
            raise CheckpointError(
                f"is {st.st_size} bytes, over the {limit} byte limit for this kind of file", path=path
            )
        data = pread_exact(fd, st.st_size, 0, path)
        if pread_exact_or_empty(fd, st.st_size, path):
            raise CheckpointError("holds more bytes than its size says; refusing to read it", path=path)
        return data
    finally:
        os.close(fd)


def pread_exact_or_empty(fd: int, offset: int, path: object) -> bytes:
    """One byte at ``offset`` or nothing: a regular file ends where its size says."""
    try:
        return os.pread(fd, 1, offset)
    except OSError as exc:
        raise os_error(exc, path) from None


def copy_regular(source: Path, target: Path) -> None:
    """Copy a regular file byte for byte (no more than its size), keeping its modification time."""
    fd, st = open_regular(source)
    try:
        with open(target, "xb") as out:
            offset = 0
            while offset < st.st_size:
                chunk = pread_exact(fd, min(1 << 22, st.st_size - offset), offset, source)
                out.write(chunk)
                offset += len(chunk)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)
