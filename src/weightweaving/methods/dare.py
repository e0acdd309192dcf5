"""DARE, drop and rescale (Yu et al., ICML 2024), combined with a base method (docs/algorithms.md, `dare`).

Reference: yule-BUAA/MergeLM ``mask_input_with_mask_rate``. Unlike MergeLM's global RNG, the mask
comes from (seed, parameter name, task index) only, never from λ: one seed gives one mask for every
λ, so DARE stays linear in λ and Weight Weaving can use its closed form.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from ..errors import OptionError
from .base import Hyperparameters, LamForm, LamKind, Scanner, Scope, UnitContext, paper_ranges
from .compose import ComposesBase, checked_base_hyperparameters
from .registry import get_method, register


class DareParams(Hyperparameters):
    p: float = Field(0.5, ge=0, le=1, description="probability of dropping each task-vector entry")
    rescale: bool = Field(True, description="multiply the survivors by 1/(1 − p) (not when p = 1)")
    base: str = Field("task_arithmetic", description="registered method merging the masked task vectors")
    base_hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="hyperparameters of the base method"
    )

    @field_validator("base")
    @classmethod
    def _linear_base(cls, name: str) -> str:
        if name == "dare":
            raise ValueError("DARE cannot be its own base method")
        try:
            method = get_method(name)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        if method.lam_kind is not LamKind.LINEAR:
            raise ValueError(f"the base method must be linear in λ; '{name}' is {method.lam_kind.value}")
        return name

    @field_validator("base_hyperparameters")
    @classmethod
    def _valid_for_base(cls, values: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return checked_base_hyperparameters(values, info)


_LANES_MIN = 1 << 16  # entries per task below which the draws are not worth a thread


def _draw_all(out: Tensor, ctx: UnitContext) -> None:
    """Task t's uniform draws (from ``ctx.generator("dare", t)``, 32 bits per entry) into ``out[t]``.

    Each task's stream is its own, so the draws (Mersenne Twister: one core each, most of DARE's
    time) run in as many threads as PyTorch may use: the same numbers in any order."""
    num_tasks, shape = out.shape[0], tuple(out.shape[1:])

    def draw(t: int) -> None:
        ctx.piece_draws(
            lambda size, gen: torch.rand(size, generator=gen, dtype=torch.float32, out=out[t]),
            shape,
            "dare",
            t,
        )

    lanes = min(num_tasks, torch.get_num_threads()) if out[0].numel() >= _LANES_MIN else 1
    if lanes <= 1:
        for t in range(num_tasks):
            draw(t)
        return
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        for _ in pool.map(draw, range(num_tasks)):  # raises here what a draw raised
            pass


def drop_and_rescale(task_vectors: Tensor, p: float, rescale: bool, ctx: UnitContext) -> Tensor:
    """Drop each entry of each Δ_t with probability p, divide the survivors by 1 − p (eq. 2).

    Task t's mask is drawn on the CPU from ``ctx.generator("dare", t)`` and moved to the tensor's
    device, so it is the same on every executor and device; a chunk of rows (``ctx.rows``) gets
    the draws of those rows of the whole parameter's stream. (T, *s) -> (T, *s).
    """
    shape = tuple(task_vectors.shape[1:])
    num_tasks = task_vectors.shape[0]
    kept = torch.empty(shape)  # (*s), CPU: 1.0 where the entry survives
    # every task's draws at once, in one buffer allocated here (allocating them task after task in
    # the engine's threads fragmented the C heap until the process held 3x the memory it used)
    all_draws = torch.empty((num_tasks, *shape))
    _draw_all(all_draws, ctx)
    # on the CPU, task t's masked vector overwrites its draws once its mask is taken from them: one
    # (T, *s) buffer fewer
    same = task_vectors.device == all_draws.device and task_vectors.dtype == all_draws.dtype
    masked = all_draws if same else torch.empty_like(task_vectors)
    for t in range(num_tasks):
        draws = all_draws[t]  # (*s), CPU
        row = task_vectors[t]
        if ctx.finite or bool(torch.isfinite(row.sum())):
            # x·1 or x·0 = ±0, then + 0.0 makes every zero +0 as a masked_fill with 0 would (the
            # kept −0 too: a −0 task-vector entry has a +0 base, which absorbs either zero);
            # float kernels, several times faster than a boolean mask
            torch.ge(draws, p, out=kept)
            torch.mul(row, kept.to(row.device), out=masked[t]).add_(0.0)
        else:  # x·0 is NaN for x = ±Inf or NaN (--allow-nonfinite): drop them exactly
            masked[t] = row.masked_fill((draws < p).to(row.device), 0)
    if rescale and p < 1:
        masked.div_(1 - p)  # in place: the same quotients, no second (T, *s) tensor
    return masked


@register("dare")
class Dare(ComposesBase):
    """M = λ · base(DARE(Δ_1), …, DARE(Δ_T)); with Task Arithmetic E[M] = λ Σ_t Δ_t (ICML 2024, eq. 2)."""

    params = DareParams
    lam_kind = LamKind.LINEAR
    scope = Scope.ELEMENTWISE
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges()
    single_model_identity = False
    order_invariant = False  # task t's mask depends on its index
    stochastic = True
    oracle_exempt = (
        "statistical: random masks; its oracle cases state an expectation over seeds, which "
        "tests/methods/test_dare.py checks by its statistics"
    )
    summary = "randomly drop task-vector entries (rate p), rescale the rest, merge with a base method"
    data_free = True
    reported = "— (no figures in the spec's reported table)"
    reference = "yule-BUAA/MergeLM"

    def global_stats(self, scan: Scanner[Any], p: Hyperparameters, seed: int) -> Any:
        """The base method's first passes, run over the masked task vectors."""
        assert isinstance(p, DareParams)
        method, base_p = self._base(p)

        def masked_scan(fn: Any) -> list[Any]:
            return scan(lambda tv, ctx: fn(drop_and_rescale(tv, p.p, p.rescale, ctx), ctx))

        return method.global_stats(masked_scan, base_p, seed)

    def row_chunks(self, p: Hyperparameters) -> bool:
        assert isinstance(p, DareParams)
        method, base_p = self._base(p)
        return method.row_chunks(base_p)  # the masks are drawn entry by entry (piece_draws)

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, DareParams)
        method, base_p = self._base(p)
        return method.compute(drop_and_rescale(task_vectors, p.p, p.rescale, ctx), base_p, ctx)
