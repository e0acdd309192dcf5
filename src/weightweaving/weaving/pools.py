"""Pooling functions of Weight Weaving, folded member group by member group.

Members arrive as groups ``(form, lams)``: a :class:`LamForm` ``offset + λ·slope`` and the λ values at
which it is a member (a task vector is a group of one with no slope). Each pool keeps a running state
the size of one tensor, so memory does not grow with the search space, and a linear or affine method
contributes all its λ members in one step (the closed forms of docs/algorithms.md).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from ..errors import OptionError, did_you_mean
from ..methods.base import LamForm, UnitContext


class Pool(abc.ABC):
    """Folds members into one merged task vector for one unit."""

    name = ""
    settings: ClassVar[type[BaseModel] | None] = None  # the pool's hyperparameters, if it takes any
    # True when each entry of the result depends only on that entry of the members (and a random
    # draw made with ``ctx.piece_draws``): a weave with this pool may then merge in chunks of rows
    row_chunks: ClassVar[bool] = False

    def configure(self, p: BaseModel) -> None:
        """Receive validated hyperparameters (pools with ``settings`` override this)."""
        raise OptionError(f"pool '{self.name}' takes no hyperparameters")

    @abc.abstractmethod
    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        """Start a unit with ``num_members`` members shaped like ``like``."""

    @abc.abstractmethod
    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        """Fold the members ``form.at(λ)`` for λ in ``lams`` (member indices from ``first_index``)."""

    @abc.abstractmethod
    def result(self) -> Tensor:
        """The pooled merged task vector of the unit."""


def _member(form: LamForm, lam: float | None) -> Tensor:
    return form.at(1.0 if lam is None else lam) if form.slope is not None else form.offset  # type: ignore[return-value]


class MeanPool(Pool):
    """Arithmetic mean of the members: Σ (offset + λ·slope) = n·offset + (Σλ)·slope per group."""

    name = "mean"
    row_chunks = True

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.total = torch.zeros_like(like)
        self.count = num_members

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if form.offset is not None:
            self.total.add_(form.offset, alpha=float(len(lams)))
        if form.slope is not None:
            self.total.add_(form.slope, alpha=float(sum(1.0 if lam is None else lam for lam in lams)))

    def result(self) -> Tensor:
        return self.total.div_(self.count)


class MagMaxPool(Pool):
    """Per entry the member of largest magnitude; on equal magnitude the later member wins.

    Within a group only the extreme λ can win: ``|λ·g|`` is largest at the largest ``|λ|``, and
    ``|a + λ·b|`` is convex in λ, so its maximum is at the smallest or the largest λ.
    """

    name = "magmax"
    row_chunks = True

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.best: Tensor | None = None

    def _fold(self, value: Tensor) -> None:
        if self.best is None:
            self.best = value.clone()
        else:
            self.best = torch.where(value.abs() >= self.best.abs(), value, self.best)

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if form.slope is None:
            self._fold(form.offset)  # type: ignore[arg-type]  # every member of the group is equal
            return
        values = [1.0 if lam is None else lam for lam in lams]
        if form.offset is None:
            top = max(abs(v) for v in values)
            candidates = [i for i, v in enumerate(values) if abs(v) == top]
        else:
            low, high = min(values), max(values)
            candidates = sorted(
                {
                    max(i for i, v in enumerate(values) if v == low),
                    max(i for i, v in enumerate(values) if v == high),
                }
            )
        for i in candidates:  # member order, so later members still win ties
            self._fold(form.at(values[i]))

    def result(self) -> Tensor:
        assert self.best is not None
        return self.best


class RandomPool(Pool):
    """Per entry one member drawn uniformly at random (seeded from the seed and parameter name)."""

    name = "random"
    row_chunks = True

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        def draw(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
            return torch.randint(num_members, shape, generator=gen, dtype=torch.int64)  # 32 bits per entry

        self.choice = ctx.piece_draws(draw, tuple(like.shape), "weave-random-pool").to(like.device)
        self.out = torch.zeros_like(like)

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        local = self.choice - first_index
        mask = (local >= 0) & (local < len(lams))
        if not bool(mask.any()):
            return
        if form.slope is None:
            self.out = torch.where(mask, form.offset, self.out)  # type: ignore[arg-type]
            return
        lam_table = torch.tensor(
            [1.0 if lam is None else lam for lam in lams], dtype=self.out.dtype, device=self.out.device
        )
        lam_each = lam_table[local.clamp(0, len(lams) - 1)]
        value = lam_each * form.slope if form.offset is None else form.offset + lam_each * form.slope
        self.out = torch.where(mask, value, self.out)

    def result(self) -> Tensor:
        return self.out


class MethodPool(Pool):
    """Any registered merge method applied to the members as task vectors, at λ = 1.

    The method needs all members of the unit at once, so this pool holds them (N tensors).
    """

    def __init__(self, method_name: str, hyperparameters: dict[str, Any] | None = None) -> None:
        from ..methods import get_method

        self.method = get_method(method_name)
        self.params = self.method.parse_params(hyperparameters or {})
        self.name = method_name
        self.stats: Any = None

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.members: list[Tensor] = []
        self.ctx = ctx

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        self.members.extend(_member(form, lam) for lam in lams)

    def result(self) -> Tensor:
        import dataclasses

        stacked = torch.stack(self.members)  # (N, *shape)
        self.members = []
        ctx = dataclasses.replace(self.ctx, stats=self.stats)
        return self.method.merge_unit(stacked, self.params, 1.0, ctx)


BUILTIN_POOLS: dict[str, type[Pool]] = {"mean": MeanPool, "random": RandomPool, "magmax": MagMaxPool}


def register_pool(name: str) -> Callable[[type[Pool]], type[Pool]]:
    """Class decorator: make a :class:`Pool` available under ``name`` (a name registered twice raises)."""

    def wrap(cls: type[Pool]) -> type[Pool]:
        if name in BUILTIN_POOLS:
            raise ValueError(f"pool '{name}' is registered twice")
        cls.name = name
        BUILTIN_POOLS[name] = cls
        return cls

    return wrap


def make_pool(name: str, hyperparameters: dict[str, Any] | None = None) -> Pool:
    """A registered pool (``mean``, ``random``, ``magmax``, ``median``, ...) or a registered method
    used as a pool."""
    if name in BUILTIN_POOLS:
        cls = BUILTIN_POOLS[name]
        if cls.settings is None:
            if hyperparameters:
                raise OptionError(f"pool '{name}' takes no hyperparameters")
            return cls()
        try:
            p = cls.settings(**(hyperparameters or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ())) or "?"
            if first.get("type") == "extra_forbidden":
                raise OptionError(f"pool '{name}' has no hyperparameter '{loc}'") from None
            raise OptionError(
                f"pool '{name}': hyperparameter '{loc}': {first.get('msg', 'invalid')}"
            ) from None
        pool = cls()
        pool.configure(p)
        return pool
    from ..methods import list_methods

    if name not in list_methods():
        pools = [*BUILTIN_POOLS, *(m for m in list_methods() if m not in BUILTIN_POOLS)]
        raise OptionError(
            f"unknown pool '{name}'; valid pools: {', '.join(pools)}{did_you_mean(name, pools)}"
        )
    return MethodPool(name, hyperparameters)
