"""Shared checks for the reliability tests: every failure is one line, exit 2, nothing left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tests.helpers import save_safetensors, toy_models

STAGING_MARK = ".weightweaving-partial-"
LOCK_MARK = ".weightweaving-lock"


def leftovers(folder: Path) -> list[str]:
    """Staging folders (finished or not) and lock files that a run left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if STAGING_MARK in p.name or LOCK_MARK in p.name)


def assert_error(
    res: subprocess.CompletedProcess[str], message: str, *, out: Path | None = None, prefix: bool = False
) -> None:
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


def run_cli_many(
    cases: Mapping[str, Sequence[object]], workers: int = 4
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run many CLI invocations, each in its own process, several at once.

    Each process runs ``weightweaving.cli.main(argv)`` forked from a warm server that has imported
    weightweaving already (``multiprocessing``'s forkserver), so a case costs tens of milliseconds
    instead of a second of interpreter and torch start-up. Exit code and stdout/stderr are the
    process's own, exactly as ``python -m weightweaving`` gives them; tests that need the real
    interpreter start (signals, resource limits) use :func:`tests.helpers.run_cli`.
    """
    names = list(cases)
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(names), workers):
            batch = names[start : start + workers]
            procs = {}
            for i, name in enumerate(batch):
                argv = [str(a) for a in cases[name]]
                streams = (os.path.join(tmp, f"{start + i}.out"), os.path.join(tmp, f"{start + i}.err"))
                proc = _context().Process(target=_cli_child, args=(argv, *streams))
                proc.start()
                procs[name] = (proc, argv, streams)
            for name, (proc, argv, (out, err)) in procs.items():
                proc.join(timeout=120)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                with open(out, encoding="utf-8") as fo, open(err, encoding="utf-8") as fe:
                    results[name] = subprocess.CompletedProcess(argv, proc.exitcode, fo.read(), fe.read())
    return results


_CONTEXT: list[multiprocessing.context.BaseContext] = []


def _context() -> multiprocessing.context.BaseContext:
    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["weightweaving.cli", "tests.reliability.util"])
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _cli_child(argv: list[str], out_path: str, err_path: str) -> None:
    """In the forked process: point fds 1 and 2 at files, run the CLI, exit with its status."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    code: object = 1
    try:
        from weightweaving.cli import main

        code = main(argv)
    except SystemExit as exc:  # argparse exits this way
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def write_models(
    folder: Path, num_tasks: int = 2, seed: int = 0
) -> tuple[Path, list[Path], dict, list[dict]]:
    """A valid base and ``num_tasks`` fine-tuned safetensors files in ``folder``."""
    base, tuned = toy_models(num_tasks, seed)
    b = save_safetensors(folder / "base.safetensors", base)
    ms = [save_safetensors(folder / f"ft{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    return b, ms, base, tuned


def raw_safetensors(
    path: Path, header: object, data: bytes = b"", *, header_bytes: bytes | None = None
) -> Path:
    """A safetensors file with exactly this header and data (no validation: for broken files)."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def task_arithmetic(
    base: Mapping[str, torch.Tensor], tuned: Sequence[Mapping[str, torch.Tensor]], lam: float
) -> dict[str, torch.Tensor]:
    """The expected merge, written out: base + λ Σ (ft − base) in float32, cast back to the base's dtype."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        delta = sum(ft[name].float() - b.float() for ft in tuned)
        out[name] = (b.float() + lam * delta).to(b.dtype)
    return out
