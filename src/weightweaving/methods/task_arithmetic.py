"""Task Arithmetic (Ilharco et al., ICLR 2023): M = λ · Σ_t w_t Δ_t."""

from __future__ import annotations

import math

from pydantic import Field
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import check_weights, weighted_sum


class TaskArithmeticParams(Hyperparameters):
    weights: list[float] | None = Field(
        None, description="one weight per fine-tuned model, applied to Δ_t first"
    )


@register("task_arithmetic")
class TaskArithmetic(Method):
    """Sum of the task vectors, scaled by λ (mlfoundations/task_vectors)."""

    params = TaskArithmeticParams
    lam_kind = LamKind.LINEAR
    scope = Scope.ELEMENTWISE
    default_lam = 1.0
    paper_lam_ranges = paper_ranges()
    summary = "λ times the sum of the task vectors"
    data_free = True
    reported = "8 tasks: ViT-B/32 69.1, ViT-L/14 84.5 (WUDI README); λ = 0.3: MTL 68.37 / 74.86 / 82.91 (B/32, B/16, L/14; Weight Weaving Table 1)"
    reference = "mlfoundations/task_vectors"

    def row_chunks(self, p: Hyperparameters) -> bool:
        return True  # entry by entry

    def propagates_nonfinite(self, p: Hyperparameters) -> bool:
        assert isinstance(p, TaskArithmeticParams)  # λ·Σ w_t Δ_t: every w_t Δ_t enters the sum
        return p.weights is None or all(w != 0 and math.isfinite(w) for w in p.weights)

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, TaskArithmeticParams)
        check_weights(p.weights, task_vectors.shape[0], self.name)
        return LamForm(offset=None, slope=weighted_sum(task_vectors, p.weights))
