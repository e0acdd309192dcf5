"""Planning: which parameters are merged, which are copied from the base, and what comes out.

The plan is plain data made from the checkpoints' headers alone, before any tensor is read: every
output name, shape and dtype is known, so the writer can lay out its files first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..checkpoints.base import Checkpoint, RenamedCheckpoint
from ..errors import CheckpointError, OptionError

log = logging.getLogger("weightweaving")


@dataclass(frozen=True)
class Unit:
    """One parameter: merged from the task vectors, or copied from the base."""

    name: str
    shape: tuple[int, ...]
    base_dtype: torch.dtype
    out_dtype: torch.dtype
    merge: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Plan:
    units: list[Unit]  # output order: the base checkpoint's order
    notes: list[str] = field(default_factory=list)  # what was left out and why
    left_out: dict[str, list[str]] = field(default_factory=dict)  # --common-only: every name, by reason

    @property
    def merge_units(self) -> list[Unit]:
        """Units that are merged, in sorted parameter-name order (the global flattening order)."""
        return sorted((u for u in self.units if u.merge), key=lambda u: u.name)


def _compile(patterns: Sequence[str] | None, option: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns or ():
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise OptionError(f"{option} '{pattern}' is not a valid regular expression: {exc}") from None
    return compiled


def align_keys(base: Checkpoint, model: Checkpoint) -> Checkpoint:
    """Strip a prefix (``module.``, ``model.``) that every key of ``model`` has and the base lacks."""
    base_keys, model_keys = set(base.keys()), set(model.keys())
    if base_keys <= model_keys or not model_keys:
        return model
    first = next(iter(model_keys))
    parts = first.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if all(k.startswith(prefix) for k in model_keys):
            stripped = {k[len(prefix) :] for k in model_keys}
            if base_keys & stripped:
                return RenamedCheckpoint(model, prefix)
        else:
            break
    return model


def make_plan(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    out_dtype: torch.dtype | None = None,
    common_only: bool = False,
) -> Plan:
    """Check that the checkpoints fit together and decide what happens to each parameter."""
    if not models:
        raise OptionError("no fine-tuned models given (--models)")
    includes = _compile(include, "--include")
    excludes = _compile(exclude, "--exclude")
    base_infos = base.infos()
    if not base_infos:
        raise CheckpointError("holds no tensors", path=base.label())
    notes: list[str] = []
    left_out: dict[str, list[str]] = {}
    missing_anywhere: set[str] = set()
    for model in models:
        infos = model.infos()
        missing = [k for k in base_infos if k not in infos]
        extra = [k for k in infos if k not in base_infos]
        if (missing or extra) and not common_only:
            which, what = (
                (missing, "is in the base but missing here") if missing else (extra, "is not in the base")
            )
            more = f" (and {len(which) - 1} more)" if len(which) > 1 else ""
            raise CheckpointError(
                f"{what}{more}; the checkpoints differ in architecture "
                "(use --common-only to merge only the parameters they share)",
                path=model.label(),
                parameter=which[0],
            )
        if extra:
            notes.append(f"{model.label()}: left out {len(extra)} parameters the base lacks: {_some(extra)}")
            left_out[f"not in the base, in {model.label()}"] = extra
        missing_anywhere.update(missing)
        for name in base_infos:
            if name in infos and infos[name].shape != base_infos[name].shape:
                raise CheckpointError(
                    f"has shape {infos[name].shape}, expected {base_infos[name].shape} as in the base",
                    path=model.label(),
                    parameter=name,
                )
    if missing_anywhere:
        names = sorted(missing_anywhere)
        notes.append(
            f"copied {len(names)} parameters from the base unmerged because some models lack them: {_some(names)}"
        )
        left_out["copied from the base, missing in a model"] = names
    units = []
    for name, info in base_infos.items():
        is_float = info.dtype.is_floating_point and all(
            m.infos()[name].dtype.is_floating_point for m in models if name in m.infos()
        )
        selected = (not includes or any(p.search(name) for p in includes)) and not any(
            p.search(name) for p in excludes
        )
        merge = is_float and selected and name not in missing_anywhere
        dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        units.append(Unit(name=name, shape=info.shape, base_dtype=info.dtype, out_dtype=dtype, merge=merge))
    if not any(u.merge for u in units):
        if set(base_infos) <= missing_anywhere:
            raise CheckpointError(
                "the checkpoints share no parameter, so there is nothing to merge", path=base.label()
            )
        raise OptionError("no parameter is left to merge (check --include/--exclude)")
    for note in notes:
        log.warning(note)
    return Plan(units=units, notes=notes, left_out=left_out)


def _some(names: Sequence[str], shown: int = 5) -> str:
    listed = ", ".join(f"'{n}'" for n in names[:shown])
    return listed + (f" (and {len(names) - shown} more)" if len(names) > shown else "")
