"""Spherical linear interpolation between the base and one fine-tuned model, per tensor, exactly as
mergekit 0.1.5 computes it (``merge_methods/slerp.py``; Shoemake, SIGGRAPH 1985).

Each tensor is treated as one vector: with θ the angle between v₀ (base) and v₁ (fine-tuned),
``slerp(t) = sin((1−t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁``, and plain ``(1−t)·v₀ + t·v₁`` where
|cos θ| > 0.9995. It interpolates the weights themselves, not the task vector, so it is not linear
in anything: no λ; ``t`` plays its part (t = 0: the base, t = 1: the fine-tuned model).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import LamForm, LamKind, Method, Scope, UnitContext
from .mergekit_steps import PrecisionParams, Setting, emulated_weights, resolve, weights_of, work_dtype
from .registry import register

DOT_THRESHOLD = 0.9995  # above this |cos θ| the vectors count as collinear: lerp
EPS = 1e-8  # norms below this are left as 1
CHUNK = 1024 * 1024  # mergekit sums norms and dots over chunks of this many entries


class SlerpParams(PrecisionParams):
    t: Setting = Field(
        0.5,
        description="position between base (0) and model (1); a list is a gradient over the layers, "
        "[{filter: self_attn, value: [...]}, {value: 0.5}] picks by parameter name",
    )


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Interpolate two same-shaped tensors as single vectors (in float64 if they are, else float32)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, n)
    t_ = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not a.shape[1]:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.shape[1], CHUNK)
    norm_a = torch.linalg.vector_norm(
        torch.stack(
            [torch.linalg.vector_norm(a[:, i : i + CHUNK].to(dtype), dim=1, keepdim=True) for i in chunks]
        ),
        dim=0,
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack(
            [torch.linalg.vector_norm(b[:, i : i + CHUNK].to(dtype), dim=1, keepdim=True) for i in chunks]
        ),
        dim=0,
    )
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dots = [
        ((a[:, i : i + CHUNK].to(dtype) / norm_a) * (b[:, i : i + CHUNK].to(dtype) / norm_b)).sum(
            dim=1, keepdim=True
        )
        for i in chunks
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    result = torch.empty_like(a)
    for i in chunks:
        result[:, i : i + CHUNK] = coef_a * a[:, i : i + CHUNK].to(dtype) + coef_b * b[:, i : i + CHUNK].to(
            dtype
        )
    return result.reshape(v0.shape)


@register("slerp")
class Slerp(Method):
    """θ = slerp(t, θ_base, θ_1) per tensor (mergekit's SLERP); exactly one fine-tuned model, no λ."""

    params = SlerpParams
    lam_kind = LamKind.NONE
    scope = Scope.TENSOR
    default_lam = None
    single_model_identity = False  # t = 0.5 by default: half-way, not the model
    num_models = (1, 1)
    needs_base = True
    summary = "spherical interpolation between the base and one fine-tuned model at t, per tensor (mergekit)"
    data_free = True
    reference = "arcee-ai/mergekit (0.1.5)"
    reported = "— (no CLIP figures; the most used mergekit method for two LLMs)"
    oracle_exempt = (
        "peer: checked byte for byte against mergekit 0.1.5's own outputs "
        "(tests/data/mergekit, tests/test_mergekit_configs.py)"
    )

    def compute(self, task_vectors: Tensor, p: PrecisionParams, ctx: UnitContext) -> LamForm:  # type: ignore[override]
        assert isinstance(p, SlerpParams)
        self.check_num_models(task_vectors.shape[0])
        t = resolve(p.t, ctx.name, p.layers)
        base, tuned = weights_of(task_vectors, ctx)
        dtype = work_dtype(p.precision, ctx, task_vectors.dtype)
        merged = slerp(0.5 if t is None else t, base.to(dtype), tuned[0].to(dtype))
        return LamForm(offset=emulated_weights(base, merged), slope=None)
