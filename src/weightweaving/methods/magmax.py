"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude.

Reference: danielm1405/magmax ``merge_max_abs`` (fold over tasks with ``>=``: the later task wins ties).
"""

from __future__ import annotations

from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register


class MagMaxParams(Hyperparameters):
    """MagMax has no hyperparameters besides λ."""


def max_magnitude(task_vectors: Tensor) -> Tensor:
    """Per entry, the value with the largest |·|; on equal magnitudes the later task. (T, *s) -> (*s)."""
    later_first = task_vectors.flip(0)  # argmax returns the first maximum: flip so the last task is first
    pick = later_first.abs().argmax(0, keepdim=True)  # (1, *s)
    return later_first.gather(0, pick).squeeze(0)


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
