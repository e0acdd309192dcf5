"""Model Breadcrumbs: both references' oracles (tensor = mergekit 0.1.5, row = the authors) and edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import get_method
from weightweaving.methods.breadcrumbs import middle_band


def mergekit_band(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5 ``magnitude_outliers`` as ALGORITHMS.md states it: sorted positions [n_bot, n_bot + n_keep)."""
    n = x.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    order = x.abs().reshape(-1).argsort()
    mask = torch.zeros(n)
    mask[order[n_bot : n_bot + n_keep]] = 1
    return x * mask.reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1,), (7,), (4, 9), (3, 2, 5)]),
    density=st.floats(0.01, 1.0),
    gamma=st.floats(0.0, 0.99),
)
def test_tensor_scope_is_mergekit(seed, shape, density, gamma):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # distinct magnitudes
    got = middle_band(x[None], density, gamma, per_row=False)[0]
    assert torch.equal(got, mergekit_band(x, density, gamma))


def test_row_scope_edge_cases():
    conv = torch.randn(1, 16, 3, 4, 4)  # d = 4: int(4·0.15) = 0 kept per row
    assert not middle_band(conv, 0.15, 0.01, per_row=True).any()
    scalar = torch.tensor([3.0, -2.0])  # two tasks of a 0-dim parameter pass unchanged
    assert torch.equal(middle_band(scalar, 0.15, 0.01, per_row=True), scalar)
    row = torch.tensor([[[5.0, -4.0, 3.0, 2.0, -1.0]]])  # d = 5: remove int(1.0)=1, keep int(2.0)=2
    assert middle_band(row, 0.4, 0.2, per_row=True).tolist() == [[[0.0, -4.0, 3.0, 0.0, 0.0]]]


def test_full_density_no_outliers_is_task_arithmetic():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    for scope in ("tensor", "row"):
        got = weightweaving.merge(
            base, models, method="breadcrumbs", lam=0.5, density=1.0, gamma=0.0, scope=scope
        )
        want = weightweaving.merge(base, models, method="task_arithmetic", lam=0.5)
        assert all(torch.equal(got[k], want[k]) for k in base)


@pytest.mark.parametrize(
    "values", [{"density": 0}, {"density": 1.5}, {"gamma": 1.0}, {"gamma": -0.1}, {"scope": "global"}]
)
def test_bad_hyperparameter_is_refused(values):
    name = next(iter(values))
    with pytest.raises(OptionError, match=f"'{name}'"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], method="breadcrumbs", **values)


def test_metadata():
    method = get_method("breadcrumbs")
    params = method.parse_params({})
    assert (params.density, params.gamma, method.scope_of(params).value) == (0.15, 0.01, "tensor")
    assert method.scope_of(method.parse_params({"scope": "row"})).value == "row"
