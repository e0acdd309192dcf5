"""A λ sweep of any method that yields merged state dicts lazily, one λ at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..api import merge, method_stats, open_job, with_stats
from ..checkpoints.open import Source
from ..methods import LamKind, get_method
from ..weaving.search import parse_lambdas


def lam_sweep(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str,
    lambdas: str | Sequence[float],
    *,
    device: str = "cpu",
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool | None = None,
    **hyperparameters: Any,
) -> Iterator[tuple[float, dict[str, Tensor]]]:
    """Yield ``(λ, merged state dict)`` for each λ, computing the method once.

    The method's ``offset`` and ``slope`` (M(λ) = offset + λ·slope) are computed in one pass and kept;
    each merged state dict is built only when the consumer asks for it, so an evaluation callback
    sees one model at a time.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(1)}
        >>> [(lam, sd["w"].item()) for lam, sd in lam_sweep(base, [{"w": torch.ones(1)}], "task_arithmetic", [0.5, 1.0])]
        [(0.5, 0.5), (1.0, 1.0)]
    """
    chosen = get_method(method)
    p = chosen.parse_params(hyperparameters)
    lams = parse_lambdas(lambdas) or []
    for lam in lams:
        chosen.check_lam(lam)
    if chosen.lam_kind is LamKind.NONLINEAR:  # no offset + λ·slope form: one merge per λ
        for lam in lams:
            at_lam = merge(
                pretrained,
                finetuned,
                method,
                lam,
                device=device,
                seed=seed,
                include=include,
                exclude=exclude,
                progress=progress,
                **hyperparameters,
            )
            assert isinstance(at_lam, dict)
            yield lam, {name: tensor.cpu() for name, tensor in at_lam.items()}
        return
    job = open_job(
        pretrained,
        finetuned,
        device=device,
        dtype=None,
        compute_dtype=None,
        include=include,
        exclude=exclude,
        seed=seed,
        common_only=False,
        allow_nonfinite=False,
        executor=None,
        workers=1,
        progress=progress,
    )
    try:
        stats = method_stats(chosen, p, job.runner)
        forms = dict(
            job.runner.scan(
                lambda tv, ctx: (ctx.name, chosen.compute(tv, p, with_stats(ctx, stats))), desc="sweep"
            )
        )
        plan = job.runner.plan
        base = {u.name: job.base.get(u.name) for u in plan.units}
    finally:
        job.close()
    for lam in lams:
        merged: dict[str, Tensor] = {}
        for unit in plan.units:
            if unit.name in forms:
                delta = forms[unit.name].at(lam)
                merged[unit.name] = (base[unit.name].to(delta.device, torch.float32) + delta).to(
                    "cpu", unit.out_dtype
                )
            else:
                merged[unit.name] = base[unit.name].clone()
        yield lam, merged
