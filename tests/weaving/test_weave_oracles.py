"""Weight Weaving against the oracle cases (Algorithm 1 applied to the reference methods' outputs)."""

from __future__ import annotations

import math

import pytest
import torch

import weightweaving
from tests.oracles import case_paths, load_case

ALL = case_paths("weave")
DETERMINISTIC = [p for p in ALL if load_case(p).meta["kind"] == "weave"]
RANDOM = [p for p in ALL if load_case(p).meta["kind"] == "weave_statistical"]


def _weave(case, **kw):
    meta = case.meta
    hp = dict(case.hyperparameters)
    return weightweaving.weave(
        case.pretrained,
        case.tasks,
        meta["method"],
        lambdas=meta["lambdas"],
        pool=meta["pool"],
        pool_over=meta["pool_over"],
        **hp,
        **kw,
    )


@pytest.mark.parametrize("path", DETERMINISTIC, ids=lambda p: p.stem)
def test_closed_form_equals_general_path(path):
    case = load_case(path)
    fast, slow = _weave(case), _weave(case, closed_form=False)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", RANDOM, ids=lambda p: p.stem)
def test_random_pool_statistics(path):
    case = load_case(path)
    members = case.members
    n = len(members)
    assert n == case.meta["num_members"]
    first = _weave(case, seed=3)
    again = _weave(case, seed=3)
    for name in first:
        assert torch.equal(first[name], again[name]), "same seed, same output"
    counts = torch.zeros(n)
    differing = 0
    for name, got in first.items():
        pre = case.pretrained[name].double()
        stack = torch.stack([m[name].double() for m in members]) - pre  # (N, *shape)
        delta = got.double() - pre
        atol = case.meta["tolerance"]["atol"][name]
        close = (stack - delta).abs() <= atol + 1e-3 * stack.abs()
        assert bool(close.any(0).all()), f"{name}: an entry equals no member"
        # only where every pair of members differs, so the member picked is unambiguous
        ordered = stack.sort(0).values
        gaps = (ordered[1:] - ordered[:-1]).min(0).values
        mask = (gaps > 2 * (atol + 1e-3 * stack.abs().max(0).values)) & (close.sum(0) == 1)
        pick = close.double().argmax(0)
        counts += torch.bincount(pick[mask].flatten(), minlength=n).double()
        differing += int(mask.sum())
    share = counts / differing
    bound = 4 * math.sqrt((1 / n) * (1 - 1 / n) / differing)
    assert bool(((share - 1 / n).abs() <= bound).all()), (
        f"shares {share.tolist()} off 1/{n} by more than {bound:.4f}"
    )


@pytest.mark.parametrize("path", RANDOM[:1], ids=lambda p: p.stem)
def test_random_pool_average_over_seeds(path):
    case = load_case(path)
    seeds = 200
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in case.pretrained.items()}
    totals_sq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in case.pretrained.items()}
    for seed in range(seeds):
        got = _weave(case, seed=seed)
        for k in total:
            d = got[k].double() - case.pretrained[k].double()
            total[k] += d
            totals_sq[k] += d * d
    for k in total:
        mean = total[k] / seeds
        var = (totals_sq[k] / seeds - mean**2).clamp_min(0)
        se = (var / seeds).sqrt()
        want = case.expected[k].double() - case.pretrained[k].double()
        assert bool(((mean - want).abs() <= 5 * se + 1e-9).all()), k
