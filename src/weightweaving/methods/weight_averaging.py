"""Weight averaging: θ = mean_t θ_t, optionally weighted (docs/algorithms.md, `weight_averaging`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext
from .registry import register
from .steps import check_weights, weighted_sum


class WeightAveragingParams(Hyperparameters):
    weights: list[float] | None = Field(
        None, description="one non-negative weight per fine-tuned model (Σ w_t θ_t / Σ w_t)"
    )


@register("weight_averaging")
class WeightAveraging(Method):
    """M = Σ_t w_t Δ_t / Σ_t w_t (plain mean without weights). No λ."""

    params = WeightAveragingParams
    lam_kind = LamKind.NONE
    scope = Scope.ELEMENTWISE
    default_lam = None
    paper_lam_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    summary = "mean of the fine-tuned weights (optionally weighted)"
    data_free = True
    reported = "CART README, 8/14/20 tasks: ViT-B/32 65.9 / 64.3 / 61.0, ViT-L/14 79.6 / 76.8 / 71.7"
    reference = "plain mean (baseline in JH-GEECS/CART)"

    def row_chunks(self, p: Hyperparameters) -> bool:
        return True  # entry by entry

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, WeightAveragingParams)
        check_weights(p.weights, task_vectors.shape[0], self.name)
        if p.weights is None:
            return LamForm(offset=task_vectors.mean(0), slope=None)
        total = sum(p.weights)
        if total <= 0 or min(p.weights) < 0:
            from ..errors import OptionError

            raise OptionError("method 'weight_averaging': 'weights' must be non-negative with a positive sum")
        return LamForm(offset=weighted_sum(task_vectors, p.weights) / total, slope=None)
