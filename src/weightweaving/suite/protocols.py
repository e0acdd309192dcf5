"""The paper's three protocols as merge problems, and the sweep that scores every method on them.

A setup is a list of *problems*: the fine-tuned models to merge and an evaluation that maps a merged
encoder to per-task accuracies. Multi-task is one problem (merge all eight, score each task with its
head); domain generalisation is one problem per held-out task (merge the other seven, score the
held-out one); continual learning is one problem per class-incremental benchmark (merge the N task
vectors, score all classes with one head). The setup's accuracy at λ is the union over problems.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any, cast

import torch
from torch import Tensor

from . import train
from .data import Split
from .merging import merge_family, paper_grid, weave_pools
from .profiles import RECOMMENDED
from .timing import Stopwatch
from .zoo import ContinualRun, StateDict, Zoo

Scores = dict[str, float]
#: ``points(key, compute)``: the scores of one point, from a store of earlier results or by ``compute()``
Points = Callable[[str, Callable[[], Scores]], Scores]
SETUPS = ("multitask", "continual", "domain")


@dataclass
class Problem:
    """Models to merge and the evaluation of a merged encoder; any model family (see ``score_problems``)."""

    finetuned: Sequence[Any]  # state dicts, or checkpoint paths the merge reads lazily
    evaluate: Callable[[StateDict], Scores]


def _scorer(zoo: Zoo, items: list[tuple[str, Split, Tensor]]) -> Callable[[StateDict], Scores]:
    cfg = zoo.recipe.vit

    def evaluate(state: StateDict) -> Scores:
        return {name: train.accuracy(cfg, state, split, head) for name, split, head in items}

    return evaluate


def problems(zoo: Zoo, setup: str) -> list[Problem]:
    tasks = zoo.tasks
    if setup == "multitask":
        items = [(t.name, t.test, zoo.heads[t.name]) for t in tasks]
        return [Problem([zoo.finetuned[t.name] for t in tasks], _scorer(zoo, items))]
    if setup == "domain":
        return [
            Problem(
                [zoo.finetuned[o.name] for o in tasks if o.name != t.name],
                _scorer(zoo, [(t.name, t.test, zoo.heads[t.name])]),
            )
            for t in tasks
        ]
    return [
        Problem(run.sequential, _scorer(zoo, [(run.key, run.task.test, run.head)])) for run in zoo.continual
    ]


def baselines(
    zoo: Zoo, setup: str, multitask: dict[str, dict[str, object]] | None = None
) -> dict[str, dict[str, object]]:
    """Zero-shot heads on the pre-trained encoder, and the individual fine-tuned models.

    ``multitask``: this zoo's multi-task baselines, which domain generalisation shares (the same
    models, heads and test sets), so they are not evaluated twice."""
    cfg = zoo.recipe.vit
    if setup in ("multitask", "domain"):
        if multitask is not None:
            zero = dict(cast(Scores, multitask["zero_shot"]["per_task"]))
            own = dict(cast(Scores, multitask["individual"]["per_task"]))
        else:
            zero = {t.name: train.accuracy(cfg, zoo.pretrained, t.test, zoo.heads[t.name]) for t in zoo.tasks}
            own = {
                t.name: train.accuracy(cfg, zoo.finetuned[t.name], t.test, zoo.heads[t.name])
                for t in zoo.tasks
            }
        out = {"zero_shot": entry(zero), "individual": entry(own)}
        if setup == "domain":
            out["individual"]["note"] = "oracle: the held-out task's own fine-tuned model"
        return out
    zero, own, seq = {}, {}, {}
    zero_of: dict[str, float] = {}
    for run in zoo.continual:
        test, head = run.task.test, run.head
        if run.benchmark not in zero_of:
            zero_of[run.benchmark] = train.accuracy(cfg, zoo.pretrained, test, head)
        zero[run.key] = zero_of[run.benchmark]
        if run.individual is not None:
            own[run.key] = _routed_accuracy(zoo, run, run.individual)
        seq[run.key] = train.accuracy(cfg, run.sequential[-1], test, head)
    individual = entry(own) if own else {"per_task": {}, "average": float("nan")}
    individual["note"] = (
        "task-aware: each task's individual model on its own classes' test images and head rows "
        "(the splits whose tasks were also fine-tuned one by one)"
    )
    sequential = entry(seq)
    sequential["note"] = "the last model of sequential fine-tuning (no merging)"
    return {"zero_shot": entry(zero), "individual": individual, "sequential_finetuning": sequential}


def _routed_accuracy(zoo: Zoo, run: ContinualRun, models: list[StateDict]) -> float:
    test, head = run.task.test, run.head
    correct = 0.0
    for state, group in zip(models, run.class_groups, strict=True):
        index = torch.nonzero(torch.isin(test.labels, torch.tensor(group))).flatten()
        remap = torch.full((head.shape[0],), -1, dtype=torch.long)
        remap[torch.tensor(group)] = torch.arange(len(group))
        own = Split(test.images[index], remap[test.labels[index]])
        correct += len(index) * train.accuracy(zoo.recipe.vit, state, own, head[group]) / 100
    return 100.0 * correct / len(test)


def entry(per_task: Scores) -> dict[str, object]:
    return {"per_task": dict(per_task), "average": mean(per_task.values())}


def score_method(
    zoo: Zoo,
    setup: str,
    method: str,
    pools: tuple[str, ...],
    stride: int,
    clock: Stopwatch | None = None,
    points: Points | None = None,
) -> dict[str, object]:
    """λ sweep, tuned λ (best average on the evaluation data), λ = 1, and weaving with each pool."""
    search = zoo.recipe.lam_search == "coarse_to_fine" and stride == 1
    return score_problems(
        zoo.pretrained,
        problems(zoo, setup),
        zoo.seed,
        setup,
        method,
        pools,
        stride,
        points,
        clock=clock,
        coarse_to_fine=search,
    )


def method_points(zoo: Zoo, setup: str, method: str, pools: tuple[str, ...], stride: int) -> list[SweepPoint]:
    """Every point :func:`score_method` may score (the whole grid even where it searches coarse to
    fine, which then takes the points it needs): each one merge and one evaluation."""
    return sweep_points(zoo.pretrained, problems(zoo, setup), zoo.seed, setup, method, pools, stride)


@dataclass
class SweepPoint:
    """One point of a method's sweep: a problem's merge at ``lam`` (or woven with ``pool``), evaluated."""

    key: str
    problem: int
    lam: float | None
    pool: str | None
    compute: Callable[[], Scores]


def sweep_points(
    pretrained: StateDict,
    found: list[Problem],
    seed: int,
    setup: str,
    method: str,
    pools: Sequence[str],
    stride: int,
) -> list[SweepPoint]:
    """Every point :func:`score_problems` may score, with its keys; each is independent of the others
    (a problem's merges are shared by its points when they run in one process, made again otherwise)."""
    grid = paper_grid(method, setup, stride)
    weave_grid = paper_grid(method, setup, 1)
    pools = _with_recommended(pools)
    families = [_LazyFamily(pretrained, problem, method, seed, Stopwatch(), weave_grid) for problem in found]
    out = []  # in score_problems' order without the coarse-to-fine search: the sweep, then the weaves
    for index, family in enumerate(families):
        for lam in grid:
            key = f"{setup}/{method}/{index}/lam={lam}"
            out.append(SweepPoint(key, index, lam, None, functools.partial(family.evaluate_at, lam)))
    for index, family in enumerate(families):
        for pool in pools:
            key = f"{setup}/{method}/{index}/weave={pool}"
            compute = functools.partial(family.evaluate_woven, weave_grid, pools, pool)
            out.append(SweepPoint(key, index, None, pool, compute))
    return out


def _with_recommended(pools: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*pools, RECOMMENDED)))


