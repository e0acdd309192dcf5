"""A PyTorch ``.pt``/``.bin`` state dict, loaded with ``weights_only=True`` only: nothing in it runs."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files import Snapshot, check_regular, os_error
from .base import Checkpoint, TensorInfo

# Keys under which training scripts commonly nest the weights.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "params")


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = [obj[k] for k in NESTED_KEYS if k in obj and isinstance(obj[k], dict)]
            if len(inner) >= 1:
                obj = inner[0]
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError("holds no state dict of tensors", path=path)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what was refused (not its advice)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith(
            ("Trying to load unsupported GLOBAL", "Unsupported global", "Unsupported operand")
        ):
            return line.rstrip(".")[:200]
    return "the file holds objects other than tensors"


class TorchFile(Checkpoint):
    def __init__(self, path: Path) -> None:
        self.path = self._file = Path(path)
        st = check_regular(self.path)
        if st.st_size == 0:
            raise CheckpointError("not a readable PyTorch checkpoint: the file is empty", path=self.path)
        self._snapshot = Snapshot.of(st)
        try:
            mmap = zipfile.is_zipfile(self.path)
        except OSError as exc:
            raise os_error(exc, self.path) from None  # only the zip format can be memory-mapped
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the error says all
                warnings.simplefilter("ignore")
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" not in str(exc):
                raise CheckpointError(
                    f"not a readable PyTorch checkpoint: {_first_line(exc)}", path=self.path
                ) from None
            raise CheckpointError(
                f"refused: loading it would need full unpickling, which can run code ({_reason(exc)}); "
                "try 'weightweaving convert IN OUT', which reads it without running it",
                path=self.path,
            ) from None
        except Exception as exc:  # a corrupt file can make torch.load fail in any way
            raise CheckpointError(
                f"not a readable PyTorch checkpoint: {_first_line(exc)}", path=self.path
            ) from None
        self._sd = {str(k): v for k, v in _unwrap(obj, self.path).items()}
        self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> Tensor:
        return self._sd[name]

    def verify_unchanged(self) -> None:
        try:
            st = os.stat(self._file)
        except OSError as exc:
            raise os_error(exc, self.path, "vanished while the merge ran") from None
        changed = self._snapshot.changed(st)
        if changed:
            raise CheckpointError(changed, path=self.path)
