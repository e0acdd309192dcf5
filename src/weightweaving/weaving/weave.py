"""Weight Weaving (Chaves, Valle, Avila 2025, Algorithm 1) over any registered method, in one pass.

θ = θ_pre + P(A*) with A* = Δ ∪ {f(Δ, λ_i)} (``pool_over="all"``) or A = {f(Δ, λ_i)} (``"merged"``).
Per parameter tensor, members are produced and folded into the pool straight away; a method that is
linear or affine in λ is called once per group of points that differ only in λ; a ``NONLINEAR`` one
(SVC) makes each group's members one by one (``Method.merge_unit_sweep``: SVC over a linear base
shares one base merge and one SVD), each folded before the next, so memory stays independent of L.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..api import method_stats, run_job, scale_task_vectors, with_stats
from ..checkpoints.open import Source
from ..engine import Executor, Runner
from ..errors import OptionError
from ..methods import LamForm, LamKind, UnitContext, get_method
from ..methods.base import Scope
from .pools import MethodPool, Pool, make_pool
from .search import Group, build_groups, parse_lambdas

POOL_OVER = ("all", "merged")


class Weaver:
    """The per-unit function of a weave: members of one tensor, folded into a pool."""

    def __init__(
        self,
        method_name: str,
        groups: Sequence[Group],
        pool: Pool,
        pool_over: str,
        *,
        closed_form: bool = True,
    ) -> None:
        if pool_over not in POOL_OVER:
            raise OptionError(f"--pool-over '{pool_over}' is not one of: {', '.join(POOL_OVER)}")
        self.method = get_method(method_name)
        self.groups = list(groups)
        self.params = [self.method.parse_params(g.hyperparameters) for g in self.groups]
        self.pool = pool
        self.pool_over = pool_over
        self.closed_form = closed_form
        self.stats: list[Any] = [None] * len(self.groups)

    @property
    def num_merged(self) -> int:
        return sum(len(g.lams) for g in self.groups)

    @property
    def row_chunks(self) -> bool:
        """True when every member and the pool work row by row: units are merged in chunks of rows."""
        return all(self.method.row_chunks(p) for p in self.params) and self.pool.row_chunks

    @property
    def one_thread(self) -> bool:
        """True when every member's merge runs best on one intra-op thread (``Method.one_thread``) and
        the pool works row by row: the weave then runs as ``merge`` would."""
        return all(self.method.one_thread(p) for p in self.params) and self.pool.row_chunks

    def prepare(self, runner: Any) -> None:
        """First passes: each group's global statistics, then (for a global pool method) the pool's."""
        member_stats = isinstance(self.pool, MethodPool) and (
            self.pool.method.scope_of(self.pool.params) is Scope.GLOBAL
        )
        # a fused stage (TIES's sign) runs with the weave pass, unless the pool's own first passes
        # need every member, and so every statistic, before it
        runner.row_chunks = self.row_chunks
        self.stats = [None] * len(self.params)
        for i, p in enumerate(self.params):
            deliver = None if member_stats else functools.partial(self.stats.__setitem__, i)
            self.stats[i] = method_stats(self.method, p, runner, deliver=deliver)
        if member_stats:
            assert isinstance(self.pool, MethodPool)

            def member_scan(fn: Any) -> list[Any]:
                return runner.scan(lambda tv, ctx: fn(self.members(tv, ctx), ctx), desc="scanning members")

            self.pool.stats = self.pool.method.global_stats(member_scan, self.pool.params, runner.seed)

    def _member_groups(self, task_vectors: Tensor, ctx: UnitContext) -> Any:
        """Yield ``(form, lams)`` in member order: task vectors first (for ``all``), then Λ."""
        if self.pool_over == "all":
            for t in range(task_vectors.shape[0]):
                yield LamForm(offset=task_vectors[t], slope=None), (None,)
        for group, p, stats in zip(self.groups, self.params, self.stats, strict=True):
            unit_ctx = with_stats(ctx, stats)
            if self.closed_form and self.method.lam_kind is not LamKind.NONLINEAR:
                yield self.method.compute(task_vectors, p, unit_ctx), group.lams
            elif self.closed_form:  # no closed form: the λ-free work once, each member folded in turn
                sweep = self.method.merge_unit_sweep(task_vectors, p, group.lams, unit_ctx)
                for lam, member in zip(group.lams, sweep, strict=True):
                    yield LamForm(offset=member, slope=None), (lam,)
            else:  # the general path: f evaluated afresh at every point, folded straight away
                for lam in group.lams:
                    yield (
                        LamForm(offset=self.method.merge_unit(task_vectors, p, lam, unit_ctx), slope=None),
                        (lam,),
                    )

    def members(self, task_vectors: Tensor, ctx: UnitContext) -> Tensor:
        """Every member of A* stacked (N, *shape); for global pool statistics and for tests."""
        out: list[Tensor] = []
        for form, lams in self._member_groups(task_vectors, ctx):
            out.extend(
                form.at(1.0 if lam is None else lam) if form.slope is not None else form.offset
                for lam in lams
            )
        return torch.stack(out)

    def __call__(self, task_vectors: Tensor, ctx: UnitContext) -> Tensor:
        num = self.num_merged + (task_vectors.shape[0] if self.pool_over == "all" else 0)
        pool = copy.copy(self.pool)  # per-unit state: executors may run several units at once
        pool.begin(num, task_vectors[0], ctx)
        index = 0
        for form, lams in self._member_groups(task_vectors, ctx):
            pool.add(form, lams, index)
            index += len(lams)
        return pool.result()


def weave(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str = "task_arithmetic",
    lambdas: str | float | Sequence[float] | None = None,
    *,
    pool: str = "mean",
    pool_over: str = "all",
    setup: str = "multitask",
    search: Mapping[str, Sequence[Any]] | None = None,
    points: Sequence[Mapping[str, Any]] | None = None,
    pool_hyperparameters: dict[str, Any] | None = None,
    closed_form: bool = True,
    task_weights: str | Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    shard_size: str | int | None = None,
    overwrite: bool = False,
    common_only: bool = False,
    allow_nonfinite: bool = False,
    workers: int = 1,
    executor: Executor | str | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
    vocab: str = "error",
    out_lora: int | None = None,
    resource_check: bool = True,
    **hyperparameters: Any,
) -> dict[str, Tensor] | Path:
    """Weight Weaving: pool a method's merges over a search space with the task vectors.

    Args:
        pretrained, finetuned: as in :func:`weightweaving.merge`.
        method: the base method ``f``.
        lambdas: Λ as a list, ``"start:stop:step"`` or ``"a,b,c"``; default: the paper's range for
            ``method`` in ``setup`` (``multitask``, ``continual`` or ``domain``).
        pool: ``mean``, ``random``, ``magmax`` or any registered method name (used at λ = 1, with
            ``pool_hyperparameters``).
        pool_over: ``all`` (A* = Δ ∪ A, the paper's default) or ``merged`` (A alone).
        search: a grid over other hyperparameters, e.g. ``{"k": [0.1, 0.2]}`` (product with Λ).
        points: explicit hyperparameter sets instead of a grid; each may carry its own ``lam``.
        closed_form: fold whole λ groups at once and share a ``NONLINEAR`` method's λ-free work
            (default); ``False`` evaluates the method afresh at every point.
        task_weights: scale each Δ_t before everything else (members included): numbers, or
            ``"auto:metagpt"`` / ``"auto:nan"`` (data-free estimates times T, see ``merge``).
        **hyperparameters: fixed hyperparameters of the method; other keywords as in ``merge``.

    Returns:
        The woven state dict, or the output folder when ``out`` is given.

    Example:
        >>> import torch, weightweaving
        >>> base = {"w": torch.zeros(2)}
        >>> tuned = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
        >>> woven = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=[0.5, 1.0], pool="mean")
        >>> woven["w"]  # mean of Δ1, Δ2, 0.5·(Δ1+Δ2), 1.0·(Δ1+Δ2)
        tensor([0.6250, 0.6250])
    """
    chosen = get_method(method)
    if not isinstance(finetuned, (str, os.PathLike, Mapping)):
        chosen.check_num_models(len(finetuned))
    lam_list = parse_lambdas(lambdas)
    groups = build_groups(
        chosen, lambdas=lam_list, setup=setup, fixed=hyperparameters, search=search, points=points
    )
    weaver = Weaver(method, groups, make_pool(pool, pool_hyperparameters), pool_over, closed_form=closed_form)

    def prepare(runner: Runner) -> Weaver:
        scale_task_vectors(runner, task_weights, record)
        weaver.prepare(runner)
        return weaver

    searched = set(search or {}) | {name for point in points or [] for name in point}
    resolved = chosen.parse_params(hyperparameters).model_dump(mode="json")
    fixed = {name: value for name, value in resolved.items() if name not in searched}  # shared by every point
    pool_params = (
        weaver.pool.params.model_dump(mode="json")
        if isinstance(weaver.pool, MethodPool)
        else dict(pool_hyperparameters or {})
    )
    record = {
        "operation": "weave",
        "method": method,
        "hyperparameters": fixed,
        "weave": {  # every point of the search space, resolved: a rerun gives the same groups
            "lambdas": list(groups[0].lams),
            "pool": pool,
            "pool_over": pool_over,
            "setup": setup,
            "points": [
                {**chosen.parse_params(g.hyperparameters).model_dump(mode="json"), "lam": list(g.lams)}
                for g in groups
            ],
            "pool_hyperparameters": pool_params,
        },
    }
    return run_job(
        pretrained,
        finetuned,
        prepare,
        record,
        out=out,
        overwrite=overwrite,
        shard_size=shard_size,
        desc="weaving",
        resource_check=resource_check,
        row_chunks=weaver.row_chunks and out_lora is None,
        entrywise=weaver.one_thread and out_lora is None,
        device=device,
        dtype=dtype,
        compute_dtype=compute_dtype,
        include=include,
        exclude=exclude,
        seed=seed,
        common_only=common_only,
        allow_nonfinite=allow_nonfinite,
        executor=executor,
        ray_address=ray_address,
        workers=workers,
        progress=progress,
        vocab=vocab,
        out_lora=out_lora,
    )