def score_problems(
    pretrained: StateDict,
    found: list[Problem],
    seed: int,
    setup: str,
    method: str,
    pools: Sequence[str],
    stride: int,
    points: Points | None = None,
    clock: Stopwatch | None = None,
    coarse_to_fine: bool = False,
) -> dict[str, object]:
    """The model-agnostic part of :func:`score_method`: any encoder family's problems, scored alike.

    ``pretrained`` is the encoder's state dict and each problem's ``finetuned`` are state dicts or
    checkpoint paths (read lazily by the merge). ``points(key, compute)`` may answer a point from a
    store of earlier results (a resumed run, or points computed elsewhere: one Ray task each); a problem's merges are made only when a point needs them.
    ``clock`` sums the seconds of the merges, the sweep's evaluations, the weave and each pool's evaluation.
    ``coarse_to_fine``: :func:`search_grid` instead of every point (the sweep then lists the points
    evaluated).
    """
    clock = clock or Stopwatch()
    grid = paper_grid(method, setup, stride)
    weave_grid = paper_grid(method, setup, 1)
    pools = _with_recommended(pools)
    woven: dict[str, Scores] = {pool: {} for pool in pools}
    point = points or (lambda key, compute: compute())
    families = [_LazyFamily(pretrained, problem, method, seed, clock, weave_grid) for problem in found]
    sweep: dict[float, Scores] = {}

    def evaluate(lams: list[float]) -> dict[float, float]:
        sweep.update({lam: {} for lam in lams})
        for index, family in enumerate(families):  # problem by problem: the order points are stored in
            for lam in lams:
                key = f"{setup}/{method}/{index}/lam={lam}"
                sweep[lam].update(point(key, functools.partial(family.evaluate_at, lam)))
        return {lam: mean(sweep[lam].values()) for lam in lams}

    best = best_lam(search_grid(grid, evaluate) if coarse_to_fine else evaluate(grid))
    grid = sorted(sweep)
    for index, family in enumerate(families):
        for pool in pools:
            key = f"{setup}/{method}/{index}/weave={pool}"
            woven[pool].update(point(key, functools.partial(family.evaluate_woven, weave_grid, pools, pool)))
    tuned = entry(sweep[best])
    tuned.update({"lam": best, "note": "λ chosen on the evaluation data (privileged)"})
    names = list(sweep[grid[0]])
    recommended = entry(woven[RECOMMENDED])
    recommended.update({"strategy": RECOMMENDED, "note": "the suite's recommended data-free strategy"})
    return {
        "tuned": tuned,
        # the suite has no validation split: λ is chosen on the test set itself, so best = tuned
        "best": {**tuned, "privileged": True, "note": "λ chosen on the test set (privileged)"},
        "data_free": entry(sweep[1.0]),
        "weave": entry(woven["mean"]),
        "recommended": recommended,
        "weave_pools": {pool: entry(scores) for pool, scores in woven.items()},
        "sweep": {"lambdas": grid, "per_task": {n: [sweep[lam][n] for lam in grid] for n in names}},
        "best_lam_per_task": {n: _argmax(grid, [sweep[lam][n] for lam in grid]) for n in names},
        "weave_lambdas": weave_grid,
    }


