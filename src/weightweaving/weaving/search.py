"""Search spaces: λ grids, grids over other hyperparameters, and their grouping for one-merge pooling.

A search space is an ordered list of points (hyperparameter sets, λ included). Points that differ only
in λ form one group: the method runs once per group and every λ of the group is a member for free.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..methods.base import LamKind, Method

SETUPS = ("multitask", "continual", "domain")
FALLBACK_RANGE = (0.1, 1.0)  # docs/algorithms.md: methods outside the paper use 0.1–1.0


def grid(start: float, stop: float, step: float = 0.1) -> list[float]:
    """Equally spaced values, both ends included: ``round(start + i·step, 10)``."""
    if step <= 0:
        raise OptionError(f"λ grid step must be positive, got {step}")
    if stop < start:
        raise OptionError(f"λ grid {start}:{stop}:{step} is empty (stop < start)")
    count = round((stop - start) / step)
    return [round(start + i * step, 10) for i in range(count + 1)]


def parse_lambdas(spec: str | float | Sequence[float] | None) -> list[float] | None:
    """``"0.1:1.0:0.1"`` (start:stop[:step]), ``"0.2,0.5,1"``, a number, or a list."""
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        return [float(spec)]
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                parts = [float(x) for x in text.split(":")]
                if len(parts) not in (2, 3):
                    raise ValueError
                values = grid(parts[0], parts[1], parts[2] if len(parts) == 3 else 0.1)
            else:
                values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise OptionError(
                f"--lambdas '{spec}' is neither start:stop:step nor a comma-separated list"
            ) from None
    else:
        try:
            values = [float(x) for x in spec]
        except (TypeError, ValueError):
            raise OptionError(f"lambdas {spec!r} must be numbers") from None
    if not values:
        raise OptionError("the λ search space is empty")
    if not all(math.isfinite(v) for v in values):
        raise OptionError(f"--lambdas {spec!r} holds a value that is not a finite number")
    return values


def default_lambdas(method: Method, setup: str = "multitask") -> list[float]:
    """The paper's λ range for ``method`` in ``setup`` (0.1–1.0 where the paper has none)."""
    if setup not in SETUPS:
        raise OptionError(f"setup '{setup}' is not one of: {', '.join(SETUPS)}")
    start, stop = method.paper_lam_ranges.get(setup, FALLBACK_RANGE)
    return grid(start, stop)


@dataclass(frozen=True)
class Group:
    """Points that share every hyperparameter but λ: one method call, ``len(lams)`` members."""

    hyperparameters: dict[str, Any]
    lams: tuple[float, ...]


def build_groups(
    method: Method,
    *,
    lambdas: list[float] | None,
    setup: str,
    fixed: Mapping[str, Any],
    search: Mapping[str, Sequence[Any]] | None,
    points: Sequence[Mapping[str, Any]] | None,
) -> list[Group]:
    """Expand the search space into groups, in member order (λ varies fastest)."""
    if points is not None and search:
        raise OptionError("give either a grid (search) or explicit points, not both")
    lams = lambdas if lambdas is not None else default_lambdas(method, setup)
    raw: list[tuple[dict[str, Any], float]] = []
    if points is not None:
        if not points:
            raise OptionError("the search space is empty (no points)")
        for point in points:
            point = dict(point)
            lam_values = parse_lambdas(point.pop("lam", None)) or lams
            raw.extend(({**fixed, **point}, lam) for lam in lam_values)
    else:
        search = dict(search or {})
        for name, values in search.items():
            if name in ("lam", "lambda"):
                raise OptionError("give λ values with --lambdas, not --search lam=...")
            if not isinstance(values, (list, tuple)) or not values:
                raise OptionError(f"--search {name}: needs a non-empty list of values")
        names = list(search)
        for combo in itertools.product(*(search[n] for n in names)):
            for lam in lams:
                raw.append(({**fixed, **dict(zip(names, combo, strict=True))}, lam))
    if method.lam_kind is not LamKind.NONE:
        for _, lam in raw:
            method.check_lam(lam)
    groups: list[Group] = []
    for hp, lam in raw:
        if groups and groups[-1].hyperparameters == hp:
            groups[-1] = Group(hp, (*groups[-1].lams, lam))
        else:
            groups.append(Group(hp, (lam,)))
    return groups
