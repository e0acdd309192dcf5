"""ISO-C (methods/iso_c.py) against the reference oracle cases, plus its own edge cases."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case


@pytest.mark.parametrize("path", case_paths("iso_c"), ids=lambda p: p.stem)
def test_oracle_through_api(path):
    case = load_case(path)
    got = weightweaving.merge(
        case.pretrained, case.tasks, method="iso_c", lam=case.meta["lam"], **case.hyperparameters
    )
    assert_matches(case, got)
