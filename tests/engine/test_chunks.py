"""Merging large units in chunks of rows gives the same bytes as merging them whole."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightweaving
from weightweaving.engine import execute
from weightweaving.methods import ties

SHAPES = {"emb": (37, 24), "w": (16, 3, 5), "b": (24,), "s": ()}

CASES = [
    ("merge", "task_arithmetic", {"lam": 0.3}),
    ("merge", "ties", {"lam": 0.9, "k": 0.3}),
    ("merge", "magmax", {}),
    ("merge", "breadcrumbs", {"scope": "row"}),
    ("merge", "pcb", {}),
    ("merge", "pcb", {"variant": "vision"}),
    ("merge", "dare", {"p": 0.4}),
    ("merge", "dare", {"p": 0.3, "base": "ties", "base_hyperparameters": {"k": 0.4}}),
    ("merge", "weight_averaging", {}),
    ("weave", "ties", {"lambdas": [0.5, 1.0], "k": 0.2}),
    ("weave", "task_arithmetic", {"lambdas": [0.2, 0.4], "pool": "magmax"}),
    ("weave", "ties", {"lambdas": [0.5, 1.0], "pool": "random"}),
    ("weave", "dare", {"lambdas": [0.5, 1.0], "pool": "median"}),
    ("weave", "magmax", {"lambdas": [0.5, 1.0], "pool": "trimmed_mean"}),
]


def files(tmp_path, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    paths = []
    for i in range(3):
        path = tmp_path / f"m{i}.safetensors"
        save_file(
            {k: (v.float() + torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()},
            str(path),
        )
        paths.append(str(path))
    save_file(base, str(tmp_path / "base.safetensors"))
    return str(tmp_path / "base.safetensors"), paths


def rows_read(monkeypatch) -> list[tuple[str, tuple[int, int] | None]]:
    """Every read of the runners from now on: (parameter, rows or None for the whole tensor)."""
    seen: list[tuple[str, tuple[int, int] | None]] = []
    read = execute.Runner._read

    def spy(self, unit, rows, reuse, check=True):
        seen.append((unit.name, rows))
        return read(self, unit, rows, reuse, check)

    monkeypatch.setattr(execute.Runner, "_read", spy)
    return seen


@pytest.mark.parametrize(("op", "method", "kwargs"), CASES, ids=lambda c: str(c))
def test_chunks_give_the_same_bytes(tmp_path, monkeypatch, op, method, kwargs):
    base, models = files(tmp_path, torch.bfloat16 if method == "task_arithmetic" else torch.float32)
    run = getattr(weightweaving, op)
    whole = run(base, models, method, **kwargs)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 3 * 24 * 4 * 5)  # 5 rows of emb per chunk
    # TIES's sample stage reads a model smaller than its sample whole (at most _SAMPLE values per
    # task, whatever the tensor sizes); a small sample makes it read single rows here (its
    # thresholds are exact whatever the sample)
    monkeypatch.setattr(ties, "_SAMPLE", 64)
    seen = rows_read(monkeypatch)
    chunked = run(base, models, method, **kwargs)
    # every read of emb, first passes included, is a chunk of at most 5 rows
    emb_reads = [rows for name, rows in seen if name == "emb"]
    assert emb_reads and all(rows is not None and rows[1] - rows[0] <= 5 for rows in emb_reads)
    written = load_file(str(run(base, models, method, out=tmp_path / "out", **kwargs) / "model.safetensors"))
    for name in SHAPES:
        want = whole[name].reshape(-1).view(torch.uint8)
        assert torch.equal(want, chunked[name].reshape(-1).view(torch.uint8)), name
        assert torch.equal(want, written[name].reshape(-1).view(torch.uint8)), name


def test_pieces_split_only_methods_that_allow_it(tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "CHUNK_BYTES", 3 * 24 * 4 * 5)
    base, models = files(tmp_path)
    from weightweaving.api import open_job

    job = open_job(
        base,
        models,
        device="cpu",
        dtype=None,
        compute_dtype=None,
        include=None,
        exclude=None,
        seed=0,
        common_only=False,
        allow_nonfinite=False,
        executor=None,
        workers=1,
        progress=False,
    )
    assert all(p.rows is None for p in job.runner.pieces(job.runner.plan.units))
    job.runner.row_chunks = True
    rows = [p.rows for p in job.runner.pieces(job.runner.plan.units) if p.unit.name == "emb"]
    assert rows == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 35), (35, 37)]


def test_dare_chunks_on_threads_give_the_same_bytes(tmp_path, monkeypatch):
    """Chunks of one parameter merged out of order on two threads still draw DARE's masks from
    the whole parameter's stream."""
    base, models = files(tmp_path)
    whole = weightweaving.merge(base, models, "dare", p=0.5)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 3 * 24 * 4 * 2)  # 2 rows of emb per chunk
    chunked = weightweaving.merge(base, models, "dare", p=0.5, workers=2)
    for name in SHAPES:
        assert torch.equal(
            whole[name].reshape(-1).view(torch.uint8), chunked[name].reshape(-1).view(torch.uint8)
        )


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_piece_draws_continue_the_parameter_stream(order):
    from weightweaving.methods.base import UnitContext

    def uniform(shape, gen):
        return torch.rand(shape, generator=gen)

    shape = (11, 3, 4)
    whole = UnitContext(name="w", seed=3, shape=shape).piece_draws(uniform, shape, "salt")
    pieces = [(0, 4), (4, 5), (5, 11)]
    for start, stop in pieces if order == "forward" else pieces[::-1]:
        ctx = UnitContext(name="w", seed=3, shape=shape, rows=(start, stop))
        assert torch.equal(ctx.piece_draws(uniform, (stop - start, 3, 4), "salt"), whole[start:stop])


