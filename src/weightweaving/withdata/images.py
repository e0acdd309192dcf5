"""A minimal image-folder reader for exemplars and test-time inputs (uses data).

A task's folder holds image files, directly or in sub-folders (class folders are read but their
names are not used: the methods need no labels). Files are taken in sorted path order; ``limit``
of them are drawn at random with a seeded generator. Every image must have the expected channel
count and size (the first image's when none is given): nothing is resized or converted silently.
Each image becomes a float tensor in ``[0, 1]``, (C, H, W).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightWeavingError
from ..methods.base import seed_for

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "I": 1, "F": 1}


def image_files(folder: Path, task: str) -> list[Path]:
    if not folder.is_dir():
        raise WeightWeavingError(f"task '{task}': no such image folder", path=folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise WeightWeavingError(f"task '{task}': the folder holds no images", path=folder)
    return files


def choose(available: int, limit: int | None, seed: int, task: str, source: object) -> list[int]:
    """Which of ``available`` items to use: all, or ``limit`` drawn with a seeded generator (sorted).

    A negative ``limit`` is a default: ``-limit`` items, or all when there are fewer."""
    if limit is not None and limit < 0:
        limit = min(-limit, available)
    if limit is None:
        return list(range(available))
    if limit < 1:
        raise WeightWeavingError(f"--exemplars-per-task must be at least 1 (got {limit})")
    if limit > available:
        raise WeightWeavingError(
            f"task '{task}': {limit} exemplars asked, only {available} exist", path=source
        )
    gen = torch.Generator().manual_seed(seed_for(seed, "exemplars", task))
    return sorted(torch.randperm(available, generator=gen)[:limit].tolist())


def read_image(path: Path, shape: tuple[int, ...] | None) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            channels = CHANNELS.get(img.mode)
            mode = img.mode
            pixels = img.convert("RGB") if mode == "P" else img
            array = torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8)
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise WeightWeavingError(f"unreadable image: {exc.__class__.__name__}", path=path) from None
    if channels is None or array.numel() != channels * width * height:
        raise WeightWeavingError(f"unsupported image mode '{mode}'", path=path)
    found = (channels, height, width)
    if shape is not None and found != tuple(shape):
        raise WeightWeavingError(
            f"image is {channels} channel(s) {height}x{width}; expected {shape[0]} channel(s) {shape[1]}x{shape[2]}",
            path=path,
        )
    return array.reshape(height, width, channels).permute(2, 0, 1).float() / 255.0


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_image_folder(
    folder: str | os.PathLike[str],
    *,
    task: str,
    limit: int | None = None,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """``limit`` images of ``folder`` as (N, C, H, W) and the record of what was read (paths, SHA-256)."""
    root = Path(folder)
    files = image_files(root, task)
    picked = [files[i] for i in choose(len(files), limit, seed, task, root)]
    images = []
    for path in picked:
        image = read_image(path, shape)
        shape = tuple(image.shape)
        images.append(image)
    record = {
        "task": task,
        "source": str(root),
        "available": len(files),
        "used": len(picked),
        "files": [{"path": str(p.relative_to(root)), "sha256": sha256_of(p)} for p in picked],
    }
    return torch.stack(images), record


def tensor_inputs(
    inputs: Tensor,
    *,
    task: str,
    limit: int | None = None,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Inputs given as a tensor (N, ...): the same checks and record as a folder (SHA-256 of the bytes)."""
    if inputs.dim() == 0 or len(inputs) == 0:
        raise WeightWeavingError(f"task '{task}': no inputs")
    if shape is not None and tuple(inputs.shape[1:]) != tuple(shape):
        raise WeightWeavingError(
            f"task '{task}': inputs of shape {tuple(inputs.shape[1:])}; expected {tuple(shape)}"
        )
    picked = inputs[choose(len(inputs), limit, seed, task, None)]
    digest = hashlib.sha256(picked.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    record = {
        "task": task,
        "source": "<tensor>",
        "available": len(inputs),
        "used": len(picked),
        "sha256": digest,
    }
    return picked, record
