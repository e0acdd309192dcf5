"""Steps of the methods that follow mergekit (``gta``, ``slerp``, ``model_stock``): per-layer settings
and mergekit's working precision.

mergekit lets any hyperparameter be a *gradient* over the layers (a list of values interpolated at
the layer's position ``i / (L − 1)``) and conditional on the parameter's name (``filter``: a
substring; the first match wins). mergekit also computes in the dtype the tensors were loaded in
(its ``dtype`` option, else the checkpoint's), so to give the same bytes these methods can run their
arithmetic in that ``precision`` while the engine holds exact float64 task vectors.
"""

from __future__ import annotations

import re
from typing import Literal, TypeAlias

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .base import Hyperparameters, UnitContext

Scalar: TypeAlias = float
Gradient: TypeAlias = list[float]


class Conditional(BaseModel):
    """``{filter: self_attn, value: [0, 0.5, 1]}``: applies to parameters whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: Scalar | Gradient
    filter: str | None = None


Setting: TypeAlias = Scalar | Gradient | list[Conditional]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
PRECISIONS = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def layer_position(name: str, layers: int | None) -> float:
    """mergekit's ``t`` of a parameter: ``i / (L − 1)`` inside layer i of L, 1 when L = 1, else 0."""
    found = _LAYER.search(name)
    if found is None or not layers:
        return 0.0
    return int(found.group(1)) / (layers - 1) if layers > 1 else 1.0


def resolve(setting: Setting, name: str, layers: int | None) -> float | None:
    """The value of a setting for one parameter (mergekit's ``evaluate_setting``, numeric values)."""
    if isinstance(setting, (int, float)):
        return float(setting)
    if not setting:
        return None
    if all(isinstance(x, (int, float)) for x in setting):
        values = [float(x) for x in setting]  # type: ignore[arg-type]
        if len(values) > 1 and _LAYER.search(name) and not layers:
            from ..errors import OptionError

            raise OptionError(f"parameter '{name}': a gradient over the layers needs 'layers' (their number)")
        scaled = layer_position(name, layers) * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]
    for cond in setting:
        assert isinstance(cond, Conditional)
        if cond.filter in (None, "*") or cond.filter in name:
            return resolve(cond.value, name, layers)
    return None


def per_model(
    settings: list[Setting] | None, default: float, count: int, name: str, layers: int | None, what: str
) -> list[float]:
    """One value per fine-tuned model from one setting per model (``default`` where absent)."""
    from ..errors import OptionError

    if settings is None:
        return [default] * count
    if len(settings) != count:
        raise OptionError(f"'{what}' has {len(settings)} values but there are {count} fine-tuned models")
    values = [resolve(item, name, layers) for item in settings]
    return [default if v is None else v for v in values]


class PrecisionParams(Hyperparameters):
    """What the mergekit methods share: where gradients sit, and the precision of the arithmetic."""

    layers: int | None = Field(
        None, ge=1, description="number of layers, for gradients over 'layers.<i>.' (mergekit's t = i/(L−1))"
    )
    precision: Literal["float32", "float64", "bfloat16", "float16", "stored"] | None = Field(
        None,
        description="dtype the arithmetic runs in, as mergekit's 'dtype' (stored: the checkpoint's); "
        "default the compute dtype",
    )


def work_dtype(precision: str | None, ctx: UnitContext, compute: torch.dtype) -> torch.dtype:
    """The dtype mergekit would compute this parameter in."""
    if precision is None:
        return compute
    if precision == "stored":
        stored = ctx.stored_dtype or compute
        return stored if stored.is_floating_point else compute
    return PRECISIONS[precision]


def weights_of(task_vectors: Tensor, ctx: UnitContext) -> tuple[Tensor, Tensor]:
    """The base (*s) and the fine-tuned weights (T, *s), rebuilt from the task vectors in their dtype.

    With float64 task vectors of float32/bf16 checkpoints, ``base + Δ`` gives the stored weights back
    exactly.
    """
    if ctx.base is None:
        raise RuntimeError(f"{ctx.name}: this method needs the base tensor (ctx.base)")
    base = ctx.base.to(task_vectors.dtype)
    return base, task_vectors + base


def emulated_delta(base: Tensor, base_w: Tensor, merged_delta: Tensor, precision: str | None) -> Tensor:
    """The merged task vector as mergekit would store it: ``(base + M)`` rounded in the working
    precision, minus the base (exact in float64), so that the engine's ``base + ·`` gives mergekit's
    weights. Without a ``precision`` the merged task vector is returned as computed."""
    if precision is None:
        return merged_delta.to(base.dtype)
    return (base_w + merged_delta).to(base_w.dtype).to(base.dtype) - base


def emulated_weights(base: Tensor, merged_weights: Tensor) -> Tensor:
    """A method that computes merged weights (slerp, model stock) returns their difference to the base."""
    return merged_weights.to(base.dtype) - base
