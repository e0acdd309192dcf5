"""``merge_sweep``: one method's merges at many λ in one pass, for λ sweeps of any method.

A method linear or affine in λ needs no sweep (``merge`` at λ = 1, and 2, gives the line); a
``NONLINEAR`` one (SVC) has no such form, but much of its work does not depend on λ: each unit's
``Method.merge_unit_sweep`` does that work once and then makes every λ's merge.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .api import _clip_default, check_lam, method_stats, open_job, with_stats
from .checkpoints.open import Source
from .engine import Executor
from .errors import OptionError
from .methods import UnitContext, get_method


def merge_sweep(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str = "task_arithmetic",
    lambdas: Sequence[float] = (1.0,),
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    common_only: bool = False,
    allow_nonfinite: bool = False,
    workers: int = 1,
    executor: Executor | str | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
    vocab: str = "error",
    **hyperparameters: Any,
) -> dict[float, dict[str, Tensor]]:
    """The merge at every λ of ``lambdas``, reading the checkpoints once: ``{λ: state dict}``.

    Each state dict equals ``merge(pretrained, finetuned, method, lam=λ, ...)`` up to float
    rounding; the method's λ-independent work is done once per parameter (for SVC over a method
    linear in λ: one base merge and one SVD per weight matrix for the whole sweep). Every state dict
    is held in memory (there is no ``out``); the other arguments are ``merge``'s.

    Example:
        >>> import torch, weightweaving
        >>> base = {"w": torch.zeros(2)}
        >>> tuned = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
        >>> sweep = weightweaving.merge_sweep(base, tuned, "task_arithmetic", [0.5, 1.0])
        >>> sweep[0.5]["w"], sweep[1.0]["w"]
        (tensor([0.5000, 1.0000]), tensor([1., 2.]))
    """
    chosen = get_method(method)
    p = chosen.parse_params(hyperparameters)
    if isinstance(lambdas, (str, bytes)) or not isinstance(lambdas, Sequence) or not lambdas:
        raise OptionError("merge_sweep: 'lambdas' must be a non-empty list of numbers")
    lams = [float(lam) for lam in lambdas]
    for lam in lams:
        check_lam(chosen, lam)
    if not isinstance(finetuned, (str, os.PathLike, Mapping)):
        chosen.check_num_models(len(finetuned))
    engine: dict[str, Any] = {"include": include, "exclude": exclude}
    clip_rule = _clip_default(pretrained, engine)
    job = open_job(
        pretrained,
        finetuned,
        device=device,
        dtype=dtype,
        compute_dtype=compute_dtype,
        include=clip_rule or include,
        exclude=exclude,
        seed=seed,
        common_only=common_only,
        allow_nonfinite=allow_nonfinite,
        executor=executor,
        workers=workers,
        progress=progress,
        vocab=vocab,
        ray_address=ray_address,
    )
    try:
        runner = job.runner
        units = {u.name: u for u in runner.plan.units}
        found: dict[str, Any] = {}
        found["stats"] = method_stats(chosen, p, runner, deliver=lambda s: found.update(stats=s))

        def unit_fn(task_vectors: Tensor, ctx: UnitContext) -> Tensor:
            # as ``merge`` writes a unit: base + merged in the compute dtype, then the output dtype
            base, out_dtype = ctx.base, units[ctx.name].out_dtype
            assert base is not None
            merged = chosen.merge_unit_sweep(task_vectors, p, lams, with_stats(ctx, found["stats"]))
            return torch.stack([(base + m.to(base.dtype)).to("cpu", out_dtype) for m in merged])

        merged_units = [u for u in runner.plan.units if u.merge]
        stacked = dict(runner.run_deltas(unit_fn, merged_units, desc="merging a sweep"))
        out: dict[float, dict[str, Tensor]] = {lam: {} for lam in lams}
        for name, unit in units.items():  # each λ's tensors its own (safetensors refuses shared storage)
            whole = stacked.pop(name) if unit.merge else runner.base.get(name).to(unit.out_dtype)
            for i, lam in enumerate(lams):
                out[lam][name] = (whole[i] if unit.merge else whole).clone()
        return out
    finally:
        job.close()
