"""Every registered method against its reference oracle cases, driven by the registry (timm-style).

A method must have deterministic cases in ``tests/data/oracles/<name>/`` or state in its metadata
(``oracle_exempt``) why it has none, else the test fails. Each ``merge`` case runs through
``weightweaving.merge``, and each Weight Weaving case (``tests/data/oracles/weave/``) runs through
``weightweaving.weave`` under its base method; both are compared by the case's own tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import weightweaving
from tests.oracles import ROOT, assert_matches, case_paths, load_case
from weightweaving.methods import get_method

METHODS = weightweaving.list_methods()
EXEMPTION_KINDS = ("statistical:", "uses data:", "peer:")


def _cases(method: str) -> list[Path]:
    return case_paths(method) if (ROOT / method).is_dir() else []


def _weave_cases() -> dict[str, list[Path]]:
    by_method: dict[str, list[Path]] = {}
    for path in case_paths("weave"):
        meta = load_case(path).meta
        if meta["kind"] == "weave":  # random pooling is checked by its statistics (test_weave_oracles)
            by_method.setdefault(meta["method"], []).append(path)
    return by_method


WEAVE_CASES = _weave_cases()
MERGE_CASES = [
    (name, path) for name in METHODS if get_method(name).oracle_exempt is None for path in _cases(name)
]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_oracle_cases_or_a_stated_reason(name):
    method = get_method(name)
    if method.oracle_exempt is not None:
        assert method.oracle_exempt.startswith(EXEMPTION_KINDS), (
            f"{name}: oracle_exempt must start with one of {EXEMPTION_KINDS}"
        )
        assert len(method.oracle_exempt) > 20, f"{name}: state the reason"
        return
    cases = _cases(name)
    assert cases, f"method '{name}' has no oracle cases in {ROOT / name} and no oracle_exempt reason"
    for path in cases:
        assert load_case(path).meta["kind"] == "merge", f"{path}: not a deterministic merge case"


@pytest.mark.parametrize("name,path", MERGE_CASES, ids=[f"{n}/{p.stem}" for n, p in MERGE_CASES])
def test_merge_case_through_the_api(name, path):
    case = load_case(path)
    assert case.meta["method"] == name
    hyperparameters = case.hyperparameters
    seed = hyperparameters.pop("seed", 0)
    got = weightweaving.merge(
        case.pretrained, case.tasks, method=name, lam=case.meta["lam"], seed=seed, **hyperparameters
    )
    assert_matches(case, got)


WEAVES = [(m, p) for m, paths in WEAVE_CASES.items() for p in paths]


def test_weave_cases_name_registered_methods():
    assert WEAVES
    assert set(WEAVE_CASES) <= set(METHODS)


@pytest.mark.parametrize("name,path", WEAVES, ids=[f"weave/{p.stem}-{n}" for n, p in WEAVES])
def test_weave_case_through_the_api(name, path):
    case = load_case(path)
    meta = case.meta
    got = weightweaving.weave(
        case.pretrained,
        case.tasks,
        name,
        lambdas=meta["lambdas"],
        pool=meta["pool"],
        pool_over=meta["pool_over"],
        **case.hyperparameters,
    )
    assert_matches(case, got)
