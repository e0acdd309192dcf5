"""CAT's λ sweep in the suite searches coarse to fine like the data-free methods' sweeps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from weightweaving.suite import withdata


@pytest.mark.parametrize(
    ("peak", "search"), [(0.4, "coarse_to_fine"), (0.8, "coarse_to_fine"), (0.4, "grid")]
)
def test_cat_tuned_lambda_is_the_full_grids_best(monkeypatch, peak: float, search: str) -> None:
    evaluated: list[float] = []

    def evaluate(state):  # the merged weight is λ·1: a score peaked at ``peak``
        lam = round(float(state["w"][0]), 6)
        evaluated.append(lam)
        return {"task": 100.0 - abs(lam - peak)}

    problem = SimpleNamespace(evaluate=evaluate)
    monkeypatch.setattr(withdata, "data_problems", lambda zoo, setup: [problem])
    monkeypatch.setattr(withdata, "cat_vector", lambda zoo, problem, count, **params: {"w": torch.ones(2)})
    zoo = SimpleNamespace(pretrained={"w": torch.zeros(2)}, recipe=SimpleNamespace(lam_search=search))
    out = withdata.score_exemplar_projection(zoo, "domain", stride=1)  # type: ignore[arg-type]
    assert out["tuned"]["lam"] == pytest.approx(peak)
    assert out["default"]["lam"] == 1.0
    full = withdata.paper_grid("exemplar_projection", "domain", 1)
    if search == "grid":
        assert sorted(set(evaluated)) == pytest.approx(full)
    else:
        assert len(set(evaluated)) < len(full)  # fewer evaluations than the whole grid
        assert out["sweep"]["lambdas"] == sorted(out["sweep"]["lambdas"])
        assert len(out["sweep"]["lambdas"]) == len(out["sweep"]["average"])
