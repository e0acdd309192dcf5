"""TIES: the reference oracles, the streamed global threshold, and the steps' edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case
from weightweaving.errors import OptionError
from weightweaving.methods import UnitContext, get_method
from weightweaving.methods.steps import streamed_order_statistics
from weightweaving.methods.ties import TiesParams, disjoint_mean, elect_sign, trim


@pytest.mark.parametrize("path", case_paths("ties"), ids=lambda p: p.stem)
def test_oracle_needs_its_scope(path):
    """The global and per-tensor oracles differ, so each test above really checks its scope."""
    case = load_case(path)
    hp = case.hyperparameters
    other = "tensor" if hp["scope"] == "global" else "global"
    got = weightweaving.merge(
        case.pretrained, case.tasks, method="ties", lam=case.meta["lam"], **{**hp, "scope": other}
    )
    with pytest.raises(AssertionError):
        assert_matches(case, got)


def random_model(seed: int, shapes: dict[str, tuple[int, ...]], num_tasks: int, ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.zeros(shape) for name, shape in shapes.items()}
    models = []
    for _ in range(num_tasks):
        model = {}
        for name, shape in shapes.items():
            values = torch.randn(shape, generator=gen)
            if ties:  # few distinct magnitudes: many ties at the threshold
                values = torch.round(values * 2) / 2
            model[name] = values
        models.append(model)
    return base, models


SHAPES = {"b.weight": (7, 5), "a.bias": (5,), "c.scale": (), "d.conv": (3, 2, 2, 2)}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0.05, 0.2, 0.5, 1.0, 30])
def test_global_equals_one_flattened_tensor(k, ties):
    """Global scope streams over the parameters; it must equal TIES on their concatenation."""
    base, models = random_model(3, SHAPES, num_tasks=3, ties=ties)
    got = weightweaving.merge(base, models, method="ties", lam=1.0, k=k)
    names = sorted(SHAPES)
    flat = torch.stack([torch.cat([m[n].reshape(-1) for n in names]) for m in models])  # (T, n)
    method = get_method("ties")
    expected = method.compute(
        flat, method.parse_params({"k": k, "scope": "tensor"}), UnitContext("all")
    ).slope
    assert torch.equal(torch.cat([got[n].reshape(-1) for n in names]), expected)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    rows=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    signed=st.booleans(),
    levels=st.sampled_from([0, 3, 1000]),
)
def test_streamed_order_statistics_equal_kthvalue(seed, sizes, rows, dtype, signed, levels):
    gen = torch.Generator().manual_seed(seed)
    units = []
    for n in sizes:
        values = torch.randn(rows, n, generator=gen, dtype=dtype) * 10.0 ** torch.randint(
            -8, 8, (1,), generator=gen
        )
        if levels:  # duplicates and exact zeros
            values = torch.round(values * levels / values.abs().max().clamp(min=1e-30)) / levels
        units.append(values if signed else values.abs())
    concat = torch.cat(units, dim=1)  # (R, n)
    total = concat.shape[1]
    ranks = [
        sorted({0, total - 1, total // 2, int(torch.randint(total, (1,), generator=gen))})
        for _ in range(rows)
    ]

    def scan(fn):
        return [fn(unit, UnitContext(f"u{i}")) for i, unit in enumerate(units)]

    got = streamed_order_statistics(scan, lambda values, ctx: values, ranks)
    for row in range(rows):
        expected = torch.stack([concat[row].kthvalue(r + 1).values for r in ranks[row]])
        assert got[row].dtype == dtype
        assert torch.equal(got[row], expected)


def test_streamed_order_statistics_ranks_from_lengths():
    units = [torch.arange(6.0).reshape(2, 3), torch.tensor([[10.0], [-1.0]])]
    got = streamed_order_statistics(
        lambda fn: [fn(u, UnitContext("u")) for u in units],
        lambda v, ctx: v,
        lambda lengths: [[n - 1] for n in lengths],
    )
    assert [float(g[0]) for g in got] == [10.0, 5.0]


def test_global_stats_threshold_is_kthvalue_of_everything():
    base, models = random_model(7, SHAPES, num_tasks=4)
    names = sorted(SHAPES)
    method = get_method("ties")
    params = method.parse_params({"k": 0.3})

    def scan(fn):
        return [fn(torch.stack([m[n] for m in models]), UnitContext(n)) for n in names]

    stats = method.global_stats(scan, params, seed=0)
    flat = torch.stack([torch.cat([m[n].reshape(-1) for n in names]) for m in models]).abs()
    n = flat.shape[1]
    expected = flat.kthvalue(n - int(n * 0.3), dim=1).values
    assert torch.equal(stats.thresholds, expected)


def test_trim_keeps_ties_and_max_when_nothing_kept():
    flat = torch.tensor([[1.0, -2.0, 2.0, 0.5]])
    assert torch.equal(trim(flat, torch.tensor([2.0])), torch.tensor([[0.0, -2.0, 2.0, 0.0]]))
    base = {"w": torch.zeros(4)}
    got = weightweaving.merge(base, [{"w": flat[0]}], method="ties", lam=1.0, k=0.1)  # m = int(0.4) = 0
    assert torch.equal(got["w"], torch.tensor([0.0, -2.0, 2.0, 0.0]))  # both maxima survive


def test_zero_sign_falls_back_to_the_majority_sign():
    trimmed = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-1.0, 1.0, 1.0, 0.0]])  # entry 0 cancels exactly
    signs = elect_sign(trimmed)  # Σ s = 0 + 1 + 1 − 1 = 1 -> majority +
    assert signs.tolist() == [1.0, 1.0, 1.0, -1.0]
    assert disjoint_mean(trimmed, signs).tolist() == [1.0, 1.5, 2.0, -1.0]
    assert disjoint_mean(trimmed, elect_sign(trimmed, majority_sign=-1.0)).tolist() == [-1.0, 1.5, 2.0, -1.0]


def test_percent_and_fraction_agree():
    base, models = random_model(1, SHAPES, num_tasks=2)
    a = weightweaving.merge(base, models, method="ties", lam=1.0, k=20)
    b = weightweaving.merge(base, models, method="ties", lam=1.0, k=0.2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert TiesParams(k=20).keep_fraction == 0.2


@pytest.mark.parametrize("values", [{"k": 0}, {"k": -0.1}, {"k": 101}, {"scope": "row"}, {"density": 0.1}])
def test_bad_hyperparameter_is_refused(values):
    name = next(iter(values))
    with pytest.raises(OptionError, match=f"'{name}'"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], method="ties", **values)


def test_metadata():
    method = get_method("ties")
    assert method.scope_of(method.parse_params({})).value == "global"
    assert method.scope_of(method.parse_params({"scope": "tensor"})).value == "tensor"
    assert method.paper_lam_ranges["multitask"] == (0.1, 1.5)
