"""ISO-C (methods/iso_c.py) against the reference oracle cases, plus its own edge cases."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import get_method


def test_spectrum_of_the_sum_is_flattened_to_its_mean():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(6, 4), "text_projection": torch.zeros(6, 4), "b": torch.zeros(4)}
    tasks = [{k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    merged = weightweaving.merge(base, tasks, method="iso_c", lam=0.5, compute_dtype="float64")
    total = sum(task["w"].double() for task in tasks)
    got = torch.linalg.svdvals(merged["w"].double())
    torch.testing.assert_close(got, torch.full_like(got, 0.5 * float(torch.linalg.svdvals(total).mean())))
    # same singular subspaces as the plain sum: U Vᵀ of both agree
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    gu, _, gvh = torch.linalg.svd(merged["w"].double(), full_matrices=False)
    torch.testing.assert_close(gu @ gvh, u @ vh, rtol=1e-5, atol=1e-5)
    for key in ("text_projection", "b"):  # averaged, not summed
        mean = sum(task[key] for task in tasks) / 3
        torch.testing.assert_close(merged[key], 0.5 * mean)


def test_bad_pattern_is_refused():
    with pytest.raises(OptionError, match="svd_exclude"):
        get_method("iso_c").parse_params({"svd_exclude": "[a-"})
