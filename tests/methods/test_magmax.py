"""MagMax against the reference oracles, and its tie rule (the later task wins)."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import get_method
from weightweaving.methods.magmax import max_magnitude


def reference_fold(task_vectors: torch.Tensor) -> torch.Tensor:
    """danielm1405/magmax ``merge_max_abs``: a running maximum with ``>=``."""
    best = task_vectors[0]
    for tv in task_vectors[1:]:
        best = torch.where(tv.abs() >= best.abs(), tv, best)
    return best


def test_later_task_wins_ties():
    task_vectors = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, 2.0, 0.0, 1.0], [0.5, -2.0, -0.0, -3.0]])
    got = max_magnitude(task_vectors)
    assert got.tolist() == [-1.0, -2.0, 0.0, -3.0]
    assert torch.equal(got, reference_fold(task_vectors))
    gen = torch.Generator().manual_seed(0)
    rounded = torch.round(torch.randn(5, 200, generator=gen) * 2)  # many equal magnitudes
    assert torch.equal(max_magnitude(rounded), reference_fold(rounded))


def argmax_pick(task_vectors: torch.Tensor) -> torch.Tensor:
    """The implementation before the fold: ``argmax`` of |·| over the tasks, flipped so that the later
    task wins ties (NaN counts as the largest magnitude)."""
    later_first = task_vectors.flip(0)
    return later_first.gather(0, later_first.abs().argmax(0, keepdim=True)).squeeze(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tasks", [1, 2, 8])
def test_the_fold_gives_the_bytes_of_argmax(dtype: torch.dtype, tasks: int) -> None:
    gen = torch.Generator().manual_seed(tasks)
    values = torch.round(torch.randn(tasks, 37, 41, generator=gen) * 3).to(dtype)  # many ties
    values[..., 0] = 0.0
    values[tasks // 2, :, 1] = -0.0
    assert torch.equal(max_magnitude(values), argmax_pick(values))
    with_nonfinite = values.clone()
    with_nonfinite[0, 0, 2] = float("nan")
    with_nonfinite[-1, 0, 2] = 5.0  # a NaN still wins over a later finite value
    with_nonfinite[:, 1, 3] = float("nan")  # the last of several NaN
    with_nonfinite[tasks - 1, 2, 4] = float("-inf")
    with_nonfinite[0, 3, 5] = float("inf")
    got, expected = max_magnitude(with_nonfinite), argmax_pick(with_nonfinite)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(expected, nan=7.0))
    real = ~expected.isnan()  # a NaN's sign bit is not a value (kernels may canonicalise it)
    assert torch.equal(torch.signbit(got[real]), torch.signbit(expected[real]))
    assert bool(torch.isnan(got[0, 2])) == (tasks > 1)  # one task: the 5.0 overwrote its NaN


def test_default_lambda_and_no_hyperparameters():
    method = get_method("magmax")
    assert method.default_lam == 0.5
    with pytest.raises(OptionError, match="'k'"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], method="magmax", k=0.2)
