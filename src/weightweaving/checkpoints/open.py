"""Open any supported checkpoint: a file, a sharded folder, a Hugging Face model folder or a state dict."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..files import check_regular, open_regular, os_error, pread_exact
from .base import Checkpoint, StateDictCheckpoint
from .lora import LoraCheckpoint, is_adapter_folder
from .safetensors_file import SafetensorsFile
from .sharded import ShardedSafetensors
from .torch_file import TorchFile

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
# Non-weight files of a Hugging Face folder that a merged output should carry over.
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py.txt", ".yaml", ".yml", ".md", ".jinja")
# The output's own card, provenance and manifest replace the base's.
NOT_CARRIED = {
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "weightweaving_config.yaml",
    "weightweaving_manifest.json",
    "README.md",
}

Source = str | os.PathLike[str] | Mapping[str, Tensor] | Checkpoint


def open_checkpoint(
    source: Source, *, label: str | None = None, base: Checkpoint | None = None
) -> Checkpoint:
    """Open ``source`` lazily.

    Args:
        source: a ``.safetensors`` file, a ``.pt``/``.bin`` file, a folder (Hugging Face model folder
            or sharded safetensors), an index JSON, or an in-memory state dict.
        label: a name for in-memory state dicts, used in error messages.
        base: the pre-trained checkpoint, needed to open a PEFT LoRA adapter folder (its weights
            are the base's plus the adapter's low-rank updates).

    Returns:
        A :class:`Checkpoint`.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, label or "<state dict>")
    path = Path(source)
    st = check_regular(path, folder_ok=True)  # before a byte is read: no devices, FIFOs, sockets
    if is_adapter_folder(path):
        if base is None:
            raise CheckpointError(
                "is a LoRA adapter; it can only be merged on top of a base (--base)", path=path
            )
        return LoraCheckpoint(path, base)
    if stat.S_ISDIR(st.st_mode):
        return _open_folder(path)
    name = path.name
    if name.endswith(".index.json"):
        if name.startswith("pytorch_model"):
            raise CheckpointError(
                "sharded .bin checkpoints are not supported; convert them to safetensors", path=path
            )
        return ShardedSafetensors(path)
    if name.endswith(".safetensors"):
        return SafetensorsFile(path)
    if name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return TorchFile(path)
    # Unknown suffix: sniff the content.
    fd, st = open_regular(path)
    try:
        head = pread_exact(fd, 9, 0, path) if st.st_size >= 9 else b""
    finally:
        os.close(fd)
    if head[8:9] == b"{":
        return SafetensorsFile(path)
    return TorchFile(path)


def _open_folder(folder: Path) -> Checkpoint:
    try:
        return _open_folder_files(folder)
    except OSError as exc:  # a folder that cannot be listed, a member that cannot be stat'ed
        raise os_error(exc, exc.filename or folder) from None


def _open_folder_files(folder: Path) -> Checkpoint:
    for name in WEIGHT_FILES:
        candidate = folder / name
        # a special file or a broken link in a weight file's place is refused by name, not skipped
        if os.path.lexists(candidate) and not candidate.is_dir():
            ckpt = open_checkpoint(candidate)
            ckpt.extra_files = tuple(
                p
                for p in sorted(folder.iterdir())
                if p.is_file() and p.name.endswith(CARRIED_SUFFIXES) and p.name not in NOT_CARRIED
            )
            for extra in ckpt.extra_files:  # copied into the output later: refused now, not then
                check_regular(extra)
            return ckpt
    singles = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    if len(singles) == 1:
        return SafetensorsFile(singles[0])
    raise CheckpointError(
        "no weights found: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
        path=folder,
    )
