"""CAT Merging (Sun et al., ICML 2025, arXiv 2505.06977) — **uses data**: exemplar statistics.

Per unit, the statistics of every task's exemplars arrive in ``ctx.extras["exemplar_statistics"]``
(an :class:`~weightweaving.withdata.features.ExemplarStatistics`, gathered by
``weightweaving.withdata``). With torch's layout ``W_i`` (d_out × d_in), i.e. ``T_i = W_iᵀ``:

* linear weights: ``G_k = Σ_{i≠k} W_i (X_kᵀX_k − α X_iᵀX_i) W_iᵀ`` (d_out × d_out), ``B_k`` its
  eigenvectors of the c largest eigenvalues; every ``G_k`` is formed from the original task vectors,
  then for k = 1..T in turn ``W_i ← W_i − B_k B_kᵀ W_i`` for every i ≠ k (``T_i ← T_i − T_i B_k B_kᵀ``);
* convolutions (``convolutions=True``, the default): a convolution is a linear map of its unfolded
  input patches, so its weight (d_out, C, kh, kw) is flattened to ``W_i`` (d_out × C·kh·kw) and takes
  the linear rule with the Gram of the patches. The paper speaks of linear weights and its text does
  not say what its ViTs' patch embedding (a convolution) gets; it is linear in exactly the paper's sense,
  and it is where summed task vectors disturb the suite's tasks most (full profile, multi-task, λ = 1,
  c = 3, α = 1, one exemplar per task: 86.6 / 84.0 / 81.2 on seeds 0-2 against 81.9 / 74.5 / 71.8 with
  the patch embedding summed; Task Arithmetic 82.5 / 75.5 / 73.2). ``convolutions=False`` sums them;
* norm scales: ``g_kj = Σ_{i≠k} t_ij² (S_kj − α S_ij)`` with ``S_kj = Σ_x x̂_kj²``, the top-c channels
  of ``g_k`` are zeroed in the other tasks' vectors; biases of hooked layers: the same with
  ``g_kj = Σ_{i≠k} t_ij²``; masks from the original vectors, applied together;
* everything else (unhooked layers, embeddings): Task Arithmetic.

Then ``M = λ · Σ_k T_k`` — linear in λ.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..errors import OptionError
from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register

STATISTICS = "exemplar_statistics"


class ExemplarProjectionParams(Hyperparameters):
    c: float = Field(
        3,
        ge=0.0,
        description="directions (linear layers) or channels (norm scales, biases) removed per task: a count "
        "when >= 1 or 0, a fraction of the layer's output size when below 1 (int(c·d), truncated)",
    )
    alpha: float = Field(1.0, ge=0.0, description="weight of the other task's own features in G_k (α)")
    convolutions: bool = Field(
        True,
        description="project convolutions (hooked nn.Conv2d) as linear maps of their input patches; "
        "False: sum them (Task Arithmetic)",
    )


def count(c: float, size: int) -> int:
    """How many directions or channels ``c`` means for a layer of ``size`` outputs (at most ``size``)."""
    if c >= 1.0 or c == 0.0:
        if c != int(c):
            raise OptionError(f"method 'exemplar_projection': c={c} must be a whole count when >= 1")
        return min(int(c), size)
    return min(int(c * size), size)


def conflict_bases(weights: Tensor, grams: Tensor, alpha: float, c: int) -> Tensor:
    """``B_k`` for every task: weights (T, d_out, d_in), grams (T, d_in, d_in) -> (T, d_out, c).

    Only eigenvectors with a positive eigenvalue are conflicts; a column whose eigenvalue is not
    positive is zero (projecting it out would remove a direction where task k is not disturbed)."""
    num_tasks = weights.shape[0]
    own = torch.einsum("iod,ide,ipe->iop", weights, grams, weights)  # W_i G_i W_iᵀ, (T, d_out, d_out)
    bases = []
    for k in range(num_tasks):
        others = [i for i in range(num_tasks) if i != k]
        g = torch.zeros_like(own[0])
        for i in others:
            g += weights[i] @ grams[k] @ weights[i].T - alpha * own[i]
        g = (g + g.T) / 2  # symmetric up to rounding
        values, vectors = torch.linalg.eigh(g)  # ascending eigenvalues
        top = vectors[:, vectors.shape[1] - c :]
        bases.append(
            top * (values[values.shape[0] - c :] > positive_floor(values))
        )  # zero columns: no conflict
    return torch.stack(bases)


def positive_floor(values: Tensor) -> Tensor:
    """Eigenvalues (or scores) at or below this are not conflicts: zero up to rounding, or negative."""
    return values.abs().max() * values.shape[-1] * torch.finfo(values.dtype).eps


def project_out(weights: Tensor, bases: Tensor) -> Tensor:
    """For k = 1..T: ``W_i ← W_i − B_k B_kᵀ W_i`` for every i ≠ k. -> (T, d_out, d_in), a new tensor."""
    out = weights.clone()
    for k in range(weights.shape[0]):
        for i in range(weights.shape[0]):
            if i != k:
                out[i] -= bases[k] @ (bases[k].T @ out[i])
    return out


def channel_masks(scores: Tensor, c: int) -> Tensor:
    """Keep-masks (T, d): task i loses the top-c channels of every other task's score row ``scores[k]``
    (only channels whose score is positive)."""
    num_tasks = scores.shape[0]
    keep = torch.ones_like(scores, dtype=torch.bool)
    if c == 0:
        return keep
    for k in range(num_tasks):
        best = torch.topk(scores[k], c)
        top = best.indices[best.values > positive_floor(scores[k])]
        for i in range(num_tasks):
            if i != k:
                keep[i, top] = False
    return keep


def others_sum(values: Tensor) -> Tensor:
    """``Σ_{i≠k} values[i]`` for every k. (T, ...) -> (T, ...)."""
    return values.sum(0, keepdim=True) - values


@register("exemplar_projection")
class ExemplarProjection(Method):
    """CAT Merging: remove from each task vector the directions where it disturbs the other tasks'
    exemplar features, then Task Arithmetic."""

    params = ExemplarProjectionParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = True  # T = 1: nothing to project against
    order_invariant = False  # the projections are applied in task order
    uses_data = True
    data_free = False
    reported = "CAT Merging paper, 8 tasks: ViT-B/32 76.1 (78.0 with one exemplar per task), ViT-L/14 86.7"
    reference = "paper only (Sun et al., ICML 2025, arXiv 2505.06977); no authors' code could be checked"
    oracle_exempt = "uses data: needs a forward pass over exemplars; tested by closed-form properties"
    summary = "uses data: CAT Merging, task vectors with the other tasks' conflict directions removed"

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, ExemplarProjectionParams)
        stats = ctx.extras.get(STATISTICS)
        if stats is None:
            raise OptionError(
                "method 'exemplar_projection' uses data: give exemplars (weightweaving.merge_with_data)"
            )
        kind = stats.kind(ctx.name)
        convolution = task_vectors.dim() > 2 + 1  # (T, d_out, C, kh, kw): a hooked nn.Conv2d
        if kind == "linear" and (task_vectors.dim() == 2 + 1 or (convolution and p.convolutions)):
            c = count(p.c, task_vectors.shape[1])
            if c == 0:
                return LamForm(offset=None, slope=task_vectors.sum(0))
            weights = task_vectors.flatten(2)  # (T, d_out, d_in); a convolution's d_in = C·kh·kw
            grams = stats.grams[ctx.name].to(task_vectors.device, task_vectors.dtype)
            bases = conflict_bases(weights, grams, p.alpha, c)
            merged = project_out(weights, bases).sum(0)
            return LamForm(offset=None, slope=merged.reshape(task_vectors.shape[1:]))
        if kind in ("norm", "bias") and task_vectors.dim() == 2:
            squared = task_vectors.square()  # (T, d)
            if kind == "norm":
                s = stats.norm_squares[ctx.name].to(task_vectors.device, task_vectors.dtype)  # (T, d)
                # g_k = Σ_{i≠k} t_i² (S_k − α S_i) = S_k Σ_{i≠k} t_i² − α Σ_{i≠k} t_i² S_i
                scores = s * others_sum(squared) - p.alpha * others_sum(squared * s)
            else:
                scores = others_sum(squared)
            keep = channel_masks(scores, count(p.c, task_vectors.shape[1]))
            return LamForm(offset=None, slope=(task_vectors * keep).sum(0))
        return LamForm(offset=None, slope=task_vectors.sum(0))
