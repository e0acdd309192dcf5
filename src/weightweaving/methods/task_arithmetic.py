"""Task Arithmetic (Ilharco et al., ICLR 2023): M = λ · Σ_t w_t Δ_t."""

from __future__ import annotations

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

    def row_chunks(self, p: Hyperparameters) -> bool:
        return True  # entry by entry

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, TaskArithmeticParams)
        check_weights(p.weights, task_vectors.shape[0], self.name)
        return LamForm(offset=None, slope=weighted_sum(task_vectors, p.weights))
