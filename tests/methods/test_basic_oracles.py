"""Weight averaging and Task Arithmetic against the reference oracle cases."""

from __future__ import annotations

import pytest

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case


@pytest.mark.parametrize(
    "path",
    case_paths("weight_averaging") + case_paths("task_arithmetic"),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_oracle_through_api(path):
    case = load_case(path)
    got = weightweaving.merge(
        case.pretrained, case.tasks, method=case.meta["method"], lam=case.meta["lam"], **case.hyperparameters
    )
    assert_matches(case, got)
