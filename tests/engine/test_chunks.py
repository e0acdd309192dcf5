"""Merging large units in chunks of rows gives the same bytes as merging them whole."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightweaving
from weightweaving.engine import execute

SHAPES = {"emb": (37, 24), "w": (16, 3, 5), "b": (24,), "s": ()}

CASES = [
    ("merge", "task_arithmetic", {"lam": 0.3}),
    ("merge", "ties", {"lam": 0.9, "k": 0.3}),
    ("merge", "magmax", {}),
    ("merge", "breadcrumbs", {"scope": "row"}),
    ("merge", "pcb", {}),
    ("weave", "ties", {"lambdas": [0.5, 1.0], "k": 0.2}),
    ("weave", "task_arithmetic", {"lambdas": [0.2, 0.4], "pool": "magmax"}),
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


@pytest.mark.parametrize(("op", "method", "kwargs"), CASES, ids=lambda c: str(c))
def test_chunks_give_the_same_bytes(tmp_path, monkeypatch, op, method, kwargs):
    base, models = files(tmp_path, torch.bfloat16 if method == "task_arithmetic" else torch.float32)
    run = getattr(weightweaving, op)
    whole = run(base, models, method, **kwargs)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 3 * 24 * 4 * 5)  # 5 rows of emb per chunk
    chunked = run(base, models, method, **kwargs)
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
