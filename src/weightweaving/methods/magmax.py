"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude.

Reference: danielm1405/magmax ``merge_max_abs`` (fold over tasks with ``>=``: the later task wins ties).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register


class MagMaxParams(Hyperparameters):
    """MagMax has no hyperparameters besides λ."""


def max_magnitude(task_vectors: Tensor) -> Tensor:
    """Per entry, the value with the largest |·|; on equal magnitudes the later task. (T, *s) -> (*s).

    A running maximum over the tasks (the reference's fold with ``>=``), on buffers reused task after
    task: each step reads one task vector, never a (T, *s) temporary. A NaN counts as the largest
    magnitude (the last task holding one wins), as ``argmax`` over the tasks counted it before; the
    check for NaN runs only where the unit is not all finite.
    """
    best = task_vectors[0].clone()
    if task_vectors.shape[0] == 1:
        return best
    finite = bool(torch.isfinite(task_vectors.sum()))  # a NaN anywhere makes the sum NaN
    best_size = best.abs()
    size = torch.empty_like(best_size)
    take = torch.empty(best.shape, dtype=torch.bool, device=best.device)
    for t in range(1, task_vectors.shape[0]):
        torch.abs(task_vectors[t], out=size)
        torch.ge(size, best_size, out=take)
        if not finite:
            take.logical_or_(size.isnan())
        torch.where(take, task_vectors[t], best, out=best)
        torch.where(take, size, best_size, out=best_size)
    return best


@register("magmax")
class MagMax(Method):
    """M = λ · Δ_{t*} entrywise, t* = argmax_t |Δ_t| (Marczak et al., ECCV 2024, sec. 3.2)."""

    params = MagMaxParams
    lam_kind = LamKind.LINEAR
    scope = Scope.ELEMENTWISE
    default_lam = 0.5  # the reference's 8-task setting
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = False  # default λ = 0.5
    order_invariant = False  # equal magnitudes of opposite sign: the later task wins
    summary = "per entry, the task-vector value of largest magnitude"
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 60.14, woven 69.77"
    reference = "danielm1405/magmax"

    def row_chunks(self, p: Hyperparameters) -> bool:
        return True  # entry by entry

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        return LamForm(offset=None, slope=max_magnitude(task_vectors))