def test_a_huge_parameter_is_read_and_merged_in_bounded_chunks(tmp_path, monkeypatch):
    """Peak memory is bounded by the chunk: with a 64 KiB chunk no tensor of task vectors the
    runner holds, in any pass, exceeds it, whatever the size of the largest parameter."""
    gen = torch.Generator().manual_seed(0)
    big = {"huge": torch.randn(1024, 256, generator=gen), "small": torch.randn(8, generator=gen)}
    save_file(big, str(tmp_path / "base.safetensors"))
    models = []
    for i in range(4):
        path = tmp_path / f"m{i}.safetensors"
        save_file({k: v + torch.randn(v.shape, generator=gen) for k, v in big.items()}, str(path))
        models.append(str(path))
    chunk = 64 << 10
    monkeypatch.setattr(execute, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(ties, "_SAMPLE", 1 << 10)  # a model smaller than the sample is read whole
    largest = [0]
    read = execute.Runner._read

    def spy(self, unit, rows, reuse, check=True):
        base, task_vectors = read(self, unit, rows, reuse, check)
        largest[0] = max(largest[0], task_vectors.numel() * task_vectors.element_size())
        return base, task_vectors

    monkeypatch.setattr(execute.Runner, "_read", spy)
    for method, kwargs in [("ties", {}), ("pcb", {}), ("dare", {"base": "ties"}), ("magmax", {})]:
        largest[0] = 0
        weightweaving.merge(str(tmp_path / "base.safetensors"), models, method, **kwargs)
        assert 0 < largest[0] <= chunk, method  # the whole parameter's task vectors: 4 MiB


PEAK = r"""
import resource, sys
import torch
import weightweaving
from weightweaving.engine import execute
chunk, base, small, out, *models = sys.argv[1:]
execute.CHUNK_BYTES = int(chunk)
weightweaving.merge(small, [small, small], "magmax", progress=False)  # warm up the kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weightweaving.merge(base, models, "magmax", out=out, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_peak_memory_of_a_chunked_merge_does_not_grow_with_the_tensor(tmp_path):
    """In a fresh process: a merge whose one parameter needs 96 MiB whole (4 models × 16 MiB of task
    vectors, base and result) raises the peak resident memory by far less with 1 MiB chunks."""
    import subprocess
    import sys

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 1024, generator=gen)
    save_file({"huge": base}, str(tmp_path / "base.safetensors"))
    models = []
    for i in range(4):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"huge": base + torch.randn(base.shape, generator=gen)}, str(path))
        models.append(str(path))
    save_file({"huge": base[:4]}, str(tmp_path / "small.safetensors"))
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK,
            str(1 << 20),
            str(tmp_path / "base.safetensors"),
            str(tmp_path / "small.safetensors"),
            str(tmp_path / "out"),
            *models,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    grown_kib = int(res.stdout.strip().splitlines()[-1])
    assert grown_kib < 24 * 1024, grown_kib  # merged whole: 144 MiB more (measured)
