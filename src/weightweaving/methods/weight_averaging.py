"""Weight averaging: θ = mean_t θ_t, optionally weighted (docs/algorithms.md, `weight_averaging`)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext
from .mergekit_steps import emulated_weights, weights_of, work_dtype
from .registry import register
from .steps import check_weights, weighted_sum


class WeightAveragingParams(Hyperparameters):
    weights: list[float] | None = Field(
        None, description="one non-negative weight per fine-tuned model (Σ w_t θ_t / Σ w_t)"
    )
    precision: Literal["float32", "float64", "bfloat16", "float16", "stored"] | None = Field(
        None,
        description="average the weights themselves as mergekit's linear does, in this dtype "
        "(float32 unless float64; stored: the checkpoint's); default: the task vectors, in the compute dtype",
    )


def mergekit_linear(weights: Tensor, coefficients: list[float], dtype: torch.dtype) -> Tensor:
    """Σ_t w_t θ_t / Σ_t w_t accumulated in float32 (float64 for float64), in model order, then
    rounded to ``dtype``: mergekit 0.1.5's ``linear``. weights (T, *s) -> (*s)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(coefficients, dtype=work, device=weights.device)
    result = torch.zeros(weights.shape[1:], dtype=work, device=weights.device)
    for t in range(weights.shape[0]):
        result.addcmul_(weights[t].to(dtype), w[t])
    return result.div_(w.sum()).to(dtype)


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
        if p.precision is not None:  # mergekit's linear on the weights themselves
            base, tuned = weights_of(task_vectors, ctx)
            dtype = work_dtype(p.precision, ctx, task_vectors.dtype)
            merged = mergekit_linear(tuned, p.weights or [1.0] * len(tuned), dtype)
            return LamForm(offset=emulated_weights(base, merged), slope=None)
        if p.weights is None:
            return LamForm(offset=task_vectors.mean(0), slope=None)
        total = sum(p.weights)
        if total <= 0 or min(p.weights) < 0:
            from ..errors import OptionError

            raise OptionError("method 'weight_averaging': 'weights' must be non-negative with a positive sum")
        return LamForm(offset=weighted_sum(task_vectors, p.weights) / total, slope=None)
