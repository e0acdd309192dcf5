"""The methods that **use data** on the suite's multi-task setup, reported apart from the data-free ones.

* ``exemplar_projection`` (CAT Merging): unlabeled exemplars drawn from each task's *training* split
  (seeded); ``default`` = the method's defaults (λ = 1, c = 3, α = 1, 5 exemplars per task), ``tuned`` =
  λ chosen on the evaluation data over the paper's grid (privileged, like the data-free ``tuned``),
  and the accuracy at λ = 1 against exemplars per task (1, 2, 4, 8, 16).
* ``adamerging`` (layer-wise) and ``cart_adamerging`` (CART++): coefficients learned by entropy
  minimisation on the unlabeled *test* images of every task (test-time adaptation, as in the papers),
  with the frozen heads at the recipe's logit scale; ``default`` only.

Only the multi-task setup: domain generalisation holds the evaluated task out (no data of it may be
used) and continual learning has one shared head over a sequence, which the protocols leave open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from statistics import mean
from typing import Any

import torch
from torch import Tensor

from ..methods import UnitContext, get_method
from ..methods.base import seed_for
from ..methods.exemplar_projection import STATISTICS
from ..withdata.adamerging import cart_directions, learn_coefficients, task_vector_directions
from ..withdata.features import gather_statistics
from . import protocols, train
from .merging import paper_grid
from .model import build_model
from .zoo import StateDict, Zoo

log = logging.getLogger("weightweaving.suite")

EXEMPLAR_COUNTS = (1, 2, 4, 8, 16)
DEFAULT_EXEMPLARS = 5


def _exemplars(zoo: Zoo, count: int) -> list[Tensor]:
    out = []
    for task in zoo.tasks:
        gen = torch.Generator().manual_seed(seed_for(zoo.seed, "suite-exemplars", task.name))
        pick = torch.randperm(len(task.train), generator=gen)[:count]
        out.append(task.train.images[pick])
    return out


def cat_vector(zoo: Zoo, finetuned: Sequence[StateDict], count: int, **params: Any) -> StateDict:
    """CAT's merged task vector at λ = 1 (the method is linear in λ) with ``count`` exemplars per task."""
    model = build_model(zoo.recipe.vit, seed=0)
    stats = gather_statistics(model, zoo.pretrained, finetuned, _exemplars(zoo, count))
    method = get_method("exemplar_projection")
    p = method.parse_params(params)
    out = {}
    for name, base in zoo.pretrained.items():
        tv = torch.stack([ft[name].float() - base.float() for ft in finetuned])
        out[name] = method.merge_unit(tv, p, 1.0, UnitContext(name=name, extras={STATISTICS: stats}))
    return out


def _at(zoo: Zoo, vector: StateDict, lam: float) -> StateDict:
    return {k: (v.float() + lam * vector[k]).to(v.dtype) for k, v in zoo.pretrained.items()}


def _entry(scores: dict[str, float]) -> dict[str, Any]:
    return {"per_task": dict(scores), "average": mean(scores.values())}


def score_exemplar_projection(zoo: Zoo, stride: int) -> dict[str, Any]:
    (problem,) = protocols.problems(zoo, "multitask")
    vector = cat_vector(zoo, problem.finetuned, DEFAULT_EXEMPLARS)
    grid = paper_grid("exemplar_projection", "multitask", stride)
    sweep = {lam: problem.evaluate(_at(zoo, vector, lam)) for lam in grid}
    default = sweep[1.0] if 1.0 in sweep else problem.evaluate(_at(zoo, vector, 1.0))
    best = max(grid, key=lambda lam: (mean(sweep[lam].values()), -abs(lam - 1.0)))
    curve = {}
    for count in EXEMPLAR_COUNTS:
        scores = problem.evaluate(_at(zoo, cat_vector(zoo, problem.finetuned, count), 1.0))
        curve[str(count)] = mean(scores.values())
    tuned = _entry(sweep[best]) | {"lam": best, "note": "λ chosen on the evaluation data (privileged)"}
    return {
        "uses_data": True,
        "default": _entry(default) | {"lam": 1.0, "exemplars_per_task": DEFAULT_EXEMPLARS},
        "tuned": tuned,
        "exemplars_curve": {"lam": 1.0, "average": curve},
        "sweep": {"lambdas": grid, "average": [mean(sweep[lam].values()) for lam in grid]},
        "note": "unlabeled exemplars from each task's training split; c = 3, α = 1",
    }


def _heads(zoo: Zoo) -> list[Callable[[Tensor], Tensor]]:
    """Each task's frozen head at the recipe's logit scale (the entropy depends on the scale)."""
    return [partial(train.logits, head=zoo.heads[t.name], scale=zoo.recipe.logit_scale) for t in zoo.tasks]


def score_learned(zoo: Zoo, method: str, steps: int, lr: float = 1e-3) -> dict[str, Any]:
    (problem,) = protocols.problems(zoo, "multitask")
    model = build_model(zoo.recipe.vit, seed=0)
    if method == "adamerging":
        offset, directions = task_vector_directions(zoo.pretrained, problem.finetuned)
        init, bounds = 0.3, (0.0, 1.0)
    else:
        offset, directions = cart_directions(zoo.pretrained, problem.finetuned)
        init, bounds = 1.0, (0.0, 2.0)
    data = [t.test.images for t in zoo.tasks]
    tick = time.perf_counter()
    learned = learn_coefficients(
        model,
        offset,
        directions,
        data,
        _heads(zoo),
        steps=steps,
        lr=lr,
        init=init,
        bounds=bounds,
        seed=zoo.seed,
    )
    log.info("multitask / %s: coefficients learned in %.1f s", method, time.perf_counter() - tick)
    state = {k: v.to(zoo.pretrained[k].dtype) for k, v in learned.state_dict.items()}
    values = [v for vs in learned.coefficients.values() for v in vs]
    return {
        "uses_data": True,
        "default": _entry(problem.evaluate(state)) | {"steps": steps, "lr": lr, "init": init},
        "coefficients": {"mean": mean(values), "min": min(values), "max": max(values)},
        "loss": {"first": learned.losses[0], "last": learned.losses[-1]},
        "note": "coefficients learned on the unlabeled test images (test-time adaptation)",
    }


def score_with_data(zoo: Zoo, steps: int, lr: float, stride: int) -> dict[str, Any]:
    """results[multitask][method] for the three methods that use data."""
    out = {}
    tick = time.perf_counter()
    out["exemplar_projection"] = score_exemplar_projection(zoo, stride)
    log.info("multitask / exemplar_projection: %.1f s", time.perf_counter() - tick)
    for method in ("adamerging", "cart_adamerging"):
        tick = time.perf_counter()
        out[method] = score_learned(zoo, method, steps, lr)
        log.info("multitask / %s: %.1f s", method, time.perf_counter() - tick)
    return out
