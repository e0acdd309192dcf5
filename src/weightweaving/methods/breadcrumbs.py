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


def descending_ranks(magnitudes: Tensor) -> Tensor:
    """Rank of every entry along the last dimension, 0 = largest. (..., d) -> (..., d) int64."""
    order = magnitudes.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def middle_band(task_vectors: Tensor, density: float, gamma: float, per_row: bool) -> Tensor:
    """Keep each task's entries ranked ``[n_top, n_top + n_keep)`` by descending |x|, zero the rest.

    Per tensor (mergekit): over the n flattened entries, ``n_keep = int(density·n)``,
    ``n_top = min(int(gamma·n), n − n_keep)``. Per row (authors): over the d entries of each slice
    along the last dimension, ``n_top = int(gamma·d)``, ``n_keep = int(density·d)``; 0-dim tensors pass.
    (T, *shape) -> (T, *shape).
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
    ranks = descending_ranks(units.abs())
    keep = (ranks >= n_top) & (ranks < n_top + n_keep)
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

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, BreadcrumbsParams)
        masked = middle_band(task_vectors, p.density, p.gamma, per_row=p.scope == "row")  # (T, *shape)
        return LamForm(offset=None, slope=masked.sum(0))
