"""Data-free λ estimators: per-task coefficients from the task vectors' norms, in one streaming scan.

Rules (``auto:<rule>``), each giving weights ``λ_t ≥ 0`` with ``Σ_t λ_t = 1``:

- ``metagpt`` — MetaGPT's closed form (Zhou et al., "MetaGPT: Merging Large Language Models Using
  Model Exclusive Task Arithmetic", EMNLP 2024, arXiv 2406.11385): ``λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖²``.
- ``nan`` — NAN (Si et al., "NAN: A Training-Free Solution to Coefficient Estimation in Model
  Merging", arXiv 2505.16148): coefficients from the inverse of the parameter norm, normalised to sum
  to one, ``λ_t = ‖τ_t‖⁻¹ / Σ_k ‖τ_k‖⁻¹``. The paper's least-squares argument makes a model's weight
  grow with the task information it holds, which it proxies by the inverse norm. We apply the rule to
  the task vectors (the merged parameters' deltas), as the other norm rules here do; a zero task vector
  gets weight 0 (it holds nothing to merge).

Norms are Frobenius norms over every merged parameter (the plan's merge units, after ``include`` and
``exclude``), accumulated in float64 over one scan; nothing but T numbers is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError

AUTO_PREFIX = "auto:"


def metagpt_weights(norms_sq: Tensor) -> Tensor:
    """``λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖²`` (uniform when every task vector is zero). (T,) -> (T,)."""
    total = norms_sq.sum()
    if total <= 0:
        return torch.full_like(norms_sq, 1 / len(norms_sq))
    return norms_sq / total


def nan_weights(norms_sq: Tensor) -> Tensor:
    """``λ_t = ‖τ_t‖⁻¹ / Σ_k ‖τ_k‖⁻¹`` over the non-zero task vectors (zero ones get 0). (T,) -> (T,)."""
    nonzero = norms_sq > 0
    if not bool(nonzero.any()):
        return torch.full_like(norms_sq, 1 / len(norms_sq))
    inverse = torch.where(nonzero, norms_sq.clamp(min=torch.finfo(norms_sq.dtype).tiny).rsqrt(), 0.0)
    return inverse / inverse.sum()


RULES: dict[str, Callable[[Tensor], Tensor]] = {"metagpt": metagpt_weights, "nan": nan_weights}


def parse_auto(spec: object) -> str | None:
    """The rule named by ``"auto:<rule>"``, None for anything that is not such a string."""
    if not isinstance(spec, str) or not spec.strip().lower().startswith(AUTO_PREFIX):
        return None
    rule = spec.strip()[len(AUTO_PREFIX) :].strip().lower()
    if rule not in RULES:
        raise OptionError(
            f"'{spec}': unknown λ estimator '{rule}'; valid: {', '.join(AUTO_PREFIX + r for r in RULES)}"
        )
    return rule


def task_norms_sq(scan: Any) -> Tensor:
    """``‖τ_t‖²`` over every merged parameter, from one streaming scan. -> (T,) float64, CPU."""
    partials = scan(lambda tv, ctx: tv.double().reshape(tv.shape[0], -1).square().sum(1).cpu())
    if not partials:
        raise OptionError("no parameter is merged, so the task vectors' norms are undefined")
    return torch.stack(partials).sum(0)


def estimate(rule: str, scan: Any) -> list[float]:
    """Per-task weights ``λ_t`` (summing to 1) by ``rule``, from the checkpoints alone."""
    return [float(w) for w in RULES[rule](task_norms_sq(scan))]


def resolve_task_weights(spec: str | Sequence[float] | None, scan: Any, num_tasks: int) -> list[float] | None:
    """The per-task scales of the generic ``task_weights`` option (applied to Δ_t before any method).

    ``"auto:<rule>"``: the rule's weights times T (mean 1, so a uniform rule changes nothing and the
    method's own λ keeps its meaning); a list: those scales as given; None: no scaling.
    """
    if spec is None:
        return None
    rule = parse_auto(spec)
    if rule is not None:
        return [num_tasks * w for w in estimate(rule, scan)]
    if isinstance(spec, str):
        raise OptionError(f"task_weights '{spec}' is neither auto:<rule> nor a list of numbers")
    try:
        scales = [float(x) for x in spec]
    except (TypeError, ValueError):
        raise OptionError(f"task_weights {spec!r} must be numbers or auto:<rule>") from None
    if len(scales) != num_tasks:
        raise OptionError(
            f"task_weights has {len(scales)} values but there are {num_tasks} fine-tuned models"
        )
    return scales
