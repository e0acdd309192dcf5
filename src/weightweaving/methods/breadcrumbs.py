"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per task, drop the largest-magnitude outliers
and the small values, keep the band between (docs/algorithms.md, `breadcrumbs`).

``scope="tensor"`` (default) is mergekit 0.1.5 ``magnitude_outliers``; ``scope="row"`` is the authors'
rezazzr/breadcrumbs ``TaskVectorMiddleKeep`` (top-k along the last dimension).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register


class BreadcrumbsParams(Hyperparameters):
    density: float = Field(0.15, gt=0, le=1, description="share of each task vector kept (the paper's 1 − β)")
    gamma: float = Field(0.01, ge=0, lt=1, description="share of largest magnitudes removed as outliers")
    scope: Literal["tensor", "row"] = Field(
        "tensor",
        description="rank per flattened tensor (mergekit) or per row of the last dimension (authors)",
    )


NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def order_statistics(magnitudes: Tensor, ks: list[int]) -> list[Tensor]:
    """The k-th smallest value (0-based, NaN largest) along the last dimension for each k of ``ks``.

    On the CPU, one copy partitioned by numpy's introselect, each k within what the previous left
    above it (several times faster than ``kthvalue``, which also permutes int64 indices); elsewhere
    ``kthvalue``. Exact either way: an order statistic does not depend on the algorithm.
    (..., d) -> [(..., 1)] in ``ks``'s order.
    """
    if magnitudes.device.type != "cpu" or magnitudes.dtype not in NUMPY_DTYPES:
        return [magnitudes.kthvalue(k + 1, dim=-1, keepdim=True).values for k in ks]
    buf = magnitudes.numpy().copy()  # (..., d)
    found: dict[int, Tensor] = {}
    lo = 0
    for k in sorted(set(ks)):
        buf[..., lo:].partition(k - lo, axis=-1)  # everything from lo on is >= the previous statistic
        found[k], lo = torch.from_numpy(buf[..., k : k + 1].copy()), k
    return [found[k] for k in ks]


def leading(magnitudes: Tensor, r: int, v: Tensor | None = None) -> Tensor:
    """The first ``r`` entries along the last dimension of a stable descending sort, without sorting.

    Entries above the r-th largest value ``v`` (given, or found) are in; of those equal to v, the
    first in index order fill the remaining places (a cumulative count, only when v is tied across
    the cut). NaN ranks above +inf, as in ``argsort(descending=True, stable=True)``.
    (..., d) -> (..., d) bool.
    """
    d = magnitudes.shape[-1]
    if r <= 0 or r >= d:
        return torch.full_like(magnitudes, r > 0, dtype=torch.bool)
    if v is None:
        (v,) = order_statistics(magnitudes, [d - r])  # (..., 1)
    counter = torch.int32 if d < 2**31 else torch.int64  # bytes summed as int32: 4x faster than bool.sum
    has_nan = bool(magnitudes.sum().isnan())  # magnitudes are >= 0, so only a NaN makes the sum NaN
    if not has_nan:
        # the usual case: exactly r entries are >= v (no tie straddles the cut), and those are the
        # answer: two kernels instead of the six below
        at_least = magnitudes >= v
        if bool((at_least.view(torch.uint8).sum(-1, keepdim=True, dtype=counter) == r).all()):
            return at_least
    above = magnitudes > v  # (..., d)
    tied = magnitudes == v
    if has_nan:
        nan, v_nan = magnitudes.isnan(), v.isnan()
        above = (above | nan) & ~v_nan  # nothing ranks above a NaN
        tied = torch.where(v_nan, nan, tied)
    short = r - above.view(torch.uint8).sum(
        -1, keepdim=True, dtype=counter
    )  # (..., 1) places left for v, >= 1
    if (tied.view(torch.uint8).sum(-1, keepdim=True, dtype=counter) > short).any():
        tied &= tied.cumsum(-1, dtype=counter) <= short
    return above | tied


def band_mask(magnitudes: Tensor, n_top: int, n_keep: int) -> Tensor:
    """Ranks ``[n_top, n_top + n_keep)`` of a stable descending sort along the last dimension: both
    cuts from one selection. (..., d) -> (..., d) bool."""
    d = magnitudes.shape[-1]
    ranks = [r for r in (n_top + n_keep, n_top) if 0 < r < d]
    cut = dict(zip(ranks, order_statistics(magnitudes, [d - r for r in ranks]), strict=True))
    kept = leading(magnitudes, n_top + n_keep, cut.get(n_top + n_keep))
    if n_top > 0:
        kept &= ~leading(magnitudes, n_top, cut.get(n_top))
    return kept


def middle_band(task_vectors: Tensor, density: float, gamma: float, per_row: bool) -> Tensor:
    """Keep each task's entries ranked ``[n_top, n_top + n_keep)`` by descending |x|, zero the rest.

    Per tensor (mergekit): over the n flattened entries, ``n_keep = int(density·n)``,
    ``n_top = min(int(gamma·n), n − n_keep)``. Per row (authors): over the d entries of each slice
    along the last dimension, ``n_top = int(gamma·d)``, ``n_keep = int(density·d)``; 0-dim tensors pass.
    Equal magnitudes rank in index order (a stable sort's). One task at a time, no sort: O(n) time
    and memory per task (:func:`band_mask`). (T, *shape) -> (T, *shape).
    """
    if per_row:
        if task_vectors.ndim == 1:  # 0-dim parameter
            return task_vectors.clone()
        units = task_vectors  # (T, ..., d)
        n = units.shape[-1]
        n_top, n_keep = int(n * gamma), int(n * density)
    else:
        units = task_vectors.reshape(task_vectors.shape[0], -1)  # (T, n)
        n = units.shape[-1]
        n_keep = int(density * n)
        n_top = min(int(gamma * n), n - n_keep)
    if units.dtype in (torch.float32, torch.float64):
        out = torch.empty_like(units)
        for unit, masked in zip(units, out, strict=True):  # (..., d) each
            torch.mul(unit, band_mask(unit.abs(), n_top, n_keep).to(unit.dtype), out=masked)
        return out.reshape(task_vectors.shape)  # x·0 keeps the -0.0 and NaN of dropped entries
    # other dtypes: one product over all tasks, as before; their NaN bytes depend on the kernel's path
    keep = torch.empty(units.shape, dtype=torch.bool, device=units.device)  # (T, ..., d)
    for unit, kept in zip(units, keep, strict=True):
        kept.copy_(band_mask(unit.abs(), n_top, n_keep))
    return (units * keep).reshape(task_vectors.shape)


@register("breadcrumbs")
class Breadcrumbs(Method):
    """M = λ · Σ_t band(Δ_t): each task vector masked to its middle magnitudes (ECCV 2024, eq. 2–3)."""

    params = BreadcrumbsParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = False
    order_invariant = True
    summary = "sum of the task vectors, each masked to keep the middle band of magnitudes (no outliers, no small values)"
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 52.17, woven 68.11"
    reference = "rezazzr/breadcrumbs; arcee-ai/mergekit"

    def row_chunks(self, p: Hyperparameters) -> bool:
        assert isinstance(p, BreadcrumbsParams)
        return p.scope == "row"  # each row's band depends on that row alone

    def one_thread(self, p: Hyperparameters) -> bool:
        return True  # comparisons, counts and a numpy partition: a second thread only spin-waits

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, BreadcrumbsParams)
        masked = middle_band(task_vectors, p.density, p.gamma, per_row=p.scope == "row")  # (T, *shape)
        return LamForm(offset=None, slope=masked.sum(0))
