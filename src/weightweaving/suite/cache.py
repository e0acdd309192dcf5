"""Checkpoints cached by a hash of their recipe, so a second run only merges and evaluates."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

CACHE_VERSION = 5  # bump when training or data code changes what a recipe produces (2: subnormals
# flushed; 3: one fixed digits test split for every seed; 4: continual protocol v2 (benchmark,
# head rows, lr and batch of the continual fine-tunes in the key); 5: fine-tuning through the
# written-out forward and a fused AdamW (the same steps, other float rounding))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return value


def recipe_key(kind: str, **parts: Any) -> str:
    """A short hex digest of everything that decides a checkpoint (dataclasses are expanded)."""
    text = json.dumps({"kind": kind, "version": CACHE_VERSION, **_plain(parts)}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "weightweaving" / "suite"


class CheckpointCache:
    """State dicts stored as ``<dir>/<key>.safetensors``; writes are atomic (temp file + rename)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written ``<key>.tmp<pid>`` files left by processes that were killed."""
        if not self.directory.is_dir():
            return
        for tmp in self.directory.glob("*.tmp*"):
            pid = tmp.suffix.removeprefix(".tmp")
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get_or_make(self, key: str, make: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        path = self.path(key)
        if path.exists():
            self.hits += 1
            return load_file(path)
        self.misses += 1
        state = make()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
        return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
