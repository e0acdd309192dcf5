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
from typing import Any

import torch
from torch import Tensor

from . import train
from .data import Split
from .merging import merge_family, paper_grid, weave
from .profiles import RECOMMENDED
from .zoo import StateDict, Zoo

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
    head, test = zoo.heads["continual"], zoo.continual_task.test
    return [
        Problem(run.sequential, _scorer(zoo, [(f"split{run.n_tasks}", test, head)])) for run in zoo.continual
    ]


def baselines(zoo: Zoo, setup: str) -> dict[str, dict[str, object]]:
    """Zero-shot heads on the pre-trained encoder, and the individual fine-tuned models."""
    cfg = zoo.recipe.vit
    if setup in ("multitask", "domain"):
        zero = {t.name: train.accuracy(cfg, zoo.pretrained, t.test, zoo.heads[t.name]) for t in zoo.tasks}
        own = {
            t.name: train.accuracy(cfg, zoo.finetuned[t.name], t.test, zoo.heads[t.name]) for t in zoo.tasks
        }
        out = {"zero_shot": entry(zero), "individual": entry(own)}
        if setup == "domain":
            out["individual"]["note"] = "oracle: the held-out task's own fine-tuned model"
        return out
    test, head = zoo.continual_task.test, zoo.heads["continual"]
    zero_acc = train.accuracy(cfg, zoo.pretrained, test, head)
    zero, own, seq = {}, {}, {}
    for run in zoo.continual:
        key = f"split{run.n_tasks}"
        zero[key] = zero_acc
        own[key] = _routed_accuracy(zoo, run.individual, run.class_groups)
        seq[key] = train.accuracy(cfg, run.sequential[-1], test, head)
    individual = entry(own)
    individual["note"] = (
        "task-aware: each task's individual model on its own classes' test images and head rows"
    )
    sequential = entry(seq)
    sequential["note"] = "the last model of sequential fine-tuning (no merging)"
    return {"zero_shot": entry(zero), "individual": individual, "sequential_finetuning": sequential}


def _routed_accuracy(zoo: Zoo, models: list[StateDict], groups: list[list[int]]) -> float:
    test, head = zoo.continual_task.test, zoo.heads["continual"]
    correct = 0.0
    for state, group in zip(models, groups, strict=True):
        index = torch.nonzero(torch.isin(test.labels, torch.tensor(group))).flatten()
        remap = torch.full((head.shape[0],), -1, dtype=torch.long)
        remap[torch.tensor(group)] = torch.arange(len(group))
        own = Split(test.images[index], remap[test.labels[index]])
        correct += len(index) * train.accuracy(zoo.recipe.vit, state, own, head[group]) / 100
    return 100.0 * correct / len(test)


def entry(per_task: Scores) -> dict[str, object]:
    return {"per_task": dict(per_task), "average": mean(per_task.values())}


def score_method(
    zoo: Zoo, setup: str, method: str, pools: tuple[str, ...], stride: int, points: Points | None = None
) -> dict[str, object]:
    """λ sweep, tuned λ (best average on the evaluation data), λ = 1, and weaving with each pool."""
    return score_problems(
        zoo.pretrained, problems(zoo, setup), zoo.seed, setup, method, pools, stride, points
    )


def method_points(zoo: Zoo, setup: str, method: str, pools: tuple[str, ...], stride: int) -> list[SweepPoint]:
    """The points of :func:`score_method`, in its order: each one merge and one evaluation."""
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
    """Every point :func:`score_problems` scores, in its order; each is independent of the others
    (a problem's merges are shared by its points when they run in one process, made again otherwise)."""
    grid = paper_grid(method, setup, stride)
    weave_grid = paper_grid(method, setup, 1)
    out = []
    for index, problem in enumerate(found):
        family = _LazyFamily(pretrained, problem, method, seed)
        for lam in grid:
            key = f"{setup}/{method}/{index}/lam={lam}"
            out.append(SweepPoint(key, index, lam, None, functools.partial(family.evaluate_at, lam)))
        for pool in _with_recommended(pools):
            key = f"{setup}/{method}/{index}/weave={pool}"
            compute = functools.partial(family.evaluate_woven, weave_grid, pool)
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
) -> dict[str, object]:
    """The model-agnostic part of :func:`score_method`: any encoder family's problems, scored alike.

    ``pretrained`` is the encoder's state dict and each problem's ``finetuned`` are state dicts or
    checkpoint paths (read lazily by the merge). ``points(key, compute)`` may answer a point from a
    store of earlier results (a resumed run, or points computed elsewhere: one Ray task each); a
    problem's merges are made only when a point needs them.
    """
    grid = paper_grid(method, setup, stride)
    weave_grid = paper_grid(method, setup, 1)
    sweep: dict[float, Scores] = {lam: {} for lam in grid}
    pools = _with_recommended(pools)
    woven: dict[str, Scores] = {pool: {} for pool in pools}
    point = points or (lambda key, compute: compute())
    for item in sweep_points(pretrained, found, seed, setup, method, pools, stride):
        scores = point(item.key, item.compute)
        if item.pool is None:
            assert item.lam is not None
            sweep[item.lam].update(scores)
        else:
            woven[item.pool].update(scores)
    averages = {lam: mean(scores.values()) for lam, scores in sweep.items()}
    best = max(grid, key=lambda lam: (averages[lam], -abs(lam - 1.0)))
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

    def __init__(self, pretrained: StateDict, problem: Problem, method: str, seed: int) -> None:
        self.pretrained, self.problem, self.method, self.seed = pretrained, problem, method, seed
        self.family: Callable[[float], StateDict] | None = None

    def at(self, lam: float) -> StateDict:
        if self.family is None:
            self.family = merge_family(self.pretrained, self.problem.finetuned, self.method, self.seed)
        return self.family(lam)

    def evaluate_at(self, lam: float) -> Scores:
        return self.problem.evaluate(self.at(lam))

    def evaluate_woven(self, lambdas: list[float], pool: str) -> Scores:
        merged = weave(
            self.pretrained, self.problem.finetuned, self.method, lambdas, pool, self.seed, self.family
        )
        return self.problem.evaluate(merged)


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
