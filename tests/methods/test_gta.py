"""gta: mergekit's generalized task arithmetic, step by step on hand-made task vectors."""

from __future__ import annotations

import torch

import weightweaving
from weightweaving.methods.gta import keep_band, keep_largest, l1_rescaled, sign_agreement


def merge(deltas, **hyper):
    base = {"w": torch.zeros(deltas[0].shape)}
    return weightweaving.merge(base, [{"w": d} for d in deltas], "gta", **hyper)["w"]


def test_defaults_are_task_arithmetic():
    deltas = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]
    torch.testing.assert_close(merge(deltas), torch.tensor([4.0, -1.0]))


def test_weights_normalize_and_scale():
    deltas = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]
    got = merge(deltas, weights=[1.0, 0.5], normalize=True, scale=2.0)
    torch.testing.assert_close(got, 2.0 * (deltas[0] + 0.5 * deltas[1]) / 1.5)


def test_ties_semantics_elect_from_the_weighted_sum_and_divide_by_agreeing_weights():
    deltas = [torch.tensor([4.0, -1.0, 0.5]), torch.tensor([-1.0, 3.0, 0.25])]
    got = merge(deltas, weights=[1.0, 2.0], sparsification="none", consensus="sum", normalize=True)
    # entry 0: 4 − 2 = 2 > 0 → only model 0 agrees: 4/1; entry 1: −1 + 6 > 0 → model 1: 6/2;
    # entry 2: both positive: (0.5 + 0.5)/3
    torch.testing.assert_close(got, torch.tensor([4.0, 3.0, 1.0 / 3]))


def test_sparsifiers():
    x = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    assert keep_largest(x, 0.4).tolist() == [0, 1, 0, 0, 1]
    assert keep_largest(x, 0.01).tolist() == [0, 1, 0, 0, 0]  # at least one entry survives
    assert keep_band(x, 0.4, 0.2).tolist() == [0, 0, 1, 0, 1]  # the largest (−5) is an outlier
    rescaled = l1_rescaled(x, keep_largest(x, 0.4), rescale=True)
    torch.testing.assert_close(rescaled.abs().sum(), x.abs().sum())


def test_sign_count_and_zero_counts_as_positive():
    weighted = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-5.0, 0.0]])
    assert sign_agreement(weighted, "count").tolist() == [[True, False], [True, True], [False, False]]
    assert sign_agreement(weighted, "sum").tolist() == [[False, False], [False, True], [True, False]]


def test_random_masks_follow_the_seed():
    deltas = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hyper = {"sparsification": "random", "density": [0.5, 0.5]}
    first = weightweaving.merge({"w": torch.zeros(50)}, [{"w": d} for d in deltas], "gta", seed=1, **hyper)
    again = weightweaving.merge({"w": torch.zeros(50)}, [{"w": d} for d in deltas], "gta", seed=1, **hyper)
    other = weightweaving.merge({"w": torch.zeros(50)}, [{"w": d} for d in deltas], "gta", seed=2, **hyper)
    assert torch.equal(first["w"], again["w"]) and not torch.equal(first["w"], other["w"])
