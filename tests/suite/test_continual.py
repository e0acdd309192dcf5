"""The suite's continual protocol pieces and the multi-pool weave (fast: tiny tensors and models)."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.suite import data, train
from weightweaving.suite.data import Split
from weightweaving.suite.merging import weave, weave_pools
from weightweaving.suite.model import ViTConfig, build_model, state_dict_of

POOLS = ["mean", "random", "magmax", "trimmed_mean", "median", "agreement", "fitted_lambda", "calibrated"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "cart", "svc"])
def test_weave_pools_equals_one_library_weave_per_pool(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    pre = {"a.weight": torch.randn(12, 8, generator=gen), "b.bias": torch.randn(8, generator=gen)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(3)]
    lambdas = [0.1, 0.5, 1.0]
    got = weave_pools(pre, tuned, method, lambdas, POOLS, seed=3)
    assert list(got) == POOLS
    for pool in POOLS:
        want = weave(pre, tuned, method, lambdas, pool, seed=3)
        for key in pre:
            torch.testing.assert_close(got[pool][key], want[key], rtol=1e-5, atol=1e-6)


def test_uneven_class_incremental_splits() -> None:
    groups = data.class_incremental_splits(62, 20, seed=1)
    assert len(groups) == 20 and sorted(c for g in groups for c in g) == list(range(62))
    assert {len(g) for g in groups} <= {3, 4}
    with pytest.raises(data.WeightWeavingError):
        data.class_incremental_splits(5, 6, seed=0)


def test_continual_dataset_numbers_classes_domain_by_domain() -> None:
    tasks, _ = data.build_tasks(
        0, data.Sizes(train=12, test=9, pretrain=1), ["shapes", "dot_count"], pools=False
    )
    joint = data.continual_dataset(tasks, ("shapes", "dot_count"))
    assert joint.name == "shapes+dot_count" and joint.n_classes == 14
    assert joint.classes[6] == "dot_count:1"
    assert torch.equal(joint.test.labels[9:], tasks[1].test.labels + 6)
    with pytest.raises(data.WeightWeavingError, match="digits"):
        data.continual_dataset(tasks, ("digits",))
    busy = data.continual_dataset(tasks, ("shapes", "dot_count"), clutter=0.5, seed=0)
    assert busy.name == "shapes+dot_count/clutter" and torch.equal(busy.test.labels, joint.test.labels)
    again = data.continual_dataset(tasks, ("shapes", "dot_count"), clutter=0.5, seed=0)
    assert torch.equal(busy.train.images, again.train.images)  # seeded
    assert not torch.equal(busy.train.images, joint.train.images)
    assert 0 <= float(busy.train.images.min()) and float(busy.train.images.max()) <= 1


def test_fine_tune_head_rows_and_group_accuracies() -> None:
    cfg = ViTConfig(width=16, layers=1, heads=2, mlp_ratio=2, embed_dim=8)
    start = state_dict_of(build_model(cfg, 0))
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.rand(24, 3, 28, 28, generator=gen), torch.arange(24) % 4)
    head = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    kwargs = {"steps": 2, "lr": 1e-2, "batch": 4, "weight_decay": 0.0, "scale": 10.0, "seed": 0}
    own = train.fine_tune(cfg, start, split, head, classes=[0, 1], **kwargs)
    wide = train.fine_tune(cfg, start, split, head, classes=[0, 1], head_classes=[0, 1, 2, 3], **kwargs)
    assert any(not torch.equal(own[k], wide[k]) for k in own)  # other rows change the loss
    with pytest.raises(ValueError):
        train.fine_tune(cfg, start, split, head, classes=[0, 1], head_classes=[0, 2], **kwargs)
    per_group = train.group_accuracies(cfg, start, split, head, [[0, 1], [2, 3]])
    assert sum(per_group) / 2 == pytest.approx(train.accuracy(cfg, start, split, head))


def test_coarse_to_fine_finds_the_grid_optimum_with_fewer_points() -> None:
    from weightweaving.suite.protocols import Problem, score_problems

    pre = {"w": torch.zeros(3)}
    tuned = [{"w": torch.ones(3)}]
    calls: list[float] = []

    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
        w = float(state["w"][0])
        calls.append(w)
        return {"task": 100 - 50 * (w - 0.6) ** 2}

    def run(search: bool) -> dict[str, object]:
        calls.clear()
        problem = Problem(tuned, evaluate)
        return score_problems(
            pre, [problem], 0, "multitask", "task_arithmetic", ["mean"], 1, coarse_to_fine=search
        )

    full = run(False)
    n_full = len(calls)
    quick = run(True)
    assert full["tuned"]["lam"] == quick["tuned"]["lam"] == 0.6  # type: ignore[index]
    # every third point, then the best's neighbours (0.6, 0.8), then 0.6's other neighbour
    assert quick["sweep"]["lambdas"] == [0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]  # type: ignore[index]
    assert len(calls) < n_full


@pytest.mark.parametrize("peak", [0.1, 0.2, 0.35, 0.5, 0.9, 1.0, 1.3, 2.5])
@pytest.mark.parametrize("width", [0.05, 1.0])
def test_search_grid_finds_a_single_peak_of_any_grid(peak: float, width: float) -> None:
    from weightweaving.suite.merging import paper_grid
    from weightweaving.suite.protocols import best_lam, search_grid

    for grid in (paper_grid("task_arithmetic", "multitask"), paper_grid("pcb", "multitask")):
        asked: list[float] = []

        def evaluate(lams: list[float], asked: list[float] = asked) -> dict[float, float]:
            assert not set(lams) & set(asked)  # no point twice
            asked.extend(lams)
            return {lam: -abs(lam - peak) / width for lam in lams}

        seen = search_grid(grid, evaluate)
        assert set(seen) == set(asked) <= set(grid) and 1.0 in seen and grid[0] in seen and grid[-1] in seen
        assert best_lam(seen) == best_lam({lam: -abs(lam - peak) / width for lam in grid})
        assert len(seen) < len(grid)


def test_search_grid_stops_at_a_local_peak() -> None:
    from weightweaving.suite.protocols import search_grid

    grid = [round(0.1 * i, 1) for i in range(1, 11)]
    values = dict(zip(grid, [5, 1, 0, 0, 9, 9, 0, 0, 0, 0], strict=True))  # 0.1 the coarse best; 0.5 missed
    seen = search_grid(grid, lambda lams: {lam: values[lam] for lam in lams})
    assert sorted(seen) == [0.1, 0.2, 0.4, 0.7, 1.0]


def test_merge_family_of_a_nonlinear_method_sweeps_once():
    """SVC's family over its grid: one merge_sweep, each point equal to weightweaving.merge."""
    from weightweaving.suite.merging import merge_family

    gen = torch.Generator().manual_seed(1)
    pre = {"a.weight": torch.randn(9, 6, generator=gen), "b.bias": torch.randn(6, generator=gen)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(3)]
    family = merge_family(pre, tuned, "svc_tsv", 2, [0.1, 0.5, 1.0])
    for lam in [0.5, 0.3, 1.0]:  # 0.3 is off the grid: one merge of its own
        want = weightweaving.merge(pre, tuned, "svc", lam=lam, seed=2, base="tsv", progress=False)
        for key in pre:
            torch.testing.assert_close(family(lam)[key], want[key], rtol=1e-5, atol=1e-6)
