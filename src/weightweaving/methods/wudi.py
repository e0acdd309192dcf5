"""WUDI merging (Cheng et al., "Whoever Started the Interference Should End It", ICML 2025,
arXiv 2503.08099; nathanielyvo/WUDI-Merging ``vit/wudi_main.py:get_redundant_task_vector``).

Data-free: per selected weight matrix the merged task vector is optimised against an interference
loss built from the task vectors alone, ``L(M) = Σ_t ‖(M − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F``, by Adam from
``M₀ = Σ_t τ_t``. λ multiplies the finished vector (never the task vectors before optimising), so
the method is linear in λ and Weight Weaving needs one optimisation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import check_regex, is_weight_matrix, name_matches

# Library default: 2-D parameters whose name contains 'attn' or 'mlp' (on open_clip names the
# reference's four block matrices; on HF CLIP names self_attn.*_proj.weight and mlp.fc*.weight).
DEFAULT_INCLUDE = r"attn|mlp"


class WudiParams(Hyperparameters):
    iterations: int = Field(300, ge=0, description="full-batch Adam steps per weight matrix")
    lr: float = Field(
        1e-5, gt=0, description="Adam learning rate (reference: 1e-5 for ViT, 2e-5 for RoBERTa)"
    )
    precision: Literal["float64", "float32"] = Field(
        "float64",
        description="dtype of the optimisation: float64 matches the reference's trajectory to 1e-13; "
        "float32 (the reference's own, on CUDA) takes about half the time and differs by up to a few "
        "percent of lr, where rounding flips near-zero gradients",
    )
    optimise_include: str = Field(
        DEFAULT_INCLUDE,
        description="regex (re.search) on parameter names choosing the 2-D weights that are optimised; "
        "every other parameter keeps the pre-trained value (M = 0), as in the reference",
    )

    _check_optimise_include = field_validator("optimise_include")(check_regex)


def interference_grams(task_vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``A = Σ_t G_t`` and ``C = Σ_t τ_t G_t`` with ``G_t = τ_tᵀτ_t / ‖τ_t‖²`` (zero tasks left out).

    The loss gradient is then ``∇L(M) = 2 (M A − C)`` (WUDI's step 3). (T, m, n) -> (n, n), (m, n).
    """
    norms_sq = task_vectors.square().sum(dim=(1, 2))  # (T,)
    kept = task_vectors[norms_sq > 0]  # (T', m, n): a zero task's term is 0/0 in the reference
    grams = kept.transpose(1, 2) @ kept / norms_sq[norms_sq > 0][:, None, None]  # (T', n, n)
    return grams.sum(0), (kept @ grams).sum(0)


def adam_minimise(
    start: Tensor, gradient: object, steps: int, lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> Tensor:
    """``steps`` updates of ``torch.optim.Adam`` (no weight decay, no amsgrad, eps 1e-8), written out
    in the order of torch's single-tensor implementation; ``gradient(x)`` gives ∇L at x (it may
    return the same buffer every time). No tensor is allocated inside the loop."""
    beta1, beta2 = betas
    eps = 1e-8
    x = start.clone()
    first = torch.zeros_like(x)
    second = torch.zeros_like(x)
    denom = torch.empty_like(x)
    for step in range(1, steps + 1):
        grad = gradient(x)  # type: ignore[operator]
        first.lerp_(grad, 1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        torch.sqrt(second, out=denom).div_(math.sqrt(1 - beta2**step)).add_(eps)
        x.addcdiv_(first, denom, value=-step_size)
    return x


def wudi_merge(
    task_vectors: Tensor, iterations: int, lr: float, precision: torch.dtype = torch.float64
) -> Tensor:
    """The WUDI-merged matrix at λ = 1, optimised in ``precision``. (T, m, n) -> (m, n), input dtype."""
    tv = task_vectors.to(precision)
    if not bool((tv != 0).any()):
        return torch.zeros_like(task_vectors[0])
    gram_sum, cross_sum = interference_grams(tv)  # (n, n), (m, n)
    grad = torch.empty_like(cross_sum)

    def gradient(m: Tensor) -> Tensor:  # 2 (M A − C), into one buffer
        torch.mm(m, gram_sum, out=grad)
        return grad.sub_(cross_sum).mul_(2)

    merged = adam_minimise(tv.sum(0), gradient, iterations, lr)
    return merged.to(task_vectors.dtype)


@register("wudi")
class Wudi(Method):
    """Per selected weight matrix, ``M = λ · argmin_M Σ_t ‖(M − τ_t)τ_tᵀ‖² / ‖τ_t‖²`` as reached by
    ``iterations`` Adam steps from ``Σ_t τ_t``; every other parameter keeps θ_pre."""

    params = WudiParams
    lam_kind = LamKind.LINEAR
    scope = Scope.TENSOR
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = False  # other parameters keep θ_pre even for one model
    order_invariant = True
    summary = "WUDI: per weight matrix, Adam on an interference loss built from the task vectors alone"
    data_free = True
    reported = "WUDI README, 8 tasks: ViT-B/32 85.2, ViT-L/14 92.6"
    reference = "nathanielyvo/WUDI-Merging"

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, WudiParams)
        if not is_weight_matrix(task_vectors) or not name_matches(p.optimise_include, ctx.name):
            return LamForm(offset=None, slope=torch.zeros_like(task_vectors[0]))
        slope = wudi_merge(task_vectors, p.iterations, p.lr, getattr(torch, p.precision))
        return LamForm(offset=None, slope=slope)
