"""The atomic, streaming safetensors writer.

Every output name, shape and dtype is known once a merge is planned, so the writer lays out each
shard's header first and writes tensors straight to their offsets as they are computed: the output
never sits in memory whole. Everything goes to a hidden staging folder next to the destination and
is renamed into place only when complete, so a killed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import WeightWeavingError
from .manifest import write_manifest
from .safetensors_file import DTYPE_NAMES

STAGING_MARK = ".weightweaving-partial-"


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


def clean_stale_staging(out_dir: Path) -> None:
    """Remove staging folders that earlier runs, since killed, left next to ``out_dir``."""
    parent = out_dir.parent
    prefix = f".{out_dir.name}{STAGING_MARK}"
    if not parent.is_dir():
        return
    for item in parent.iterdir():
        if item.name.startswith(prefix):
            pid_text = item.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(item, ignore_errors=True)


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
        self.out_dir = Path(out_dir)
        self.basename = basename
        if self.out_dir.is_symlink():  # write where the link points, so the rename stays on that disk
            self.out_dir = self.out_dir.resolve()
        if self.out_dir.exists() and not overwrite:
            raise WeightWeavingError(
                "the output folder exists; pass --overwrite to replace it", path=self.out_dir
            )
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise WeightWeavingError("the output path exists and is not a folder", path=self.out_dir)
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot create the output folder: {exc.strerror}", path=parent
            ) from None
        if not os.access(parent, os.W_OK):
            raise WeightWeavingError("the output folder's parent is not writable", path=parent)
        clean_stale_staging(self.out_dir)
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
        view = data.data
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=self.out_dir, parameter=name
            ) from None
        file_name, digest, expected = self._hashes[fd]
        if digest is not None and offset == expected and name not in self._written:
            digest.update(view)
            self._hashes[fd] = (file_name, digest, expected + len(view))
        else:  # written out of order: hash the file at commit instead
            self._hashes[fd] = (file_name, None, expected)
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
        view = data.data
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + start * row_bytes + done)
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=self.out_dir, parameter=name
            ) from None
        self._rows_written[name] = self._rows_written.get(name, 0) + tensor.shape[0]
        if self._rows_written[name] == rows:
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
            shutil.copy2(source, self.staging / source.name)
        except OSError as exc:
            raise WeightWeavingError(
                f"cannot copy '{source.name}' into the output: {exc.strerror or exc}", path=self.out_dir
            ) from None

    def commit(self) -> Path:
        """Finish: check that everything was written, fsync, and move the folder into place."""
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
            old: Path | None = None
            if self.out_dir.exists():
                old = self.staging.with_name(self.staging.name + "-old")  # stale-cleaned like staging
                os.rename(self.out_dir, old)
            os.rename(self.staging, self.out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(self.out_dir.parent)
        except OSError as exc:
            self.abort()
            raise WeightWeavingError(
                f"cannot write the output: {exc.strerror or exc}", path=self.out_dir
            ) from None
        self._committed = True
        return self.out_dir

    def _streamed_hashes(self) -> dict[str, str]:
        """Digests of the weight files hashed while written, for those written whole and in order."""
        known = {}
        for file_name, digest, length in self._hashes.values():
            if digest is not None and (self.staging / file_name).stat().st_size == length:
                known[file_name] = digest.hexdigest()
        return known

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

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
