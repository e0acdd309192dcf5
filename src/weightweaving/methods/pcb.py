"""PCB-Merging (Du et al., NeurIPS 2024): parameter competition balancing (docs/algorithms.md, `pcb`).

Reference: duguodong7/pcb-merging ``pcb-merging.py:PCB_merge`` over the flattened task vectors X
(T × n); ``variant="vision"`` is the repository's ``vision_source_code/pcb.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scanner, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import order_statistics, streamed_order_statistics

# per variant: share of |X| clamped at each end, default ratio, factor on the clamped task vectors
_CLAMP = {"default": 0.0001, "vision": 0.01}
_RATIO = {"default": 0.1, "vision": 0.05}
_SCALE = {"default": 1.0, "vision": 1.2}


class PcbParams(Hyperparameters):
    ratio: float = Field(
        0.1, gt=0, le=1, description="share of entries per task with a non-zero weight (variant vision: 0.05)"
    )
    scope: Literal["global", "tensor"] = Field(
        "global", description="statistics over the whole model flattened (reference) or per tensor"
    )
    variant: Literal["default", "vision"] = Field(
        "default", description="'default' = pcb-merging.py; 'vision' = vision_source_code/pcb.py"
    )

    @model_validator(mode="before")
    @classmethod
    def _variant_ratio(cls, values: Any) -> Any:
        """An unset ratio takes the variant's own default."""
        if isinstance(values, dict) and values.get("ratio") is None and values.get("variant") in _RATIO:
            values = {**values, "ratio": _RATIO[values["variant"]]}
        return values


@dataclass(frozen=True)
class PcbStats:
    """Per-task order statistics over the scope, each (T,)."""

    low: Tensor  # |X| clamp bounds: element int(n·c) of the sorted row ...
    high: Tensor  # ... and element int(n·(1 − c) − 1)
    score_floor: Tensor  # S clamped from below at element int(n·(1 − ratio)) ...
    score_max: Tensor  # ... and min-max scaled with the row's largest S


def magnitude_ranks(n: int, variant: str) -> list[int]:
    """0-based ranks of the clamp bounds of |X| in a row of n (Python float arithmetic, as the reference)."""
    c = _CLAMP[variant]
    return [int(n * c), int(n * (1 - c) - 1)]


def score_ranks(n: int, ratio: float) -> list[int]:
    """0-based ranks of the lower clamp and the maximum of the score S in a row of n."""
    return [int(n * (1 - ratio)), n - 1]


def min_max_scale(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """(x − low)/(high − low) per row, 0 where high = low (the reference divides by zero). (T, n)."""
    span = (high - low)[:, None]
    return torch.where(span > 0, (x - low[:, None]) / torch.where(span > 0, span, 1), 0)


def clamped_magnitudes(flat: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Step 1: A = |X| clamped per row to [low, high]. (T, n) -> (T, n)."""
    return flat.abs().clamp(min=low[:, None], max=high[:, None])


def balancing_score(flat: Tensor, low: Tensor, high: Tensor, variant: str) -> Tensor:
    """Steps 2–3: S = exp(T · norm(A)²) · tanh(X ⊙ Σ_t X_t) (vision: Σ_t sign(X_t)·norm(A_t)). (T, n)."""
    scaled = min_max_scale(clamped_magnitudes(flat, low, high), low.to(flat), high.to(flat))  # norm(A)
    intra = torch.exp(flat.shape[0] * scaled**2)  # intra-balancing
    column = flat.sum(0) if variant == "default" else (torch.sign(flat) * scaled).sum(0)  # (n)
    inter = torch.tanh(flat * column)  # inter-balancing
    return intra * inter


def pcb_merge(flat: Tensor, stats: PcbStats, variant: str) -> Tensor:
    """Steps 4–5: weights W = minmax(clamp(S, floor)), M = Σ_t W_t Xc_t / max(Σ_t W_t, 1e-12). (T, n) -> (n)."""
    low, high = stats.low.to(flat), stats.high.to(flat)
    magnitudes = clamped_magnitudes(flat, low, high)
    clamped = torch.sign(flat) * magnitudes * _SCALE[variant]  # Xc (vision: per-task λ 1.2)
    floor, top = stats.score_floor.to(flat), stats.score_max.to(flat)
    weights = min_max_scale(balancing_score(flat, low, high, variant).clamp(min=floor[:, None]), floor, top)
    return (weights * clamped).sum(0) / weights.sum(0).clamp(min=1e-12)


@register("pcb")
class Pcb(Method):
    """PCB-Merging: M = λ · Σ_t W_t Xc_t / Σ_t W_t with competition-balanced weights W (NeurIPS 2024)."""

    params = PcbParams
    lam_kind = LamKind.LINEAR
    scope = Scope.GLOBAL
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges(multitask=(0.1, 2.5))
    single_model_identity = False
    order_invariant = True
    summary = "weighted mean of clamped task vectors, weights from intra- and inter-task balancing scores"
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 71.41, woven 72.10; 8 tasks: ViT-B/32 76.3, ViT-L/14 87.5 (WUDI README)"
    reference = "duguodong7/pcb-merging"

    def global_stats(self, scan: Scanner[Any], p: Hyperparameters, seed: int) -> PcbStats:
        """Passes 1–2: the |X| clamp bounds; passes 3–4: the score's floor and maximum (exact, streamed)."""
        assert isinstance(p, PcbParams)

        def magnitudes(task_vectors: Tensor, ctx: UnitContext) -> Tensor:
            return task_vectors.reshape(task_vectors.shape[0], -1).abs()  # (T, n_unit)

        bounds = streamed_order_statistics(
            scan, magnitudes, lambda lengths: [magnitude_ranks(n, p.variant) for n in lengths]
        )
        low, high = torch.stack([b[0] for b in bounds]), torch.stack([b[1] for b in bounds])  # (T,)

        def scores(task_vectors: Tensor, ctx: UnitContext) -> Tensor:
            flat = task_vectors.reshape(task_vectors.shape[0], -1)
            return balancing_score(flat, low.to(flat), high.to(flat), p.variant)  # (T, n_unit)

        found = streamed_order_statistics(
            scan, scores, lambda lengths: [score_ranks(n, p.ratio) for n in lengths]
        )
        return PcbStats(low, high, torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found]))

    def row_chunks(self, p: Hyperparameters) -> bool:
        assert isinstance(p, PcbParams)
        return p.scope == "global"  # given the global statistics, entry by entry

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, PcbParams)
        flat = task_vectors.reshape(task_vectors.shape[0], -1)  # (T, n)
        stats = (
            ctx.stats
            if p.scope == "global" and isinstance(ctx.stats, PcbStats)
            else self.tensor_stats(flat, p)
        )
        merged = pcb_merge(flat, stats, p.variant)  # (n)
        return LamForm(offset=None, slope=merged.reshape(task_vectors.shape[1:]))

    @staticmethod
    def tensor_stats(flat: Tensor, p: PcbParams) -> PcbStats:
        """The same statistics over one tensor (``scope="tensor"``). flat (T, n)."""
        n = flat.shape[1]
        bounds = order_statistics(flat.abs(), [magnitude_ranks(n, p.variant)] * flat.shape[0])
        low, high = torch.stack([b[0] for b in bounds]), torch.stack([b[1] for b in bounds])
        found = order_statistics(
            balancing_score(flat, low, high, p.variant), [score_ranks(n, p.ratio)] * flat.shape[0]
        )
        return PcbStats(low, high, torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found]))
