"""Search spaces and pools beyond the oracle cases: grids, non-λ searches, method pools, seeds."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from tests.helpers import toy_models
from weightweaving.errors import OptionError
from weightweaving.weaving import default_lambdas, grid, parse_lambdas


def test_grid_matches_paper_construction():
    assert grid(0.1, 1.5) == [round(0.1 + i * 0.1, 10) for i in range(15)]
    assert parse_lambdas("0.5:2.0:0.1") == [round(0.5 + 0.1 * i, 10) for i in range(16)]
    assert parse_lambdas("0.2,0.4") == [0.2, 0.4]
    assert default_lambdas(weightweaving.get_method("task_arithmetic"), "continual") == grid(0.1, 1.0)


@pytest.mark.parametrize("spec", ["", "a:b", "1:0.5", "0.1:1:0"])
def test_bad_lambda_specs(spec):
    with pytest.raises(OptionError):
        parse_lambdas(spec)


def _members_mean(base, tuned, method, lams, **hp):
    members = [
        {k: t[k].double() - base[k].double() for k in base if base[k].is_floating_point()} for t in tuned
    ]
    for lam in lams:
        merged = weightweaving.merge(base, tuned, method, lam, **hp)
        members.append({k: merged[k].double() - base[k].double() for k in members[0]})
    return {k: base[k].double() + sum(m[k] for m in members) / len(members) for k in members[0]}


def test_weave_mean_equals_explicit_members():
    base, tuned = toy_models(3)
    lams = [0.2, 0.7, 1.3]
    got = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams)
    want = _members_mean(base, tuned, "task_arithmetic", lams)
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["position_ids"], base["position_ids"])


def test_search_over_other_hyperparameter_equals_points_and_general_path():
    base, tuned = toy_models(3)
    weights = [[1.0, 0.0, 0.0], [0.5, 0.5, 1.0]]
    lams = [0.5, 1.0]
    by_grid = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, search={"weights": weights})
    by_points = weightweaving.weave(
        base, tuned, "task_arithmetic", lambdas=lams, points=[{"weights": w} for w in weights]
    )
    general = weightweaving.weave(
        base, tuned, "task_arithmetic", lambdas=lams, search={"weights": weights}, closed_form=False
    )
    members = [{k: t[k] - base[k] for k in by_grid if base[k].is_floating_point()} for t in tuned]
    for w in weights:
        for lam in lams:
            m = weightweaving.merge(base, tuned, "task_arithmetic", lam, weights=w)
            members.append({k: m[k] - base[k] for k in members[0]})
    for k in members[0]:
        want = base[k] + torch.stack([m[k] for m in members]).mean(0)
        torch.testing.assert_close(by_grid[k], want)
        torch.testing.assert_close(by_points[k], want)
        torch.testing.assert_close(general[k], want)


def test_pool_over_merged_with_constant_method():
    base, tuned = toy_models(2)
    avg = weightweaving.merge(base, tuned, "weight_averaging")
    woven = weightweaving.weave(base, tuned, "weight_averaging", lambdas=[0.1, 0.5], pool_over="merged")
    for k in avg:
        torch.testing.assert_close(woven[k], avg[k])


def test_method_as_pool():
    base, tuned = toy_models(3)
    lams = [0.5, 1.0]
    woven = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, pool="task_arithmetic")
    # Task Arithmetic as a pool at λ = 1: the sum of every member
    total = {k: sum(t[k] - base[k] for t in tuned) for k in woven if base[k].is_floating_point()}
    for k, s in total.items():
        torch.testing.assert_close(woven[k], base[k] + s + sum(lams) * s, rtol=1e-5, atol=1e-6)


def test_random_pool_seeded_and_closed_form_equals_general():
    base, tuned = toy_models(3)
    a = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=[0.3, 0.6, 0.9], pool="random", seed=7)
    b = weightweaving.weave(
        base, tuned, "task_arithmetic", lambdas=[0.3, 0.6, 0.9], pool="random", seed=7, closed_form=False
    )
    c = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=[0.3, 0.6, 0.9], pool="random", seed=8)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_pool_lists_valid_ones():
    base, tuned = toy_models(2)
    with pytest.raises(OptionError, match="unknown pool 'nope'; valid pools: mean, random, magmax"):
        weightweaving.weave(base, tuned, "task_arithmetic", pool="nope")


def test_inputs_are_never_modified():
    base, tuned = toy_models(2)
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [base, *tuned]]
    weightweaving.merge(base, tuned, "task_arithmetic", 0.4)
    weightweaving.weave(base, tuned, "task_arithmetic", lambdas=[0.5, 1.0], pool="magmax")
    for before, after in zip(snapshot, [base, *tuned], strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
