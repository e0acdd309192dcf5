"""CART (Choi et al., "Revisiting Weight Averaging for Model Merging"; JH-GEECS/CART
``_merge_weights("CART")``): centered, rank-truncated task vectors around the weight average."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import check_regex, is_weight_matrix, low_rank, mean_over_tasks, name_matches, thin_svd

# The reference rule: the name contains 'attn' or 'mlp' and contains neither 'ln' nor 'bias'.
REFERENCE_SVD_INCLUDE = r"^(?=.*(?:attn|mlp))(?!.*(?:ln|bias))"


class CARTParams(Hyperparameters):
    rank_fraction: float = Field(
        0.08,
        gt=0.0,
        le=1.0,
        description="share of min(m, n) singular components kept per centered task vector",
    )
    svd_include: str = Field(
        REFERENCE_SVD_INCLUDE,
        description="regex (re.search) on parameter names choosing the 2-D weight matrices that get the "
        "low-rank correction; the default is the reference rule (name contains 'attn' or 'mlp' and "
        "neither 'ln' nor 'bias'); every other parameter is the plain weight average",
    )

    _check_svd_include = field_validator("svd_include")(check_regex)


@register("cart")
class CART(Method):
    """``θ = θ_avg + λ · Σ_t SVD_k(θ_t − θ_avg)`` per selected weight matrix, ``θ_avg`` elsewhere.

    As a merged task vector it is affine in λ: ``M(λ) = mean_t Δ_t + λ · Σ_t SVD_k(Δ_t − mean_s Δ_s)``
    with ``k = max(1, int(rank_fraction · min(m, n)))``."""

    params = CARTParams
    lam_kind = LamKind.AFFINE
    scope = Scope.TENSOR
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = True  # T = 1: the average is the model and its centered vector is zero
    order_invariant = True
    summary = "weight average plus λ times low-rank SVDs of the models' deviations from it"
    data_free = True
    reported = "CART README, 8/14/20 tasks: ViT-B/32 84.7 / 79.5 / 76.3, ViT-L/14 92.6 / 88.7 / 87.9"
    reference = "JH-GEECS/CART"

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, CARTParams)
        average = mean_over_tasks(task_vectors)  # (*shape): θ_avg − θ_pre
        if not is_weight_matrix(task_vectors) or not name_matches(p.svd_include, ctx.name):
            return LamForm(offset=average, slope=None)  # the reference adds λ·Σ_t C_t = 0 here
        keep = max(1, int(p.rank_fraction * min(task_vectors.shape[1:])))
        # one task at a time (C_t = θ_t − θ_avg, its SVD and its rank-k part): the SVD factors of
        # one matrix in memory, not of all T; the T parts are then summed as one stack
        parts = torch.empty_like(task_vectors)
        for centered, part in zip(task_vectors, parts, strict=True):
            part.copy_(low_rank(*thin_svd(centered - average), keep))
        return LamForm(offset=average, slope=parts.sum(0))
