"""Execution: walk the plan one unit at a time, on one device, and stream results to a sink.

For each merged unit the runner reads the base tensor and the T fine-tuned tensors, forms the task
vectors in the compute dtype, asks a per-unit function for the merged task vector, adds it to the
base, casts to the output dtype and hands the tensor on, keeping nothing once it is passed on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints.base import Checkpoint
from ..errors import CheckpointError, OptionError
from ..methods.base import UnitContext
from .executors import Executor, LocalExecutor
from .plan import Plan, Unit

R = TypeVar("R")
UnitFn = Callable[[Tensor, UnitContext], Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was asked for, but no CUDA device is available")
    return dev


class Runner:
    """Reads units of a plan as task vectors; used for first passes (``scan``) and the merge (``run``)."""

    def __init__(
        self,
        plan: Plan,
        base: Checkpoint,
        models: Sequence[Checkpoint],
        *,
        device: str | torch.device | None = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        allow_nonfinite: bool = False,
        executor: Executor | None = None,
        progress: bool | None = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.plan = plan
        self.base = base
        self.models = list(models)
        self.device = resolve_device(device)
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.allow_nonfinite = allow_nonfinite
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.extras = extras or {}
        self.passes = 0  # how many full passes over the checkpoints have been made (for benchmarks)

    # -- reading ------------------------------------------------------------------------------------
    def load(self, unit: Unit) -> tuple[Tensor, Tensor]:
        """The base tensor and the task vectors (T, *shape), both in the compute dtype on the device."""
        base = self.base.get(unit.name).to(self.device, self.compute_dtype)
        task_vectors = torch.empty(
            (len(self.models), *unit.shape), dtype=self.compute_dtype, device=self.device
        )
        for i, model in enumerate(self.models):
            torch.sub(model.get(unit.name).to(self.device, self.compute_dtype), base, out=task_vectors[i])
        if not self.allow_nonfinite and not bool(torch.isfinite(task_vectors).all()):
            self._refuse_nonfinite(unit, task_vectors)  # NaN/Inf anywhere shows up in the task vectors
        return base, task_vectors

    def _refuse_nonfinite(self, unit: Unit, task_vectors: Tensor) -> None:
        """Name the checkpoint that holds NaN or Inf (looked up only once a unit has failed the check)."""
        for ckpt in [self.base, *self.models]:
            tensor = ckpt.get(unit.name)
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    "contains NaN or Inf values (pass --allow-nonfinite to merge anyway)",
                    path=ckpt.label(),
                    parameter=unit.name,
                )
        culprit = next(
            m for m, tv in zip(self.models, task_vectors, strict=True) if not bool(torch.isfinite(tv).all())
        )
        raise CheckpointError(
            f"differs from the base by more than {self.compute_dtype} can hold (try --compute-dtype float64)",
            path=culprit.label(),
            parameter=unit.name,
        )

    def context(self, unit: Unit, base: Tensor | None = None, stats: Any = None) -> UnitContext:
        return UnitContext(
            name=unit.name,
            seed=self.seed,
            stats=stats,
            extras=self.extras,
            base=base,
            stored_dtype=unit.base_dtype,
        )

    # -- passes -------------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str) -> Any:
        disable = (not sys.stderr.isatty()) if self.progress is None else not self.progress
        return tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=False
        )

    def scan(self, fn: Callable[[Tensor, UnitContext], R], desc: str = "scanning") -> list[R]:
        """``fn(task_vectors, ctx)`` over every merged unit in sorted-name order (a first pass)."""
        units = self.plan.merge_units
        self.passes += 1

        def one(unit: Unit) -> R:
            base, task_vectors = self.load(unit)
            return fn(task_vectors, self.context(unit, base))

        results = []
        with self._bar(sum(u.numel for u in units) * 4 * (len(self.models) + 1), desc) as bar:
            for unit, result in zip(units, self.executor.map(one, units), strict=True):
                results.append(result)
                bar.update(unit.numel * 4 * (len(self.models) + 1))
        return results

    def run(self, unit_fn: UnitFn, desc: str = "merging") -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, output tensor)`` for every unit in plan order; merged units go through ``unit_fn``."""
        self.passes += 1

        def one(unit: Unit) -> Tensor:
            if not unit.merge:
                return self.base.get(unit.name).to(unit.out_dtype)
            base, task_vectors = self.load(unit)
            merged = unit_fn(task_vectors, self.context(unit, base))
            if tuple(merged.shape) != unit.shape:
                raise RuntimeError(
                    f"{unit.name}: method returned shape {tuple(merged.shape)}, expected {unit.shape}"
                )
            out = base + merged.to(base.dtype)  # never in place: ``base`` may be the caller's own tensor
            return out.to("cpu", unit.out_dtype)

        total = sum(
            u.numel * u.base_dtype.itemsize * (len(self.models) + 1 if u.merge else 1)
            for u in self.plan.units
        )
        with self._bar(total, desc) as bar:
            bar.set_postfix_str(f"{len(self.plan.units)} parameters")
            for unit, tensor in zip(self.plan.units, self.executor.map(one, self.plan.units), strict=True):
                yield unit.name, tensor
                bar.update(
                    unit.numel * unit.base_dtype.itemsize * (len(self.models) + 1 if unit.merge else 1)
                )

    def run_deltas(
        self, unit_fn: UnitFn, units: Sequence[Unit], desc: str = "merging"
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, merged task vector)`` for ``units`` (merged ones), in order, in the compute
        dtype on the CPU: what a LoRA output factorises, without the base added and cast away."""
        self.passes += 1

        def one(unit: Unit) -> Tensor:
            base, task_vectors = self.load(unit)
            return unit_fn(task_vectors, self.context(unit, base)).to("cpu")

        with self._bar(
            sum(u.numel * u.base_dtype.itemsize * (len(self.models) + 1) for u in units), desc
        ) as bar:
            for unit, delta in zip(units, self.executor.map(one, units), strict=True):
                yield unit.name, delta
                bar.update(unit.numel * unit.base_dtype.itemsize * (len(self.models) + 1))
