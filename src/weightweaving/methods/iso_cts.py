"""ISO-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025; danielm1405/iso-merging ``iso_cts``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..errors import OptionError
from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import (
    SvdExcludeParams,
    is_weight_matrix,
    mean_over_tasks,
    name_matches,
    orthogonal_reassembly,
    thin_svd,
    top_task_blocks,
)


class IsoCTSParams(SvdExcludeParams):
    common_space_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="share of the min(m, n) singular slots given to the common subspace"
    )


@register("iso_cts")
class IsoCTS(Method):
    """Per weight matrix, the top singular directions of ``Σ_t Δ_t`` (common subspace) plus each
    task's top directions outside it (task-specific subspaces), orthogonalised by polar factors,
    with one flat singular value (ISO-CTS, Sec. 4). Other parameters: λ times the mean task vector."""

    params = IsoCTSParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = False  # flattening the spectrum changes even a single task vector
    order_invariant = True
    summary = "isotropic merging in the common subspace plus task-specific subspaces"
    data_free = True
    reported = "— (no figures in the spec's reported table)"
    reference = "danielm1405/iso-merging"

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, IsoCTSParams)
        if not is_weight_matrix(task_vectors) or name_matches(p.svd_exclude, ctx.name):
            return LamForm(offset=None, slope=mean_over_tasks(task_vectors))
        return LamForm(offset=None, slope=iso_cts_merge(task_vectors, p.common_space_fraction, ctx.name))


def split_slots(width: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(c, r)``: common slots and slots per task, with ``c + T·r = width``. The reference rounds
    the task-specific total to a multiple of T with Python's ``round`` (half to even)."""
    common = int(width * common_space_fraction)
    task_specific = round((width - common) / num_tasks) * num_tasks
    return width - task_specific, task_specific // num_tasks


def iso_cts_merge(task_vectors: Tensor, common_space_fraction: float, name: str = "") -> Tensor:
    """The ISO-CTS-merged matrix at λ = 1. (T, m, n) -> (m, n)."""
    num_tasks = task_vectors.shape[0]
    width = min(task_vectors.shape[1:])
    common, rank = split_slots(width, num_tasks, common_space_fraction)
    if common < 0:
        raise OptionError(
            f"method 'iso_cts': common_space_fraction={common_space_fraction} leaves no room for the "
            f"common subspace of '{name}' ({width} singular slots, {num_tasks} tasks); raise it"
        )
    u, s, vh = thin_svd(task_vectors.sum(0))  # (m, p), (p), (p, n)
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common]  # (m, c), (c), (c, n)
    # each task with the common subspace projected out on the left: Δ_t − U_c U_cᵀ Δ_t
    specific = task_vectors - common_u @ (common_u.T @ task_vectors)  # (T, m, n)
    task_u, task_s, task_vh = top_task_blocks(specific, rank)  # (m, T·r), (T·r), (T·r, n)
    stacked_u = torch.cat([task_u, common_u], dim=1)  # (m, p)
    stacked_s = torch.cat([task_s, common_s])  # (p)
    stacked_vh = torch.cat([task_vh, common_vh], dim=0)  # (p, n)
    flat_s = stacked_s.mean().expand_as(stacked_s)  # (p): every singular value set to the mean
    return orthogonal_reassembly(stacked_u, flat_s, stacked_vh)
