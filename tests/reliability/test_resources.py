"""Resource bounds: refused up front with the numbers; running out of memory anyway is one line too.

The inputs are sparse files: their headers declare large tensors whose data (zeros) takes no disk.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys

import pytest
import torch

import weightweaving
from tests.helpers import ROOT
from weightweaving.engine.plan import Plan, Unit
from weightweaving.engine.resources import check_resources, peak_bytes

from .util import assert_error, leftovers

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _sparse_safetensors(path, shapes: dict[str, list[int]]):
    """A valid safetensors file of F32 zeros with these shapes, written as a hole (no disk used)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def _cli(args, limit_bytes=None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "weightweaving", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        preexec_fn=limit if limit_bytes else None,
    )


def test_output_larger_than_the_disk_is_refused_up_front(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    rows = 2 * free // (4 * 4096)  # one tensor (rows, 4096) of F32: twice what the disk has free
    files = [_sparse_safetensors(tmp_path / f"{n}.safetensors", {"w": [rows, 4096]}) for n in ("base", "ft")]
    out = tmp_path / "out"
    res = _cli(["merge", "--base", files[0], "--models", files[1], "--out", out])
    need = rows * 4096 * 4
    assert_error(res, f"{out}: the output needs ", out=out, prefix=True)
    assert f"({need} bytes) but its file system has" in res.stderr
    assert "free some space or choose another --out (pass --no-resource-check to try anyway)" in res.stderr
    assert leftovers(tmp_path) == []


def test_out_of_memory_is_one_line_with_the_sizes(tmp_path):
    """Under an address-space limit: refused up front; with --no-resource-check, torch's allocation fails."""
    shapes = {"small": [16], "big": [8192, 8192]}  # 256 MiB of F32 per file, 3 files
    b = _sparse_safetensors(tmp_path / "base.safetensors", shapes)
    ms = [_sparse_safetensors(tmp_path / f"ft{i}.safetensors", shapes) for i in range(2)]
    out = tmp_path / "out"
    # Breadcrumbs ranks whole tensors (Task Arithmetic would merge 'big' in chunks of rows and fit)
    merge = ["merge", "--base", b, "--models", *ms, "--method", "breadcrumbs", "--out", out]
    limit = 1536 * 2**20  # the CLI with torch loaded takes about 650 MiB of address space
    res = _cli(merge, limit)
    assert_error(
        res, "the merge needs at least 1.0 GiB of memory ('big' (8192, 8192) × 2 models", prefix=True
    )
    assert "+ base and result in float32, × 1 workers) but" in res.stderr
    assert res.stderr.strip().endswith(
        "is available; try --workers 1, --compute-dtype float32, a smaller --shard-size, or fewer models "
        "(pass --no-resource-check to try anyway)"
    )
    assert not out.exists() and leftovers(tmp_path) == []
    res = _cli([*merge, "--no-resource-check"], limit)
    assert_error(
        res,
        "out of memory while merging 'big' (8192, 8192) of 2 models (at least 1.0 GiB in float32 for this "
        "tensor); try --workers 1, --compute-dtype float32, a smaller --shard-size, or fewer models",
        out=out,
    )


def test_peak_estimate_counts_workers_and_the_compute_dtype():
    units = [
        Unit("a", (1000, 1000), torch.float16, torch.float16, True),
        Unit("b", (10,), torch.float16, torch.float16, True),
    ]
    plan = Plan(units)
    assert peak_bytes(plan, 3, torch.float32, 1) == 1_000_000 * 5 * 4
    assert peak_bytes(plan, 3, torch.float64, 2) == 1_000_000 * 5 * 8 * 2
    check_resources(plan, 3, torch.float32, 1, None, torch.device("cpu"))  # 20 MB: fits any machine


def test_peak_estimate_of_a_method_merged_in_chunks_of_rows_is_one_chunk():
    # 128k × 4096 (an LLM's embedding), 8 models: 20 GiB whole, but merged in chunks of rows
    plan = Plan([Unit("embed", (128_256, 4096), torch.bfloat16, torch.bfloat16, True)])
    whole = peak_bytes(plan, 8, torch.float32, 1)
    assert whole == 128_256 * 4096 * 10 * 4
    chunk = 64 << 20
    rows = chunk // (4 * 8 * 4096)  # rows of one chunk (Runner.pieces)
    assert peak_bytes(plan, 8, torch.float32, 1, chunk) == rows * 4096 * 10 * 4 < whole / 100
    small = Plan([Unit("b", (10, 10), torch.float32, torch.float32, True)])  # below a chunk: whole
    assert peak_bytes(small, 8, torch.float32, 1, chunk) == peak_bytes(small, 8, torch.float32, 1)


def test_the_resource_check_lets_a_chunked_merge_through_that_would_not_fit_whole(tmp_path, monkeypatch):
    import weightweaving.engine.resources as resources

    base = {"w": torch.zeros(4096, 64)}
    models = [{"w": torch.ones(4096, 64)} for _ in range(2)]
    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 20)  # 1 MiB: a chunk fits, not the unit
    with pytest.raises(resources.ResourceError, match="needs at least"):
        weightweaving.merge(base, models, "tsv", out=tmp_path / "o1")  # an SVD of the whole tensor
    from weightweaving.engine import execute

    monkeypatch.setattr(execute, "CHUNK_BYTES", 64 << 10)
    merged = weightweaving.merge(base, models, "task_arithmetic", lam=0.5, out=tmp_path / "o2")
    assert merged.exists()
