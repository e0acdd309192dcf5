"""A safetensors file, read with our own validating header parser and one ``pread`` per tensor.

We parse the header ourselves so that every malformed file gets a precise one-line error, and we read
each tensor into fresh memory (no mmap), so memory that a merge has finished with goes back at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files import Snapshot, open_regular, os_error, pread_exact
from .base import Checkpoint, TensorInfo

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _read_header(fd: int, size: int, path: Path) -> bytes:
    """The header's JSON bytes: never more than the 8-byte length prefix declares (and the file holds)."""
    if size < 8:
        raise CheckpointError(
            "not a safetensors file: it is empty"
            if size == 0
            else "not a safetensors file: shorter than 8 bytes",
            path=path,
        )
    (header_len,) = struct.unpack("<Q", pread_exact(fd, 8, 0, path))
    if 8 + header_len > size:
        raise CheckpointError(
            f"corrupt safetensors file: header length {header_len} exceeds the file size {size}", path=path
        )
    if header_len > MAX_HEADER:
        raise CheckpointError(
            f"corrupt safetensors file: header length {header_len} is over the 100 MiB limit", path=path
        )
    return pread_exact(fd, header_len, 8, path)


def parse_header(
    path: Path,
) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], Snapshot]:
    """Validate a safetensors header.

    Returns (data start, {name: (dtype, shape, begin, end)}, metadata, what ``stat`` said of the file).
    """
    fd, st = open_regular(path)
    try:
        raw = _read_header(fd, st.st_size, path)
    finally:
        os.close(fd)
    header_len, size = len(raw), st.st_size
    try:
        header = json.loads(raw.decode("utf-8"))
        if isinstance(header, dict) and raw.count(b'"data_offsets"') > len(header) - (
            "__metadata__" in header
        ):
            # more entries than names: one is listed twice (json.loads would keep the last silently)
            json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError("corrupt safetensors file: the header is not valid JSON", path=path) from None
    except _DuplicateKey as exc:
        raise CheckpointError(
            "appears twice in the header: the file is corrupt", path=path, parameter=str(exc)
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors file: the header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError("corrupt safetensors file: __metadata__ is not an object", path=path)
    start = 8 + header_len
    data_len = size - start
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, meta in header.items():
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise CheckpointError(
                "corrupt safetensors file: entry lacks dtype, shape or data_offsets",
                path=path,
                parameter=name,
            )
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"unsupported dtype '{dtype}'", path=path, parameter=name)
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            raise CheckpointError(f"invalid shape {shape!r}", path=path, parameter=name)
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        ) or not (0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"invalid data_offsets {offsets!r}", path=path, parameter=name)
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(
                f"data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes): the file is truncated or corrupt",
                path=path,
                parameter=name,
            )
        numel = 1
        for d in shape:
            numel *= d
        itemsize = DTYPES[dtype].itemsize
        if numel * itemsize != end - begin:
            raise CheckpointError(
                f"shape {tuple(shape)} of {dtype} needs {numel * itemsize} bytes but data_offsets span {end - begin}",
                path=path,
                parameter=name,
            )
        entries[name] = (dtype, tuple(shape), begin, end)
    spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(f"corrupt safetensors file: data of '{n0}' and '{n1}' overlap", path=path)
    return start, entries, {str(k): str(v) for k, v in metadata.items()}, Snapshot.of(st)


class SafetensorsFile(Checkpoint):
    """One ``.safetensors`` file."""

    def __init__(self, path: Path) -> None:
        self.path = self._file = Path(path)
        self._start, self._entries, self.metadata, self._snapshot = parse_header(self.path)
        self._infos = {n: TensorInfo(s, DTYPES[d]) for n, (d, s, _, _) in self._entries.items()}
        self._fd: int | None = None

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> Tensor:
        _, shape, begin, end = self._entries[name]
        return self._read(name, shape, begin, end)

    def get_rows(self, name: str, rows: int) -> Tensor:
        """Read only the first ``rows`` rows: they are the first bytes of the tensor's data."""
        _, shape, begin, end = self._entries[name]
        rows = min(rows, shape[0]) if shape else 0
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        return self._read(name, (rows, *shape[1:]), begin, begin + rows * row_bytes)

    def get_row_range(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the first dimension, reading only their bytes."""
        _, shape, begin, end = self._entries[name]
        if not shape:
            return self.get(name)[start:stop]
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(start, stop)
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        return self._read(
            name, (stop - start, *shape[1:]), begin + start * row_bytes, begin + stop * row_bytes
        )

    def read_into(self, name: str, out: Tensor, start: int | None = None, stop: int | None = None) -> None:
        """Read a tensor (or rows ``start:stop``) into ``out``: straight into its memory, with no
        temporary, when the stored dtype is ``out``'s and ``out`` is contiguous on the CPU."""
        dtype, shape, begin, end = self._entries[name]
        if start is not None and shape:
            start, stop, _ = slice(start, stop).indices(shape[0])
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + max(start, stop) * row_bytes
        if DTYPES[dtype] != out.dtype or not out.is_contiguous() or out.device.type != "cpu":
            out.copy_(self._read(name, tuple(out.shape), begin, end))
            return
        if out.numel() * out.element_size() != end - begin:
            raise ValueError(f"{name}: {end - begin} bytes do not fill a buffer of shape {tuple(out.shape)}")
        self._read_bytes(name, out.reshape(-1).view(torch.uint8), begin, end)

    def _read(self, name: str, shape: tuple[int, ...], begin: int, end: int) -> Tensor:
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._read_bytes(name, buf, begin, end)
        return buf.view(DTYPES[self._entries[name][0]]).reshape(shape)

    def _read_bytes(self, name: str, buf: Tensor, begin: int, end: int) -> None:
        """Bytes ``begin:end`` of the data section into ``buf`` (a contiguous uint8 tensor)."""
        if self._fd is None:  # changed since planning? checked here and again before the commit
            self._fd, st = open_regular(self._file)
            changed = self._snapshot.changed(st)
            if changed:
                raise CheckpointError(changed, path=self.path)
        nbytes = end - begin
        if nbytes:
            view = buf.numpy().data
            got = 0
            while got < nbytes:  # a file system may return fewer bytes than asked: read on
                try:
                    n = os.preadv(self._fd, [view[got:]], self._start + begin + got)
                except OSError as exc:
                    raise os_error(exc, self.path) from None
                if n <= 0:
                    raise CheckpointError(
                        "the file was truncated while reading", path=self.path, parameter=name
                    )
                got += n

    def __getstate__(self) -> dict[str, object]:
        """Pickled (for a Ray worker) as its absolute path and parsed header: no file descriptor.
        The copy opens the file on its first read, checking that it is still the file planned."""
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_file"] = Path(os.path.abspath(self._file))
        state["_snapshot"] = dataclasses.replace(self._snapshot, dev=-1)  # another node's mount
        return state

    def verify_unchanged(self) -> None:
        try:
            st = os.stat(self._file)
        except OSError as exc:
            raise os_error(exc, self.path, "vanished while the merge ran") from None
        changed = self._snapshot.changed(st)
        if changed:
            raise CheckpointError(changed, path=self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