class _LazyFamily:
    """A problem's merges, made on the first point that needs them (a resumed run may need none)."""

    def __init__(
        self,
        pretrained: StateDict,
        problem: Problem,
        method: str,
        seed: int,
        clock: Stopwatch,
        lams: Sequence[float],
    ) -> None:
        self.pretrained, self.problem, self.method, self.seed = pretrained, problem, method, seed
        self.clock, self.lams = clock, list(lams)  # every λ the sweep and the weave may ask for
        self.family: Callable[[float], StateDict] | None = None
        self.woven: dict[str, StateDict] | None = None

    def at(self, lam: float) -> StateDict:
        with self.clock("merge"):
            if self.family is None:
                self.family = merge_family(
                    self.pretrained, self.problem.finetuned, self.method, self.seed, self.lams
                )
            return self.family(lam)

    def evaluate_at(self, lam: float) -> Scores:
        state = self.at(lam)
        with self.clock("sweep"):
            return self.problem.evaluate(state)

    def evaluate_woven(self, lambdas: list[float], pools: Sequence[str], pool: str) -> Scores:
        """The weave with ``pool``; the first call weaves with every pool of ``pools`` at once."""
        if self.woven is None:
            with self.clock("weave"):
                self.woven = weave_pools(
                    self.pretrained,
                    self.problem.finetuned,
                    self.method,
                    lambdas,
                    pools,
                    self.seed,
                    self.family,
                )
        with self.clock(f"pool:{pool}"):
            return self.problem.evaluate(self.woven.pop(pool))


