"""Model Stock (Jang, Yun, Han, ECCV 2024), per tensor, exactly as mergekit 0.1.5 computes it
(``merge_methods/model_stock.py``).

With N ≥ 2 fine-tuned models and cos θ the mean pairwise cosine between their task vectors,
``t = N cos θ / (1 + (N − 1) cos θ)`` and ``θ = t · mean_t θ_t + (1 − t) · θ_base`` (eq. 5); t = 0
where the denominator vanishes. ``filter_wise`` takes one angle per row (per output filter) instead
of one per tensor. No λ: t is found from the geometry of the task vectors.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import LamForm, LamKind, Method, Scope, UnitContext
from .mergekit_steps import PrecisionParams, emulated_weights, weights_of, work_dtype
from .registry import register


class ModelStockParams(PrecisionParams):
    filter_wise: bool = Field(
        False, description="one angle per row of the last dimension instead of per tensor"
    )


def interpolation_ratio(task_vectors: list[Tensor]) -> Tensor:
    """t from the mean pairwise cosine of the task vectors (each (rows, n) or (n)). -> (rows, 1) or (1)."""
    cosines = []
    for i, first in enumerate(task_vectors):
        for second in task_vectors[i + 1 :]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(task_vectors)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)


@register("model_stock")
class ModelStock(Method):
    """θ = t · mean θ_t + (1 − t) · θ_base, t from the angle between task vectors (ECCV 2024, eq. 5)."""

    params = ModelStockParams
    lam_kind = LamKind.NONE
    scope = Scope.TENSOR
    default_lam = None
    single_model_identity = False
    num_models = (2, None)
    needs_base = True
    summary = "interpolate the base toward the models' average by a ratio set by their task vectors' angle (mergekit)"
    data_free = True
    reference = "arcee-ai/mergekit (0.1.5)"
    reported = "Model Stock paper (Jang et al., ECCV 2024): ViT-B/32 and ViT-L/14 fine-tunes of one task, not multi-task merging"
    oracle_exempt = (
        "peer: checked byte for byte against mergekit 0.1.5's own outputs "
        "(tests/data/mergekit, tests/test_mergekit_configs.py)"
    )

    def compute(self, task_vectors: Tensor, p: PrecisionParams, ctx: UnitContext) -> LamForm:  # type: ignore[override]
        assert isinstance(p, ModelStockParams)
        self.check_num_models(task_vectors.shape[0])
        dtype = work_dtype(p.precision, ctx, task_vectors.dtype)
        base, tuned = weights_of(task_vectors, ctx)
        w0, ws = base.to(dtype), list(tuned.to(dtype).unbind(0))
        shape = w0.shape
        if p.filter_wise:
            if w0.dim() <= 1:
                w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
        else:
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        t = interpolation_ratio([w - w0 for w in ws])
        average = sum(ws) / len(ws)
        merged = (t * average + (1 - t) * w0).reshape(shape)
        return LamForm(offset=emulated_weights(base, merged), slope=None)
