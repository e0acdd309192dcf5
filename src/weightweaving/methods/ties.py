"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean (docs/algorithms.md, `ties`).

Reference: prateeky2806/ties-merging ``ties_minimal.ipynb`` (global flattening of every parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Hyperparameters, LamForm, LamKind, Method, Scanner, Scope, UnitContext, paper_ranges
from .registry import register
from .steps import streamed_order_statistics


class TiesParams(Hyperparameters):
    k: float = Field(
        0.2,
        gt=0,
        le=100,
        description="share of each task vector kept by magnitude; values > 1 are percent (20 = 0.2)",
    )
    scope: Literal["global", "tensor"] = Field(
        "global", description="one threshold per task over the whole model (reference) or per tensor"
    )

    @property
    def keep_fraction(self) -> float:
        return self.k / 100 if self.k > 1 else self.k


@dataclass(frozen=True)
class TiesStats:
    """What the global first passes find: each task's trim threshold and the majority sign."""

    thresholds: Tensor  # (T,) keep |x| >= τ_t (or a single 0 when nothing is trimmed)
    majority_sign: float  # sign(Σ over every entry of the elected sign), the fallback where s = 0


def trim_rank(n: int, keep_fraction: float) -> int | None:
    """0-based rank of the threshold τ among n magnitudes: the (n − m)-th smallest, m = int(n·k).

    ``None`` when every entry is kept (m = n).
    """
    kept = int(n * keep_fraction)
    return None if kept >= n else n - kept - 1


def trim(flat: Tensor, thresholds: Tensor) -> Tensor:
    """Step 1: zero every entry below its task's threshold; ties at τ are kept. (T, n) -> (T, n)."""
    return flat * (flat.abs() >= thresholds.to(flat).reshape(-1, 1))


def elect_sign(trimmed: Tensor, majority_sign: float | None = None) -> Tensor:
    """Step 2: s = sign(Σ_t trimmed_t); where s = 0, the sign of Σ s over the scope. (T, n) -> (n)."""
    signs = torch.sign(trimmed.sum(0))  # (n)
    if majority_sign is None:
        majority_sign = float(torch.sign(signs.sum()))
    return torch.where(signs == 0, torch.full_like(signs, majority_sign), signs)


def disjoint_mean(trimmed: Tensor, signs: Tensor) -> Tensor:
    """Step 3: mean of the trimmed values agreeing with the elected sign (x > 0 where s > 0, x < 0
    where s ≤ 0), divided by max(1, count of such non-zeros). (T, n), (n) -> (n)."""
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)  # (T, n)
    selected = trimmed * agree
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1).to(trimmed.dtype)


@register("ties")
class Ties(Method):
    """TIES-Merging: M = λ · disjoint_mean(elect(trim_k(Δ))) (Yadav et al., NeurIPS 2023, Alg. 1)."""

    params = TiesParams
    lam_kind = LamKind.LINEAR
    scope = Scope.GLOBAL
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges(multitask=(0.1, 1.5))
    single_model_identity = False
    order_invariant = True
    summary = (
        "trim each task vector to its top-k magnitudes, elect a sign per entry, average the agreeing values"
    )
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 68.39, woven 71.21; 8 tasks: ViT-B/32 72.4, ViT-L/14 86.0 (WUDI README)"
    reference = "prateeky2806/ties-merging"

    def global_stats(self, scan: Scanner[Any], p: Hyperparameters, seed: int) -> TiesStats:
        """Pass 1–2: each task's exact threshold over all parameters; pass 3: Σ of the elected signs."""
        assert isinstance(p, TiesParams)

        def magnitudes(task_vectors: Tensor, ctx: UnitContext) -> Tensor:
            return task_vectors.reshape(task_vectors.shape[0], -1).abs()  # (T, n_unit)

        def threshold_ranks(lengths: list[int]) -> list[list[int]]:
            return [[n - int(n * p.keep_fraction) - 1] for n in lengths]  # k < 1: m < n

        if p.keep_fraction >= 1:  # nothing is trimmed
            thresholds = torch.zeros(())
        else:
            found = streamed_order_statistics(scan, magnitudes, threshold_ranks)
            thresholds = torch.cat(found)  # (T,)

        def sign_total(task_vectors: Tensor, ctx: UnitContext) -> int:
            flat = task_vectors.reshape(task_vectors.shape[0], -1)
            return int(torch.sign(trim(flat, thresholds).sum(0)).sum())

        return TiesStats(thresholds=thresholds, majority_sign=float(_sign(sum(scan(sign_total)))))

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, TiesParams)
        flat = task_vectors.reshape(task_vectors.shape[0], -1)  # (T, n)
        if p.scope == "global" and isinstance(ctx.stats, TiesStats):
            thresholds, majority = ctx.stats.thresholds, ctx.stats.majority_sign
        else:  # scope="tensor": the same steps over this tensor alone
            thresholds, majority = self._tensor_thresholds(flat, p.keep_fraction), None
        trimmed = trim(flat, thresholds)  # (T, n)
        merged = disjoint_mean(trimmed, elect_sign(trimmed, majority))  # (n)
        return LamForm(offset=None, slope=merged.reshape(task_vectors.shape[1:]))

    @staticmethod
    def _tensor_thresholds(flat: Tensor, keep_fraction: float) -> Tensor:
        rank = trim_rank(flat.shape[1], keep_fraction)
        if rank is None:
            return torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
        return flat.abs().kthvalue(rank + 1, dim=1).values  # (T,)


def _sign(total: int) -> int:
    return (total > 0) - (total < 0)
