"""The report's data-free strategy scores and recommendation, on hand-made results."""

from __future__ import annotations

from weightweaving.suite import report
from weightweaving.suite.profiles import PAPER_METHODS, RECOMMENDED


def _entry(average: float) -> dict:
    return {"average": average, "per_task": {"a": average}}


def _results(other: float) -> dict:
    """Every cell: λ = 1 at 50, mean pool at 60, best λ at 70, strategy 'other' at ``other``."""
    cell = {
        "tuned": {**_entry(70.0), "lam": 0.5},
        "best": {**_entry(70.0), "lam": 0.5},
        "data_free": _entry(50.0),
        "weave": _entry(60.0),
        "recommended": _entry(60.0),
        "weave_pools": {"mean": _entry(60.0), RECOMMENDED: _entry(60.0), "other": _entry(other)},
        "sweep": {"lambdas": [0.1, 0.5, 1.0], "per_task": {"a": [45.0, 70.0, 50.0]}},
    }
    setup = {"zero_shot": _entry(10.0), "individual": _entry(90.0), **{m: dict(cell) for m in PAPER_METHODS}}
    mt = {**setup, "wudi": {**cell, "data_free": _entry(55.0)}}
    return {"multitask": mt, "continual": setup, "domain": dict(setup)}


def test_strategy_scores_count_cells_and_gap():
    results = _results(other=65.0)
    scores = report.strategy_scores(results, "other")
    assert scores["cells"] == 12 and scores["at_or_above"] == 12
    assert abs(scores["gap_closed"] - 0.5) < 1e-12  # (65 − 60) / (70 − 60)
    below = report.strategy_scores(_results(other=59.0), "other")
    assert below["at_or_above"] == 0 and below["gap_closed"] < 0


def test_recommendation_paragraph_states_the_numbers():
    text = "\n".join(report.recommendation(_results(other=65.0)))
    assert f"Recommended default: **{RECOMMENDED}**" in text
    assert "| other | 12/12 | 50% |" in text
    assert "wudi (55.0)" in text and "beats every λ = 1 merge" in text


def test_gap_anatomy_locates_the_gap_and_prices_shrinking_in_multitask():
    results = _results(other=65.0)
    for m in PAPER_METHODS:  # domain: a gap of 2 per cell, best at the grid's smallest λ in two cells
        results["domain"][m] = {**results["domain"][m], "best": {**_entry(62.0), "lam": 0.5}}
    for m in PAPER_METHODS[:2]:
        results["domain"][m]["best"] = {**_entry(62.0), "lam": 0.1}
    anatomy = report.gap_anatomy(results)
    assert abs(anatomy["domain_share"] - 2 / 12) < 1e-12  # 6 x 2 of 6 x 10 + 6 x 2
    assert anatomy["domain_at_smallest"] == 2 and anatomy["domain_cells"] == 6
    assert abs(anatomy["multitask_cost"] - 15.0) < 1e-12  # mean pool 60 against 45 at λ = 0.1
    text = "\n".join(report.recommendation(results))
    assert "17% of it is in domain generalisation" in text and "in 2 of 6 cells" in text
    assert "costs 15.0 points" in text


def test_table3_lists_the_methods_woven_with_every_pool():
    """The full profile weaves only the paper's six methods with the random and MagMax pools."""
    results = _results(other=65.0)
    for setup in results.values():
        for m in PAPER_METHODS:
            setup[m] = {**setup[m], "weave_pools": {**setup[m]["weave_pools"], "random": _entry(61.0)}}
            setup[m]["weave_pools"]["magmax"] = _entry(40.0)
    lines = report._pool_table(results, ["multitask", "continual", "domain"])
    rows = [line for line in lines if line.startswith("| ") and "method" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(PAPER_METHODS)  # not wudi: mean pool only
    assert rows[0].endswith("| 60.0 | 61.0 | 40.0 |")
    # with no method woven with the random pool, no comparison is made
    assert "no comparison of pools" in "\n".join(report._pool_table(_results(65.0), ["multitask"]))
