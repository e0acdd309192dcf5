"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025; AntoAndGar/task_singular_vectors ``compute_and_sum_svd_mem_reduction``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import (
    SvdExcludeParams,
    is_weight_matrix,
    mean_over_tasks,
    name_matches,
    orthogonal_reassembly,
    top_task_blocks,
)


class TSVParams(SvdExcludeParams):
    """Only the shared ``svd_exclude`` option."""


@register("tsv")
class TSV(Method):
    """Per weight matrix, each task keeps its top ``int(p / T)`` singular triplets; the stacked
    singular vectors are orthogonalised by their polar factors (the Procrustes step of TSV-Merge)
    and reassembled: ``M = λ · polar(Û) diag(ŝ) polar(V̂ᵀ)``. Other parameters, and 2-D ones
    matching ``svd_exclude``: λ times the mean task vector."""

    params = TSVParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges(multitask=(0.5, 2.0))
    single_model_identity = True  # T = 1 keeps the full rank: Δ back up to float rounding
    order_invariant = True
    summary = "task singular vectors: each task's top 1/T of its SVD, decorrelated by polar factors"
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 73.11, woven 74.01; MTL λ = 1: 83.60 / 87.23 / 90.47 (B/32, B/16, L/14)"
    reference = "AntoAndGar/task_singular_vectors"

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, TSVParams)
        if not is_weight_matrix(task_vectors) or name_matches(p.svd_exclude, ctx.name):
            return LamForm(offset=None, slope=mean_over_tasks(task_vectors))
        return LamForm(offset=None, slope=tsv_merge(task_vectors))


def tsv_merge(task_vectors: Tensor) -> Tensor:
    """The TSV-merged matrix at λ = 1. (T, m, n) -> (m, n)."""
    num_tasks, m, n = task_vectors.shape
    width = min(m, n)
    rank = width // num_tasks  # int(p / T): each task's share of the p singular slots
    stacked_u, stacked_s, stacked_vh = top_task_blocks(task_vectors, rank)  # (m, T·r), (T·r), (T·r, n)
    pad = width - num_tasks * rank  # unused slots stay zero, as in the reference
    stacked_u = torch.cat([stacked_u, stacked_u.new_zeros(m, pad)], dim=1)  # (m, p)
    stacked_s = torch.cat([stacked_s, stacked_s.new_zeros(pad)])  # (p)
    stacked_vh = torch.cat([stacked_vh, stacked_vh.new_zeros(pad, n)], dim=0)  # (p, n)
    return orthogonal_reassembly(stacked_u, stacked_s, stacked_vh)
