"""Executors: the same seed gives the same bytes on every executor; results come back in order."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from tests.helpers import toy_models
from weightweaving.engine import LocalExecutor


def test_local_executor_keeps_order():
    assert list(LocalExecutor(3).map(lambda x: x * x, range(20))) == [x * x for x in range(20)]


@pytest.mark.parametrize("method, kwargs", [("dare", {"p": 0.3}), ("ties", {}), ("task_arithmetic", {})])
def test_same_bytes_on_every_executor(method, kwargs):
    base, tuned = toy_models(3)
    one = weightweaving.merge(base, tuned, method, 0.7, seed=11, workers=1, **kwargs)
    many = weightweaving.merge(base, tuned, method, 0.7, seed=11, workers=3, **kwargs)
    woven1 = weightweaving.weave(
        base, tuned, method, lambdas=[0.2, 0.9], pool="random", seed=5, workers=1, **kwargs
    )
    woven3 = weightweaving.weave(
        base, tuned, method, lambdas=[0.2, 0.9], pool="random", seed=5, workers=3, **kwargs
    )
    for k in base:
        assert torch.equal(one[k], many[k]), k
        assert torch.equal(woven1[k], woven3[k]), k
