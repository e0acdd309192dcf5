"""mergekit's generalized task arithmetic: the form in which mergekit computes ``task_arithmetic``,
``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs`` and ``breadcrumbs_ties`` (mergekit 0.1.5,
``merge_methods/generalized_task_arithmetic.py`` and ``sparsify.py``).

Per parameter tensor: sparsify each task vector (keep the top ``density`` by magnitude; or drop the
top ``gamma`` outliers first; or a random mask), optionally rescale it to its former L1 norm,
multiply by its model's weight, optionally keep only the entries agreeing with the elected sign,
sum, optionally divide by the sum of the weights that contributed, and scale by λ. This differs
from the papers' definitions that our own ``ties``/``dare``/``breadcrumbs`` follow (TIES's global
top-k and count-based disjoint mean, DARE's 1/(1−p) rescale): it is what mergekit configs mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .mergekit_steps import PrecisionParams, Setting, emulated_delta, per_model, weights_of, work_dtype
from .registry import register

Sparsification = Literal["none", "magnitude", "magnitude_outliers", "random"]
Consensus = Literal["none", "sum", "count"]


class GtaParams(PrecisionParams):
    weights: list[Setting] | None = Field(None, description="one weight (or gradient) per model; default 1")
    density: list[Setting] | None = Field(
        None, description="share of each task vector kept, per model; default 1"
    )
    gamma: list[Setting] | None = Field(
        None, description="share of largest magnitudes dropped (magnitude_outliers), per model; default 0.01"
    )
    sparsification: Sparsification = Field("none", description="how each task vector is sparsified")
    consensus: Consensus = Field("none", description="sign election over the weighted task vectors")
    normalize: bool = Field(False, description="divide by the sum of the contributing weights")
    rescale: bool = Field(False, description="rescale each sparsified task vector to its former L1 norm")
    scale: float = Field(
        1.0, description="mergekit's lambda: scales the sum in the working precision (λ acts on top)"
    )


def l1_rescaled(task_vector: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """``Δ·mask``, times ‖Δ‖₁/‖Δ·mask‖₁ when ``rescale`` (left as is when either norm is < 1e-7)."""
    masked = task_vector * mask
    if not rescale:
        return masked
    before, after = task_vector.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def keep_largest(task_vector: Tensor, density: float) -> Tensor:
    """Mask of the ``max(1, int(density·n))`` largest magnitudes (argsort order breaks ties). (*s)."""
    n = task_vector.numel()
    mask = torch.zeros(n, dtype=task_vector.dtype, device=task_vector.device)
    if density <= 0 or n == 0:
        return mask.reshape(task_vector.shape)
    kept = max(1, int(density * n))
    mask[torch.argsort(task_vector.abs().reshape(-1).float(), descending=True)[:kept]] = 1
    return mask.reshape(task_vector.shape)


def keep_band(task_vector: Tensor, density: float, gamma: float) -> Tensor:
    """Mask of ``int(density·n)`` magnitudes below the ``int(gamma·n)`` largest (fewer dropped if need be)."""
    n = task_vector.numel()
    kept = int(density * n)
    below = max(0, n - kept - int(gamma * n))
    order = torch.sort(task_vector.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=task_vector.dtype, device=task_vector.device)
    mask[order[below : below + kept]] = 1
    return mask.reshape(task_vector.shape)


def keep_random(task_vector: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Bernoulli(density) mask, drawn on the CPU from ``generator`` (same on every device)."""
    draws = torch.bernoulli(torch.full(task_vector.shape, density), generator=generator)
    return draws.to(task_vector.device, task_vector.dtype)


def sign_agreement(weighted: Tensor, consensus: str) -> Tensor:
    """Where each weighted Δ_t has the elected sign: + where Σ_t (values or signs) ≥ 0. (T, *s) bool."""
    signs = weighted.sign()
    total = weighted.sum(0) if consensus == "sum" else signs.sum(0)
    elected = (total >= 0).to(weighted.dtype) * 2 - 1
    return signs == elected


@register("gta")
class Gta(Method):
    """M = λ · Σ_t w_t m_t⊙Δ_t [/ Σ_t w_t m_t] per tensor (mergekit's generalized task arithmetic)."""

    params = GtaParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = True  # at the defaults: no sparsification, weight 1
    order_invariant = True  # for deterministic sparsification (a random mask follows the model's index)
    needs_base = True
    summary = "mergekit's task arithmetic family per tensor: sparsify, weight, sign consensus, normalise (mergekit configs)"
    data_free = True
    reference = "arcee-ai/mergekit (0.1.5)"
    reported = "— (mergekit's GTA family has no figures of its own in the spec)"
    oracle_exempt = (
        "peer: checked byte for byte against mergekit 0.1.5's own outputs "
        "(tests/data/mergekit, tests/test_mergekit_configs.py)"
    )

    def compute(self, task_vectors: Tensor, p: PrecisionParams, ctx: UnitContext) -> LamForm:  # type: ignore[override]
        assert isinstance(p, GtaParams)
        count = task_vectors.shape[0]
        dtype = work_dtype(p.precision, ctx, task_vectors.dtype)
        base, tuned = weights_of(task_vectors, ctx)
        base_w, tuned_w = base.to(dtype), tuned.to(dtype)
        exact = p.precision is None  # our own arithmetic: the task vectors as the engine formed them
        weight = per_model(p.weights, 1.0, count, ctx.name, p.layers, "weights")
        density = per_model(p.density, 1.0, count, ctx.name, p.layers, "density")
        gamma = per_model(p.gamma, 0.01, count, ctx.name, p.layers, "gamma")
        deltas = torch.empty_like(tuned_w)  # (T, *s) in the working dtype
        for t in range(count):
            delta = task_vectors[t] if exact else tuned_w[t] - base_w
            if p.sparsification != "none" and density[t] < 1:
                if p.sparsification == "magnitude":
                    mask = keep_largest(delta, density[t])
                elif p.sparsification == "magnitude_outliers":
                    mask = keep_band(delta, density[t], gamma[t])
                else:
                    mask = keep_random(delta, density[t], ctx.generator("gta", t))
                delta = l1_rescaled(delta, mask, p.rescale)
            deltas[t] = delta
        w = torch.tensor(weight, dtype=dtype, device=deltas.device).reshape(-1, *[1] * (deltas.dim() - 1))
        deltas.mul_(w)
        if p.consensus != "none":
            agree = sign_agreement(deltas, p.consensus)
            mixed = (deltas * agree).sum(0)
            divisor = (w * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(0)
            divisor = w.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        if p.normalize:
            mixed /= divisor
        if p.scale != 1:
            mixed *= p.scale
        return LamForm(offset=None, slope=emulated_delta(base, base_w, mixed, p.precision))
