"""The suite's only door to the library's merging: ``weightweaving.merge``, ``merge_sweep`` and ``weave``.

A λ sweep of a method that declares itself linear (or affine) in λ needs one or two merges, not
one per grid point: ``M(λ) = λ·g`` (or ``a + λ·b``) is read off the merge at λ = 1 (and λ = 2).
A ``NONLINEAR`` method (SVC) is merged at every point of its grid at once by
``weightweaving.merge_sweep``, which does the λ-independent work once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import weightweaving
from weightweaving.methods import LamKind

log = logging.getLogger("weightweaving.suite")

StateDict = dict[str, Tensor]


def resolve(label: str) -> tuple[str, dict[str, Any]]:
    """The registered method and hyperparameters behind a suite label (``svc_tsv`` = svc over TSV)."""
    from .profiles import METHOD_SPECS

    method, hyperparameters = METHOD_SPECS.get(label, (label, {}))
    return method, dict(hyperparameters)


def paper_grid(method: str, setup: str, stride: int = 1) -> list[float]:
    """The paper's λ grid for ``method`` in ``setup`` (step 0.1, ends included), every ``stride``-th point.

    λ = 1 is always included (it is the data-free setting the suite reports). SVC's λ is its base's,
    so it takes its base's range.
    """
    name, hyperparameters = resolve(method)
    if name == "svc":
        name = str(hyperparameters.get("base", "task_arithmetic"))
    a, b = weightweaving.get_method(name).paper_lam_ranges[setup]
    grid = [round(a + i * 0.1, 10) for i in range(round((b - a) / 0.1) + 1)]
    picked = grid[::stride]
    if grid[-1] not in picked:
        picked.append(grid[-1])
    if a <= 1.0 <= b and 1.0 not in picked:
        picked = sorted([*picked, 1.0])
    return picked


def merge_family(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    method: str,
    seed: int,
    lams: Sequence[float] | None = None,
) -> Callable[[float], StateDict]:
    """λ -> merged state dict, with as few library merges as the method's λ-form allows.

    ``lams``: the points a ``NONLINEAR`` method will be asked for; the first of them asked makes
    them all in one ``weightweaving.merge_sweep`` (any other λ is one ``merge``).
    """
    name, hyperparameters = resolve(method)
    kind = weightweaving.get_method(name).lam_kind
    models = list(finetuned)

    def call(lam: float) -> StateDict:
        merged = weightweaving.merge(
            pretrained, models, method=name, lam=lam, seed=seed, progress=False, **hyperparameters
        )
        assert isinstance(merged, dict)
        return merged

    if kind is LamKind.LINEAR:
        at_one = call(1.0)
        slope = {k: at_one[k] - pretrained[k] for k in pretrained}
        return lambda lam: {k: pretrained[k] + lam * slope[k] for k in pretrained}
    if kind is LamKind.AFFINE:
        at_one, at_two = call(1.0), call(2.0)
        slope = {k: at_two[k] - at_one[k] for k in pretrained}
        offset = {k: at_one[k] - pretrained[k] - slope[k] for k in pretrained}
        return lambda lam: {k: pretrained[k] + offset[k] + lam * slope[k] for k in pretrained}
    if kind is LamKind.NONLINEAR:  # no closed form: the sweep's λ-independent work shared
        wanted = [float(lam) for lam in lams or []]
        made: dict[float, StateDict] = {}

        def at(lam: float) -> StateDict:
            if lam not in wanted:
                return call(lam)
            if not made:
                made.update(
                    weightweaving.merge_sweep(
                        pretrained, models, name, wanted, seed=seed, progress=False, **hyperparameters
                    )
                )
            return made[lam]

        return at
    constant = call(1.0)
    return lambda lam: constant


def weave(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    method: str,
    lambdas: Sequence[float],
    pool: str,
    seed: int,
    family: Callable[[float], StateDict] | None = None,
) -> StateDict:
    """Weight Weaving over ``A* = Δ ∪ {f(Δ, λ_i)}`` with ``pool``, through ``weightweaving.weave``.

    Until the library exposes ``weave`` the suite uses the paper's closed form for methods linear
    in λ (and says so in the log); the two agree by construction of Algorithm 1.
    """
    models = list(finetuned)
    if hasattr(weightweaving, "weave"):
        name, hyperparameters = resolve(method)
        woven = weightweaving.weave(
            pretrained,
            models,
            method=name,
            lambdas=list(lambdas),
            pool=pool,
            pool_over="all",
            seed=seed,
            progress=False,
            **hyperparameters,
        )
        assert isinstance(woven, dict)
        return woven
    log.info("weightweaving.weave is not available yet: using the suite's closed form for %s", method)
    family = family or merge_family(pretrained, models, method, seed)
    return _closed_form_weave(pretrained, models, family, list(lambdas), pool, seed)


def weave_pools(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    method: str,
    lambdas: Sequence[float],
    pools: Sequence[str],
    seed: int,
    family: Callable[[float], StateDict] | None = None,
) -> dict[str, StateDict]:
    """Weight Weaving with every pool in ``pools`` at once: ``{pool: woven state dict}``.

    ``weightweaving.weave`` computes the method's merge again for each call; the members
    ``A* = Δ ∪ {f(Δ, λ_i)}`` are the same for every pool, so here they are read once off ``family``
    (for a method linear or affine in λ ``a`` and ``b``, two merges at most; for a ``NONLINEAR`` one
    (SVC) its merge at every λ, one ``merge_sweep``) and folded into each pool through the library's
    own pool objects, member by member in ``weightweaving.weave``'s order (task vectors first). A
    pool that is a merge method takes ``weightweaving.weave``. Equal to calling ``weave`` once per
    pool up to float rounding (tests/suite/test_continual.py).
    """
    from weightweaving.methods import LamForm, UnitContext
    from weightweaving.weaving.pools import MethodPool, make_pool

    models = list(finetuned)
    if not isinstance(pretrained, Mapping) or not all(isinstance(m, Mapping) for m in models):
        # checkpoint paths (``reproduce``): the library reads them lazily, one weave per pool
        return {p: weave(pretrained, models, method, lambdas, p, seed) for p in pools}
    name, _ = resolve(method)
    kind = weightweaving.get_method(name).lam_kind
    made = {pool: make_pool(pool) for pool in pools}
    direct = [p for p in pools if isinstance(made[p], MethodPool)]
    out = {p: weave(pretrained, models, method, lambdas, p, seed) for p in direct}
    folded = [p for p in pools if p not in out]
    if not folded:
        return out
    lams = [float(lam) for lam in lambdas]
    family = family or merge_family(pretrained, models, method, seed, lams)
    nonlinear = kind is LamKind.NONLINEAR
    at_lams = [family(lam) for lam in lams] if nonlinear else []
    at_zero, at_one = (None, None) if nonlinear else (family(0.0), family(1.0))
    results: dict[str, StateDict] = {p: {} for p in folded}
    for key, base in pretrained.items():
        vectors = [m[key].float() - base.float() for m in models]
        # (form, λs) in weightweaving.weave's order: one group for a λ-form, else one member per λ
        groups: list[tuple[LamForm, tuple[float, ...]]]
        if nonlinear:
            groups = [
                (LamForm(offset=m[key].float() - base.float(), slope=None), (lam,))
                for m, lam in zip(at_lams, lams, strict=True)
            ]
        else:
            assert at_zero is not None and at_one is not None
            offset = at_zero[key].float() - base.float()
            slope = at_one[key].float() - at_zero[key].float()
            form = LamForm(offset=None if kind is LamKind.LINEAR else offset, slope=slope)
            if kind is LamKind.NONE:  # no λ: the same member at every point
                form = LamForm(offset=at_one[key].float() - base.float(), slope=None)
            groups = [(form, tuple(lams))]
        ctx = UnitContext(name=key, seed=seed, shape=tuple(base.shape))
        for p in folded:
            pool = copy.copy(made[p])
            pool.begin(len(vectors) + len(lams), vectors[0], ctx)
            for index, vector in enumerate(vectors):
                pool.add(LamForm(offset=vector, slope=None), (None,), index)
            index = len(vectors)
            for form, group_lams in groups:
                pool.add(form, group_lams, index)
                index += len(group_lams)
            results[p][key] = (base.float() + pool.result()).to(base.dtype)
    out.update(results)
    return {p: out[p] for p in pools}


def _closed_form_weave(
    pretrained: StateDict,
    finetuned: list[StateDict],
    family: Callable[[float], StateDict],
    lambdas: list[float],
    pool: str,
    seed: int,
) -> StateDict:
    merged = [family(lam) for lam in lambdas]
    out = {}
    gen = torch.Generator().manual_seed(seed)
    for name, base in pretrained.items():
        members = torch.stack(
            [m[name] - base for m in finetuned] + [m[name] - base for m in merged]
        )  # (N, ...)
        if pool == "mean":
            pooled = members.mean(0)
        elif pool == "magmax":
            pick = members.abs().flip(0).argmax(0, keepdim=True)
            pooled = members.flip(0).gather(0, pick).squeeze(0)
        else:
            pick = torch.randint(0, len(members), base.shape, generator=gen).unsqueeze(0)
            pooled = members.gather(0, pick).squeeze(0)
        out[name] = base + pooled
    return out


def available_methods(wanted: Sequence[str]) -> list[str]:
    """The wanted methods that this build registers; the others are skipped with a logged note."""
    registered = set(weightweaving.list_methods())
    missing = [m for m in wanted if resolve(m)[0] not in registered]
    if missing:
        log.warning("skipping methods not registered in this build: %s", ", ".join(missing))
    return [m for m in wanted if m not in missing]
