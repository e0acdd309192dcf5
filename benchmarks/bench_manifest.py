"""What the output manifest costs: SHA-256 while writing (streamed) against re-reading after writing.

Builds a base and one fine-tune of ``--mb`` MB each (float32 safetensors) in a temporary folder, then
times, median of ``--repeats``: a plain merge (the manifest hashes the weights as they are written),
the same merge with streamed hashing switched off (the manifest re-reads the weights at commit), and
SHA-256 of the output's weights alone (what ``verify`` spends). Not run by the tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import weightweaving
from weightweaving.checkpoints import writer as writer_module
from weightweaving.checkpoints.manifest import hash_file


def _build(root: Path, mb: int) -> None:
    n = mb * 2**20 // 4 // 16  # 16 tensors
    gen = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(n // 1024, 1024, generator=gen) for i in range(16)}
    save_file(base, str(root / "base.safetensors"))
    save_file({k: v + 0.01 for k, v in base.items()}, str(root / "ft.safetensors"))


def _merge(root: Path) -> float:
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    weightweaving.merge(root / "base.safetensors", [root / "ft.safetensors"], out=out, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        _build(root, args.mb)
        streamed = [_merge(root) for _ in range(args.repeats)]
        real_hashlib, real_write = writer_module.hashlib, writer_module.write_manifest
        writer_module.hashlib = type("NoHash", (), {"sha256": staticmethod(lambda *a: None)})  # type: ignore[assignment]
        writer_module.write_manifest = lambda *a, **k: None  # type: ignore[assignment]
        try:
            bare = [_merge(root) for _ in range(args.repeats)]
        finally:
            writer_module.hashlib, writer_module.write_manifest = real_hashlib, real_write
        original = writer_module.SafetensorsWriter._streamed_hashes
        writer_module.SafetensorsWriter._streamed_hashes = lambda self: {}  # type: ignore[method-assign]
        try:
            reread = [_merge(root) for _ in range(args.repeats)]
        finally:
            writer_module.SafetensorsWriter._streamed_hashes = original  # type: ignore[method-assign]
        weights = root / "out" / "model.safetensors"
        hashing = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            hash_file(weights)
            hashing.append(time.perf_counter() - start)
        size = weights.stat().st_size / 1e6
        m_b, m_s, m_r, m_h = (statistics.median(x) for x in (bare, streamed, reread, hashing))
        print(f"output {size:.0f} MB, {args.repeats} runs, medians")
        print(f"merge, no manifest:                    {m_b:.2f} s")
        print(f"merge, manifest hashed while writing: {m_s:.2f} s  ({m_s / m_b:.2f}x)")
        print(f"merge, manifest re-reads the weights:  {m_r:.2f} s  ({m_r / m_b:.2f}x)")
        print(f"SHA-256 of the weights alone (verify): {m_h:.2f} s  ({size / m_h:.0f} MB/s)")


if __name__ == "__main__":
    main()
