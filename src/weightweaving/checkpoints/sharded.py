"""A sharded safetensors checkpoint: ``model.safetensors.index.json`` plus its shard files."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..files import read_small_file
from .base import Checkpoint, TensorInfo
from .safetensors_file import SafetensorsFile

MAX_INDEX = 256 * 1024 * 1024  # an index of a million tensors is ~100 MB


class ShardedSafetensors(Checkpoint):
    def __init__(self, index_path: Path) -> None:
        self.path = Path(index_path)
        try:
            index = json.loads(read_small_file(self.path, MAX_INDEX).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"cannot read the shard index: {exc}", path=self.path) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("shard index has no 'weight_map'", path=self.path)
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                "shard index maps a parameter to something other than a file name", path=self.path
            )
        self._shards: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        infos: dict[str, TensorInfo] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard_path = self.path.parent / str(shard_name)
            if "/" in str(shard_name) or "\\" in str(shard_name) or not os.path.lexists(shard_path):
                raise CheckpointError(
                    f"the index names shard '{shard_name}', which is missing", path=self.path
                )
            self._shards[shard_name] = SafetensorsFile(shard_path)
        for name, shard_name in weight_map.items():
            shard = self._shards[shard_name]
            if name not in shard.infos():
                raise CheckpointError(
                    f"the index puts '{name}' in '{shard_name}', which does not hold it", path=self.path
                )
            self._where[name] = shard
            infos[name] = shard.infos()[name]
        self._infos = infos

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> Tensor:
        return self._where[name].get(name)

    def get_rows(self, name: str, rows: int) -> Tensor:
        return self._where[name].get_rows(name, rows)

    def get_row_range(self, name: str, start: int, stop: int) -> Tensor:
        return self._where[name].get_row_range(name, start, stop)

    def read_into(self, name: str, out: Tensor, start: int | None = None, stop: int | None = None) -> None:
        self._where[name].read_into(name, out, start, stop)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def verify_unchanged(self) -> None:
        for shard in self._shards.values():
            shard.verify_unchanged()
