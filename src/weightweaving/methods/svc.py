"""SVC, Singular Value Calibration (Li et al., "When Shared Knowledge Hurts: Spectral
Over-Accumulation in Model Merging", arXiv 2602.05536, ICML 2026; lyymuwu/SVC
``merge_func.py:layer_wise_Align``).

A data-free post-processing of any merge: per weight matrix, each singular direction of the merged
task vector is divided by how many times over the tasks counted it. λ is the base method's and enters
before calibration, so SVC is not linear in λ (``LamKind.NONLINEAR``): Weight Weaving evaluates it
per λ. Over a base linear in λ a whole sweep still needs one base merge and one SVD per matrix
(:func:`calibrate_sweep`, through :meth:`Svc.merge_unit_sweep`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from ..errors import OptionError
from .base import Hyperparameters, LamKind, Scanner, Scope, UnitContext, paper_ranges
from .compose import ComposesBase, checked_base_hyperparameters
from .registry import get_method, register
from .steps import check_regex, is_weight_matrix, name_matches, thin_svd

log = logging.getLogger("weightweaving")

# Bases with a flat spectrum: their singular vectors are not unique, so the calibration depends on
# the basis the platform's SVD routine returns (docs/algorithms.md, `svc`).
FLAT_SPECTRUM_BASES = ("iso_c", "iso_cts")


class SvcParams(Hyperparameters):
    base: str = Field("task_arithmetic", description="registered method whose merge is calibrated")
    alpha: float | None = Field(
        None,
        gt=0,
        description="floor on each task's coefficient s_rt; default 1/T, and 1.0 when base = tsv "
        "(the repository's run.sh)",
    )
    calibrate_exclude: str | None = Field(
        "embedding|text_projection",
        description="regex (re.search) on parameter names: matching 2-D parameters keep the base "
        "output (the reference skips names containing 'embedding' or 'text_projection')",
    )
    base_hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="hyperparameters of the base method; any other name given to svc lands here "
        "(flat: base=ties, k=0.2, scope=tensor)",
    )

    _check_calibrate_exclude = field_validator("calibrate_exclude")(check_regex)

    @field_validator("base")
    @classmethod
    def _known_base(cls, name: str) -> str:
        if name == "svc":
            raise ValueError("SVC cannot be its own base method")
        try:
            get_method(name)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("base_hyperparameters")
    @classmethod
    def _valid_for_base(cls, values: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return checked_base_hyperparameters(values, info)


def calibrate(merged: Tensor, task_vectors: Tensor, alpha: float) -> Tensor:
    """Divide each singular value of the merged matrix by how many times over the tasks counted it.

    ``M_b = U diag(σ) Vᵀ``; per component r and task t the least-squares coefficient of the merged
    row ``a_r = u_rᵀ M_b`` on the task's row ``b_rt = u_rᵀ Δ_t`` is ``s_rt = ⟨a_r, b_rt⟩ /
    max(‖b_rt‖², 1e-12)``; ``η_r = mean_t max(s_rt, alpha)``; ``M = U diag(σ/η) Vᵀ``.
    merged (m, n), task_vectors (T, m, n) -> (m, n).
    """
    return next(calibrate_sweep(merged, task_vectors, alpha, [1.0]))


def calibrate_sweep(
    merged: Tensor, task_vectors: Tensor, alpha: float, lams: Sequence[float]
) -> Iterator[Tensor]:
    """``calibrate(λ·merged, task_vectors, alpha)`` at every λ of ``lams``, with one SVD.

    ``SVD(λ·M_b) = U diag(λσ) Vᵀ`` and every ``s_rt`` scales with λ (the ``b_rt`` do not depend on
    it), so per λ only ``η_r(λ) = mean_t max(λ·s_rt, alpha)`` and ``U diag(λσ/η) Vᵀ`` remain; equal
    to the per-λ calibration up to float rounding (for any real λ: a negative one flips V's signs).
    merged (m, n) at λ = 1, task_vectors (T, m, n) -> one (m, n) per λ.
    """
    u, s, vh = thin_svd(merged)  # (m, p), (p), (p, n)
    merged_rows = u.T @ merged  # (p, n): a_r
    task_rows = u.T @ task_vectors  # (T, p, n): b_rt
    coefficients = (task_rows * merged_rows).sum(-1) / task_rows.square().sum(-1).clamp(min=1e-12)  # (T, p)
    del task_rows, merged_rows
    for lam in lams:
        counted = (lam * coefficients).clamp(min=alpha).mean(0)  # (p): η_r(λ)
        yield (u * (lam * s / counted)) @ vh


@functools.cache
def _warn_platform_dependent(base: str) -> None:
    log.warning(
        "svc over '%s': the base has a flat spectrum, so its singular vectors are not unique and the "
        "calibrated result depends on the platform's SVD routine (not reproducible across machines)",
        base,
    )


@register("svc")
class Svc(ComposesBase):
    """``M = SVC(base(Δ, λ), Δ)`` on 2-D parameters whose name matches neither ``embedding`` nor
    ``text_projection``; the base output elsewhere. Alpha: 1/T by default, 1.0 over TSV."""

    params = SvcParams
    lam_kind = LamKind.NONLINEAR
    scope = Scope.TENSOR
    default_lam = 1.0  # the base's λ; every base's own default is 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = True  # T = 1 over Task Arithmetic: every s_r is 1 and alpha = 1
    order_invariant = True
    summary = "singular value calibration of another method's merge: shrink over-counted directions"
    data_free = True
    reported = "no per-setting figures; the authors claim +13.0 % over Task Arithmetic"
    reference = "lyymuwu/SVC"

    def parse_params(self, values: dict[str, Any] | None = None) -> Hyperparameters:
        """SVC's own hyperparameters; every other name is the base method's (passed flat)."""
        own = {k: v for k, v in (values or {}).items() if k in SvcParams.model_fields}
        passed_on = {k: v for k, v in (values or {}).items() if k not in SvcParams.model_fields}
        if passed_on:
            own["base_hyperparameters"] = {**dict(own.get("base_hyperparameters") or {}), **passed_on}
        p = super().parse_params(own)
        assert isinstance(p, SvcParams)
        if p.base in FLAT_SPECTRUM_BASES:
            _warn_platform_dependent(p.base)
        return p

    def global_stats(self, scan: Scanner[Any], p: Hyperparameters, seed: int) -> Any:
        """The base method's first passes, over the task vectors."""
        assert isinstance(p, SvcParams)
        method, base_p = self._base(p)
        return method.global_stats(scan, base_p, seed)

    def compute_at(self, task_vectors: Tensor, p: Hyperparameters, lam: float, ctx: UnitContext) -> Tensor:
        assert isinstance(p, SvcParams)
        method, base_p = self._base(p)
        merged = method.merge_unit(task_vectors, base_p, lam, ctx)  # (*shape): the base's M_b, λ included
        if not self._calibrated(task_vectors, p, ctx):
            return merged
        return calibrate(merged, task_vectors, self._alpha(p, task_vectors.shape[0]))

    def merge_unit_sweep(
        self, task_vectors: Tensor, p: Hyperparameters, lams: Sequence[float], ctx: UnitContext
    ) -> Iterator[Tensor]:
        """Every λ of ``lams`` from one base merge; over a base linear in λ also from one SVD
        (:func:`calibrate_sweep`), over any other base one calibration per λ."""
        assert isinstance(p, SvcParams)
        method, base_p = self._base(p)
        if not self._calibrated(task_vectors, p, ctx):
            yield from method.merge_unit_sweep(task_vectors, base_p, lams, ctx)
            return
        alpha = self._alpha(p, task_vectors.shape[0])
        if method.lam_kind is LamKind.LINEAR:
            yield from calibrate_sweep(
                method.merge_unit(task_vectors, base_p, 1.0, ctx), task_vectors, alpha, lams
            )
            return
        for merged in method.merge_unit_sweep(task_vectors, base_p, lams, ctx):
            yield calibrate(merged, task_vectors, alpha)

    @staticmethod
    def _calibrated(task_vectors: Tensor, p: SvcParams, ctx: UnitContext) -> bool:
        """True for a 2-D parameter that ``calibrate_exclude`` does not name."""
        return is_weight_matrix(task_vectors) and not name_matches(p.calibrate_exclude, ctx.name)

    @staticmethod
    def _alpha(p: SvcParams, num_tasks: int) -> float:
        """The floor on s_rt: given, else 1.0 over TSV (the repository's run.sh) and 1/T otherwise."""
        return p.alpha if p.alpha is not None else (1.0 if p.base == "tsv" else 1 / num_tasks)
