"""The output manifest: SHA-256 and size of every file, written last, and checked by ``verify``.

safetensors carries no checksum, and a full-size file with wrong bytes opens fine, so each output folder
gets ``weightweaving_manifest.json``. The writer hashes weight files as it streams them (no re-read);
small files are hashed at commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import WeightWeavingError
from ..files import check_regular

MANIFEST = "weightweaving_manifest.json"
FORMAT = "weightweaving-manifest/1"
CONFIG = "weightweaving_config.yaml"
_CHUNK = 8 * 1024 * 1024


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    check_regular(path)  # a FIFO or device in a folder would never end
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path, known: dict[str, str] | None = None) -> dict[str, Any]:
    """Describe every file under ``folder`` (``known``: name -> SHA-256 already computed while writing)."""
    known = known or {}
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST:
            continue
        files[name] = {"sha256": known.get(name) or hash_file(path), "size": path.stat().st_size}
    config = files.get(CONFIG, {}).get("sha256")
    return {"format": FORMAT, "algorithm": "sha256", "config_sha256": config, "files": files}


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> None:
    manifest = build_manifest(folder, known)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify(folder: str | os.PathLike[str]) -> list[str]:
    """Recompute an output folder's manifest.

    Args:
        folder: an output folder written by weightweaving.

    Returns:
        One line per problem (a file that differs, is missing or was added); empty when all match.

    Raises:
        WeightWeavingError: the folder or its manifest is missing or unreadable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise WeightWeavingError("no such output folder", path=root)
    path = root / MANIFEST
    if not path.is_file():
        raise WeightWeavingError(f"has no {MANIFEST}; it was not written by weightweaving", path=root)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        files = recorded["files"]
        if recorded.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise WeightWeavingError("the manifest is not readable", path=path) from None
    problems = []
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name, entry in sorted(files.items()):
        target = root / name
        if name not in present:
            problems.append(f"{target}: missing")
        elif not isinstance(entry, dict) or target.stat().st_size != entry.get("size"):
            problems.append(
                f"{target}: size {target.stat().st_size} differs from the manifest's {entry.get('size') if isinstance(entry, dict) else '?'}"
            )
        elif hash_file(target) != entry.get("sha256"):
            problems.append(f"{target}: content differs (SHA-256 mismatch)")
    for name in sorted(present - set(files)):
        problems.append(f"{root / name}: not in the manifest (added after writing)")
    config = files.get(CONFIG, {}) if isinstance(files.get(CONFIG), dict) else {}
    if recorded.get("config_sha256") != config.get("sha256"):
        problems.append(f"{path}: config_sha256 does not match the config file's entry")
    return problems
