"""ISO-CTS (methods/iso_cts.py) against the reference oracle cases, plus its own edge cases."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import get_method
from weightweaving.methods.iso_cts import iso_cts_merge, split_slots


@pytest.mark.parametrize(
    ("width", "num_tasks", "fraction", "expected"),
    [
        (16, 4, 0.8, (12, 1)),
        (16, 2, 0.8, (12, 2)),
        (16, 8, 0.8, (16, 0)),  # ALGORITHMS.md: round(0.5) = 0, pure common space
        (20, 2, 0.85, (16, 2)),  # round(1.5) = 2, half to even
        (10, 4, 0.8, (10, 0)),  # round(0.5) = 0
        (16, 3, 0.0, (1, 5)),
        (16, 4, 1.0, (16, 0)),
    ],
)
def test_split_of_the_singular_slots(width, num_tasks, fraction, expected):
    assert split_slots(width, num_tasks, fraction) == expected


def _task_vectors(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_flat_spectrum_and_pure_common_space_equals_iso_c():
    task_vectors = _task_vectors(3, 10, 6)
    merged = iso_cts_merge(task_vectors, 0.8)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, torch.full_like(values, float(values.mean())))
    u, s, vh = torch.linalg.svd(task_vectors.sum(0), full_matrices=False)
    torch.testing.assert_close(iso_cts_merge(task_vectors, 1.0), s.mean() * (u @ vh))


def test_fraction_that_leaves_no_common_space_is_refused():
    # p = 16, T = 6, fraction 0: the task-specific total round(16/6)·6 = 18 exceeds 16 (the reference crashes)
    with pytest.raises(OptionError, match="common_space_fraction"):
        weightweaving.merge(
            {"w": torch.zeros(16, 16)},
            [{"w": torch.randn(16, 16)} for _ in range(6)],
            method="iso_cts",
            common_space_fraction=0.0,
        )


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_fraction_out_of_range_is_refused(value):
    with pytest.raises(OptionError, match="common_space_fraction"):
        get_method("iso_cts").parse_params({"common_space_fraction": value})
