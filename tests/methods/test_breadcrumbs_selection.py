"""Breadcrumbs' sort-free band selection against the argsort ranking it replaced, on tensors full of ties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightweaving.methods.breadcrumbs import leading, middle_band, order_statistics


def argsort_band(task_vectors: torch.Tensor, density: float, gamma: float, per_row: bool) -> torch.Tensor:
    """The previous ``middle_band``: rank every entry with a stable descending argsort (the reference)."""
    if per_row:
        if task_vectors.ndim == 1:
            return task_vectors.clone()
        units = task_vectors
        n = units.shape[-1]
        n_top, n_keep = int(n * gamma), int(n * density)
    else:
        units = task_vectors.reshape(task_vectors.shape[0], -1)
        n = units.shape[-1]
        n_keep = int(density * n)
        n_top = min(int(gamma * n), n - n_keep)
    order = units.abs().argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1]).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    keep = (ranks >= n_top) & (ranks < n_top + n_keep)
    return (units * keep).reshape(task_vectors.shape)


SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan")]


def tied_tensor(seed: int, shape: tuple[int, ...], levels: int, specials: float) -> torch.Tensor:
    """Integer-valued floats from few levels (many equal magnitudes, both signs), some of them ±0, ±inf, NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, shape, generator=gen).float()
    pick = torch.rand(shape, generator=gen) < specials
    which = torch.randint(0, len(SPECIALS), shape, generator=gen)
    return torch.where(pick, torch.tensor(SPECIALS)[which], x)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.view(-1).view(torch.uint8).equal(b.view(-1).view(torch.uint8))
    )


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(3, 1), (2, 7), (4, 40), (3, 4, 9), (2, 3, 2, 5), (1, 0), (2, 3, 0)]),
    levels=st.sampled_from([0, 1, 2, 5, 1000]),
    specials=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    density=st.one_of(st.sampled_from([1.0, 0.5, 0.001, 1e-9]), st.floats(1e-6, 1.0)),
    gamma=st.one_of(st.sampled_from([0.0, 0.5, 0.99]), st.floats(0.0, 0.99)),
    per_row=st.booleans(),
)
def test_same_bytes_as_argsort(seed, shape, levels, specials, density, gamma, per_row):
    x = tied_tensor(seed, shape, levels, specials)
    assert same_bytes(middle_band(x, density, gamma, per_row), argsort_band(x, density, gamma, per_row))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_other_dtypes(dtype, per_row):
    for seed in range(20):
        x = tied_tensor(seed, (3, 6, 11), 3, 0.1).to(dtype) * 0.37
        assert same_bytes(middle_band(x, 0.3, 0.1, per_row), argsort_band(x, 0.3, 0.1, per_row))


def test_zero_dim_and_single_entry():
    for x in (torch.tensor([2.0, -0.0, float("nan")]), torch.tensor([[-3.0], [float("nan")]])):
        for per_row in (False, True):
            for density, gamma in ((1.0, 0.0), (0.5, 0.0), (1.0, 0.5), (0.15, 0.01)):
                want = argsort_band(x, density, gamma, per_row)
                assert same_bytes(middle_band(x, density, gamma, per_row), want)


def test_leading_breaks_ties_by_index():
    m = torch.tensor([[1.0, 3.0, 1.0, float("nan"), 3.0, 1.0, float("nan")]])
    assert leading(m, 1).int().tolist() == [[0, 0, 0, 1, 0, 0, 0]]
    assert leading(m, 3).int().tolist() == [[0, 1, 0, 1, 0, 0, 1]]
    assert leading(m, 5).int().tolist() == [[1, 1, 0, 1, 1, 0, 1]]
    assert leading(m, 0).sum() == 0 and leading(m, 7).all() and leading(m, 9).all()


@pytest.mark.parametrize("shape", [(5000,), (40, 125)])
def test_numpy_selection_is_kthvalue(shape):
    m = tied_tensor(3, shape, 50, 0.05).abs()  # ties, +inf and NaN
    d = shape[-1]
    ks = [d - 1, 0, d // 2, d // 7, d // 2]
    for got, k in zip(order_statistics(m, ks), ks, strict=True):
        want = m.kthvalue(k + 1, dim=-1, keepdim=True).values
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("per_row", [False, True])
def test_large_tied_tensors(per_row):
    for seed, levels in ((0, 3), (1, 100), (2, 10**6)):
        x = tied_tensor(seed, (3, 40, 250), levels, 0.01)
        for density, gamma in ((0.15, 0.01), (0.5, 0.2), (0.01, 0.0)):
            assert same_bytes(
                middle_band(x, density, gamma, per_row), argsort_band(x, density, gamma, per_row)
            )