SEARCH_STRIDE = 3  # the first pass of search_grid: every third point of the grid


def best_lam(averages: dict[float, float]) -> float:
    """The λ of the highest average (ties: the one nearest 1)."""
    return max(averages, key=lambda lam: (averages[lam], -abs(lam - 1.0)))


def search_grid(
    grid: Sequence[float], evaluate: Callable[[list[float]], dict[float, float]], stride: int = SEARCH_STRIDE
) -> dict[float, float]:
    """The averages of the grid's points a hill climb evaluates, to find the grid's best λ cheaply.

    ``evaluate(lams)`` scores points and gives their averages. First every ``stride``-th point, both
    ends and λ = 1 (the data-free setting is always reported); then, while a grid neighbour of the best
    point so far is unscored, those neighbours. It stops at a point better than both grid neighbours,
    the full grid's best wherever the average has a single peak.
    """
    full = list(grid)
    first = sorted({*full[::stride], full[-1], *([1.0] if 1.0 in full else [])})
    seen = dict(evaluate(first))
    while True:
        at = full.index(best_lam(seen))
        near = [full[i] for i in (at - 1, at + 1) if 0 <= i < len(full) and full[i] not in seen]
        if not near:
            return seen
        seen.update(evaluate(near))


def _argmax(grid: list[float], values: list[float]) -> float:
    """The λ of the highest value (the first on ties)."""
    return grid[max(range(len(grid)), key=lambda i: (values[i], -i))]


def interference(zoo: Zoo, lam: float) -> dict[str, object]:
    """Task i's accuracy change under ``θ_pre + λ Δ_j`` (row i, column j), relative to zero-shot."""
    names = [t.name for t in zoo.tasks]
    evaluate = problems(zoo, "multitask")[0].evaluate
    scored = [
        evaluate(
            {k: zoo.pretrained[k] + lam * (zoo.finetuned[j][k] - zoo.pretrained[k]) for k in zoo.pretrained}
        )
        for j in names
    ]
    return interference_block(lam, names, evaluate(zoo.pretrained), scored)


def mean_offdiag(matrix: list[list[float]]) -> float:
    """Mean of the off-diagonal entries of a square matrix (0 for a 1×1 matrix)."""
    n = len(matrix)
    values = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    return mean(values) if values else 0.0


def cosine_summary(sequential: list[list[float]], individual: list[list[float]] | None) -> dict[str, Any]:
    """A continual benchmark's cosine diagnostic (paper Fig. 3); ``individual`` may be unknown (None)."""
    consecutive = [sequential[t][t + 1] for t in range(len(sequential) - 1)]
    out: dict[str, Any] = {"sequential": sequential}
    if individual is not None:
        out["individual"] = individual
    out["sequential_mean_offdiag"] = mean_offdiag(sequential)
    if individual is not None:
        out["individual_mean_offdiag"] = mean_offdiag(individual)
    out["sequential_consecutive"] = mean(consecutive) if consecutive else 0.0
    return out


