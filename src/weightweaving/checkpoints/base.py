"""What every checkpoint reader offers: names, shapes and dtypes up front, one tensor at a time after."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def len_or(stop: int | None) -> int:
    """``stop`` or, when absent, a row index past any tensor's end."""
    return (1 << 62) if stop is None else stop


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class Checkpoint:
    """A lazily read set of named tensors. ``get`` reads one tensor; nothing else is held."""

    path: Path | None = None
    #: files that are not weights (config.json, tokenizer files) to copy next to a merged output
    extra_files: tuple[Path, ...] = ()

    def infos(self) -> Mapping[str, TensorInfo]:
        raise NotImplementedError  # pragma: no cover

    def get(self, name: str) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def keys(self) -> list[str]:
        return list(self.infos())

    def changed(self) -> set[str] | None:
        """The names whose values may differ from the base's; ``None`` when any may (a full model)."""
        return None

    def get_rows(self, name: str, rows: int) -> Tensor:
        """The first ``rows`` rows of a tensor (readers that can, read only those bytes)."""
        return self.get(name)[:rows]

    def get_row_range(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor's first dimension (readers that can, read only those)."""
        return self.get(name)[start:stop]

    def read_into(self, name: str, out: Tensor, start: int | None = None, stop: int | None = None) -> None:
        """Copy a tensor (or its rows ``start:stop``) into ``out``, converting to ``out``'s dtype.

        ``out`` is the caller's preallocated buffer; readers that can (a safetensors file) read the
        bytes straight into it when the dtypes agree, with no temporary."""
        source = self.get(name) if start is None else self.get_row_range(name, start, len_or(stop))
        out.copy_(source.reshape(out.shape))

    def label(self) -> str:
        return str(self.path) if self.path is not None else "<state dict>"

    def close(self) -> None:
        """Release file handles (readers open them lazily)."""

    def verify_unchanged(self) -> None:
        """Raise if a file read since planning was replaced, changed or removed (before committing)."""


class StateDictCheckpoint(Checkpoint):
    """An in-memory ``dict[str, Tensor]`` (the notebook case)."""

    def __init__(self, state_dict: Mapping[str, Tensor], label: str = "<state dict>") -> None:
        for name, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(
                    f"value of '{name}' is a {type(value).__name__}, not a tensor", path=label
                )
        self._sd = dict(state_dict)
        self._label = label
        self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> Tensor:
        return self._sd[name]

    def label(self) -> str:
        return self._label


class RenamedCheckpoint(Checkpoint):
    """A view of another checkpoint with a key prefix removed (``module.``, ``model.``)."""

    def __init__(self, inner: Checkpoint, strip: str) -> None:
        self.inner = inner
        self.strip = strip
        self.path = inner.path
        self.extra_files = inner.extra_files
        self._infos = {k[len(strip) :]: v for k, v in inner.infos().items() if k.startswith(strip)}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> Tensor:
        return self.inner.get(self.strip + name)

    def get_rows(self, name: str, rows: int) -> Tensor:
        return self.inner.get_rows(self.strip + name, rows)

    def get_row_range(self, name: str, start: int, stop: int) -> Tensor:
        return self.inner.get_row_range(self.strip + name, start, stop)

    def read_into(self, name: str, out: Tensor, start: int | None = None, stop: int | None = None) -> None:
        self.inner.read_into(self.strip + name, out, start, stop)

    def changed(self) -> set[str] | None:
        inner = self.inner.changed()
        return None if inner is None else {k[len(self.strip) :] for k in inner if k.startswith(self.strip)}

    def label(self) -> str:
        return self.inner.label()

    def close(self) -> None:
        self.inner.close()

    def verify_unchanged(self) -> None:
        self.inner.verify_unchanged()
