"""Shared checks for the reliability tests: every failure is one line, exit 2, nothing left behind."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tests.helpers import run_cli, save_safetensors, toy_models

STAGING_MARK = ".weightweaving-partial-"


def leftovers(folder: Path) -> list[str]:
    """Staging folders (finished or not) that a run left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if STAGING_MARK in p.name)


def assert_error(res: subprocess.CompletedProcess[str], message: str, *, out: Path | None = None, prefix: bool = False) -> None:
    """Exit 2, exactly one stderr line ``error: <message>`` (or starting so), no traceback, no output."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    if prefix:
        assert lines[0].startswith(f"error: {message}"), lines[0]
    else:
        assert lines[0] == f"error: {message}", lines[0]
    assert res.returncode == 2, res.stderr
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        assert leftovers(out.parent) == []


def run_cli_many(cases: Mapping[str, Sequence[object]], workers: int = 4) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several CLI invocations at once (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run_cli, *map(str, args)) for name, args in cases.items()}
        return {name: fut.result() for name, fut in futures.items()}


def write_models(folder: Path, num_tasks: int = 2, seed: int = 0) -> tuple[Path, list[Path], dict, list[dict]]:
    """A valid base and ``num_tasks`` fine-tuned safetensors files in ``folder``."""
    base, tuned = toy_models(num_tasks, seed)
    b = save_safetensors(folder / "base.safetensors", base)
    ms = [save_safetensors(folder / f"ft{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    return b, ms, base, tuned


def raw_safetensors(path: Path, header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> Path:
    """A safetensors file with exactly this header and data (no validation: for broken files)."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def task_arithmetic(base: Mapping[str, torch.Tensor], tuned: Sequence[Mapping[str, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
    """The expected merge, written out: base + λ Σ (ft − base) in float32, cast back to the base's dtype."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        delta = sum(ft[name].float() - b.float() for ft in tuned)
        out[name] = (b.float() + lam * delta).to(b.dtype)
    return out
