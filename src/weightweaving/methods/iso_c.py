"""ISO-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025; danielm1405/iso-merging ``iso_c``)."""

from __future__ import annotations

from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import SvdExcludeParams, is_weight_matrix, mean_over_tasks, name_matches, thin_svd


class IsoCParams(SvdExcludeParams):
    """Only the shared ``svd_exclude`` option."""


@register("iso_c")
class IsoC(Method):
    """Per weight matrix, the sum of the task vectors with a flat spectrum: ``Σ_t Δ_t = U S Vᵀ`` →
    ``M = λ · mean(S) · U Vᵀ`` (ISO-C, Sec. 4). Other parameters: λ times the mean task vector."""

    params = IsoCParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges(multitask=(0.1, 2.0))
    single_model_identity = False  # flattening the spectrum changes even a single task vector
    order_invariant = True
    summary = "isotropic merging: the summed task matrix with all singular values set to their mean"
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 72.38, woven 73.78; MTL λ = 1: 82.69 / 87.03 / 90.60 (B/32, B/16, L/14)"
    reference = "danielm1405/iso-merging"

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, IsoCParams)
        if not is_weight_matrix(task_vectors) or name_matches(p.svd_exclude, ctx.name):
            return LamForm(offset=None, slope=mean_over_tasks(task_vectors))
        u, s, vh = thin_svd(task_vectors.sum(0))  # (m, p), (p), (p, n)
        return LamForm(offset=None, slope=s.mean() * (u @ vh))
