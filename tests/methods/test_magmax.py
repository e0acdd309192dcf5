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


def test_default_lambda_and_no_hyperparameters():
    method = get_method("magmax")
    assert method.default_lam == 0.5
    with pytest.raises(OptionError, match="'k'"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], method="magmax", k=0.2)
