"""A PEFT LoRA adapter seen as a fine-tuned checkpoint: θ = θ_pre + scaling · B · A, one tensor at a time.

LoRA (Hu et al., ICLR 2022, eq. 3) trains, per target module, a low-rank update ΔW = (α / r) · B A
(α / √r with rsLoRA, Kalajdzievski 2023). Its task vector is exactly that update, so an adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) becomes a lazy :class:`Checkpoint` over the
base: reading a target computes the base tensor plus its update; every other parameter reads as the
base's (a zero task vector); full tensors the adapter stores (``modules_to_save``, saved embedding
layers, trained biases) are the fine-tuned values. No full fine-tuned model is ever held.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files import read_small_file
from .base import Checkpoint, TensorInfo
from .safetensors_file import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Fields whose use we refuse rather than merge wrongly: (field, value that is fine).
UNSUPPORTED: tuple[tuple[str, Any], ...] = (
    ("use_dora", False),
    ("lora_bias", False),
    ("layer_replication", None),
    ("trainable_token_indices", None),
    ("target_parameters", None),
    ("use_qalora", False),
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One target module: ``weight`` is the base parameter it updates."""

    weight: str
    a_key: str
    b_key: str
    scaling: float
    embedding: bool  # lora_embedding_A/B: ΔW = (B A)ᵀ
    transpose: bool  # fan_in_fan_out (GPT-2's Conv1D): ΔW = (B A)ᵀ


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(read_small_file(path, 16 * 1024 * 1024).decode("utf-8"))  # a regular file
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read the adapter config: {exc}", path=path) from None
    if not isinstance(config, dict):
        raise CheckpointError("the adapter config is not a JSON object", path=path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"peft_type '{peft_type}' is not supported; only LoRA adapters can be merged", path=path
        )
    for field, fine in UNSUPPORTED:
        value = config.get(field, fine)
        if value not in (fine, None, [], {}):
            raise CheckpointError(f"'{field}: {json.dumps(value)}' is not supported", path=path)
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"'{field}' must be a positive number, got {value!r}", path=path)
    return config


class LoraCheckpoint(Checkpoint):
    """The fine-tuned model an adapter stands for, computed one tensor at a time on top of ``base``."""

    def __init__(self, folder: Path, base: Checkpoint) -> None:
        self.folder = Path(folder)
        self.path = self.folder
        self.base = base
        self.config = read_adapter_config(self.folder)
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(
                f"no {ADAPTER_WEIGHTS} (only safetensors adapters are read)", path=self.folder
            )
        self.file = SafetensorsFile(weights)
        self.modules: dict[str, LoraModule] = {}  # base parameter name -> module
        self.full: dict[str, str] = {}  # parameter name -> key of a full tensor in the adapter
        self._group(self.file.infos())
        base_infos = base.infos()
        infos: dict[str, TensorInfo] = dict(base_infos)
        for name, key in self.full.items():
            infos[name] = self.file.infos()[key]
        for name, module in self.modules.items():
            shape = infos[name].shape if name in infos else None
            want = self._delta_shape(module)
            if shape is None:
                raise CheckpointError(
                    "the adapter updates this parameter, but the base has no such parameter",
                    path=self.file.path,
                    parameter=name,
                )
            if shape != want:
                raise CheckpointError(
                    f"the adapter's update has shape {want}, the base's parameter {shape}",
                    path=self.file.path,
                    parameter=name,
                )
            infos[name] = TensorInfo(
                shape, torch.float64 if infos[name].dtype == torch.float64 else torch.float32
            )
        self._infos = infos

    def _group(self, keys: Mapping[str, TensorInfo]) -> None:
        pairs: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        for key in keys:
            name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            match = _LORA_KEY.match(name) or _EMBED_KEY.match(name)
            if match:
                kind = match["kind"]
                pairs.setdefault(match["module"], {})[kind[-1]] = key
                if kind.startswith("lora_embedding"):
                    embedding.add(match["module"])
            elif "lora_" in name:
                raise CheckpointError(
                    "is a kind of adapter tensor that is not supported", path=self.folder, parameter=key
                )
            else:
                name = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
                self.full[name.replace(".base_layer.", ".")] = key
        cfg = self.config
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise CheckpointError(
                    f"has lora_{'A' if 'A' in ab else 'B'} but not lora_{'B' if 'A' in ab else 'A'}",
                    path=self.file.path,
                    parameter=module,
                )
            a_info = self.file.infos()[ab["A"]]
            if len(a_info.shape) != 2:
                raise CheckpointError(
                    f"LoRA of a {len(a_info.shape)}-D weight (convolution) is not supported",
                    path=self.file.path,
                    parameter=ab["A"],
                )
            r_declared = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            rank = a_info.shape[0]
            if rank != r_declared:
                raise CheckpointError(
                    f"lora_A has rank {rank}, but the adapter config says r = {r_declared}",
                    path=self.file.path,
                    parameter=ab["A"],
                )
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            is_embedding = module in embedding
            self.modules[module + ".weight"] = LoraModule(
                weight=module + ".weight",
                a_key=ab["A"],
                b_key=ab["B"],
                scaling=float(scaling),
                embedding=is_embedding,
                transpose=bool(cfg.get("fan_in_fan_out")) and not is_embedding,
            )

    def _delta_shape(self, module: LoraModule) -> tuple[int, ...]:
        a_shape = self.file.infos()[module.a_key].shape  # (r, in)
        b_shape = self.file.infos()[module.b_key].shape  # (out, r)
        if len(b_shape) != 2 or b_shape[1] != a_shape[0]:
            raise CheckpointError(
                f"lora_B has shape {b_shape}, which does not fit lora_A's {a_shape}",
                path=self.file.path,
                parameter=module.b_key,
            )
        shape = (b_shape[0], a_shape[1])
        return shape[::-1] if (module.embedding or module.transpose) else shape

    # -- Checkpoint ---------------------------------------------------------------------------------
    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def changed(self) -> set[str]:
        """The parameters this adapter changes (every other one reads as the base's)."""
        return set(self.modules) | set(self.full)

    def delta(self, name: str) -> Tensor:
        """The low-rank update ``scaling · B A`` of one target, in float32 (float64 over a float64 base)."""
        module = self.modules[name]
        dtype = self._infos[name].dtype
        a = self.file.get(module.a_key).to(dtype)  # (r, in)
        b = self.file.get(module.b_key).to(dtype)  # (out, r)
        update = (b @ a) * module.scaling
        return update.T if (module.embedding or module.transpose) else update

    def get(self, name: str) -> Tensor:
        under = self.file.get(self.full[name]) if name in self.full else None
        if name not in self.modules:
            return under if under is not None else self.base.get(name)
        weight = under if under is not None else self.base.get(name)
        return weight.to(self._infos[name].dtype) + self.delta(name)

    def label(self) -> str:
        return str(self.folder)

    def close(self) -> None:
        self.file.close()