def interference_block(lam: float, names: list[str], zero: Scores, scored: list[Scores]) -> dict[str, object]:
    """Interference at ``lam``: ``scored[j]`` are the accuracies under ``θ_pre + λ Δ_j``, ``zero`` at θ_pre."""
    rows = [[scored[j][name] - zero[name] for j in range(len(names))] for name in names]  # rows: task i
    off = [rows[i][j] for i in range(len(names)) for j in range(len(names)) if i != j]
    return {
        "lam": lam,
        "tasks": names,
        "delta": rows,
        "own_gain": mean(rows[i][i] for i in range(len(names))),
        "cross_effect": mean(off) if off else 0.0,
    }


def cosine_matrix(pretrained: StateDict, models: list[StateDict]) -> list[list[float]]:
    """Cosine similarity of the task vectors ``θ_t − θ_pre`` (all parameters, flattened)."""
    vectors = torch.stack(
        [torch.cat([(m[k] - pretrained[k]).flatten() for k in sorted(pretrained)]) for m in models]
    )
    unit = torch.nn.functional.normalize(vectors, dim=1)
    return (unit @ unit.T).tolist()


def continual_diagnostics(zoo: Zoo, run: ContinualRun, lams: Sequence[float]) -> dict[str, Any]:
    """Why a continual merge does (not) beat the zero-shot head, per task t of one split.

    Every accuracy is class-incremental (one head over all the benchmark's classes) on task t's test
    images: ``zero_shot`` under θ_pre; ``just_learned`` under θ_t of the sequence, right after task t;
    ``final`` under θ_N (``forgetting`` = just learned − final); ``individual`` under θ_t fine-tuned
    from θ_pre; ``survival[λ]`` the gain over zero-shot under ``θ_pre + λ·Δ_t`` (Δ_t individual), i.e.
    how much of a task's own gain is left at the scales a merge of N task vectors uses.
    """
    cfg, test, head, groups = zoo.recipe.vit, run.task.test, run.head, run.class_groups
    zero = train.group_accuracies(cfg, zoo.pretrained, test, head, groups)
    matrix = [train.group_accuracies(cfg, state, test, head, groups) for state in run.sequential]
    n = len(groups)
    out: dict[str, Any] = {
        "benchmark": run.benchmark,
        "n_tasks": n,
        "class_groups": groups,
        "zero_shot": zero,
        "sequential_matrix": matrix,  # row: after task s, column: task t
        "just_learned": [matrix[t][t] for t in range(n)],
        "final": matrix[-1],
        "forgetting": [matrix[t][t] - matrix[-1][t] for t in range(n)],
    }
    if run.individual is not None:
        own: list[float] = []
        survival: dict[str, list[float]] = {str(lam): [] for lam in lams}
        for t, (state, group) in enumerate(zip(run.individual, groups, strict=True)):
            own.append(train.group_accuracies(cfg, state, test, head, [group])[0])
            for lam in lams:
                scaled = {k: zoo.pretrained[k] + lam * (state[k] - zoo.pretrained[k]) for k in zoo.pretrained}
                survival[str(lam)].append(
                    train.group_accuracies(cfg, scaled, test, head, [group])[0] - zero[t]
                )
        out["individual"] = own
        out["survival"] = survival
    return out


def merged_per_task(zoo: Zoo, run: ContinualRun, method: str, lam: float | None) -> list[float]:
    """Each task's class-incremental accuracy under ``method``'s merge of the split's sequence:
    Weight Weaving (mean pool, the paper's grid) when ``lam`` is None, else the merge at ``lam``."""
    grid = paper_grid(method, "continual", 1)
    if lam is None:
        state = weave_pools(zoo.pretrained, run.sequential, method, grid, ["mean"], zoo.seed)["mean"]
    else:
        state = merge_family(zoo.pretrained, run.sequential, method, zoo.seed)(lam)
    return train.group_accuracies(zoo.recipe.vit, state, run.task.test, run.head, run.class_groups)
