"""The suite's shipped pre-trained encoder: made once, offline, stored as float16 safetensors.

The paper's runs start from CLIP; the suite starts from an encoder pre-trained longer than a
10-minute run allows (``profiles.SHIPPED_ENCODER``). ``scripts/pretrain_encoder.py`` re-makes it
from its recipe, and the file's header records that recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from torch import Tensor

from ..errors import WeightWeavingError
from . import train
from .data import build_tasks
from .model import VisionTransformer, ViTConfig
from .profiles import EncoderRecipe

StateDict = dict[str, Tensor]

ASSETS = Path(__file__).resolve().parent / "assets"
FORMAT = "weightweaving-suite-encoder/1"


def asset_path(spec: EncoderRecipe) -> Path:
    """Where the package keeps the encoder that ``spec`` made."""
    return ASSETS / spec.file


def pretrain_encoder(
    spec: EncoderRecipe, progress: bool = False, pools: dict[str, Tensor] | None = None
) -> StateDict:
    """Pre-train the encoder ``spec`` describes (float32; the same spec gives the same weights).

    ``pools``: the unlabelled images of ``build_tasks(spec.seed, spec.sizes, spec.tasks)`` when the
    caller already has them.
    """
    if pools is None:
        _, pools = build_tasks(spec.seed, spec.sizes, list(spec.tasks))
    with train.flush_denormals():
        return train.pretrain(
            spec.vit,
            pools,
            epochs=spec.epochs,
            lr=spec.lr,
            batch=spec.batch,
            seed=spec.seed,
            contrastive=spec.contrastive,
            progress=progress,
        )


def save_encoder(state: StateDict, spec: EncoderRecipe, path: str | os.PathLike[str]) -> str:
    """Write ``state`` as float16 with ``spec`` in the header (atomically); returns the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    # one metadata key: safetensors writes several in an arbitrary order, and the file's hash must
    # depend on the weights and the recipe only
    recipe = {"format": FORMAT, **dataclasses.asdict(spec)}
    metadata = {"recipe": json.dumps(recipe, sort_keys=True)}
    try:
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_encoder(path: str | os.PathLike[str], config: ViTConfig) -> tuple[StateDict, str]:
    """The encoder at ``path`` as float32, checked against ``config``, and the file's SHA-256.

    Raises a one-line ``WeightWeavingError`` naming the file when it is missing, unreadable or
    does not fit ``config``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WeightWeavingError(
            f"{path}: cannot read the suite's pre-trained encoder ({exc.strerror or exc}); reinstall "
            "weightweaving or re-make it with scripts/pretrain_encoder.py"
        ) from None
    try:
        stored = load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightWeavingError(f"{path}: not a readable safetensors file ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in VisionTransformer(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in stored:
            raise WeightWeavingError(f"{path}: encoder has no tensor '{name}' (expected for {config})")
        if tuple(stored[name].shape) != shape:
            raise WeightWeavingError(
                f"{path}: tensor '{name}' has shape {tuple(stored[name].shape)}, {config} needs {shape}"
            )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise WeightWeavingError(f"{path}: unexpected tensor '{extra[0]}' for {config}")
    state = {name: stored[name].to(torch.float32) for name in expected}
    return state, hashlib.sha256(raw).hexdigest()


def stored_recipe(path: str | os.PathLike[str]) -> dict[str, object]:
    """The recipe recorded in an encoder file's header (empty when it has none)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    recipe = json.loads(metadata["recipe"]) if "recipe" in metadata else {}
    recipe.pop("format", None)
    return recipe
