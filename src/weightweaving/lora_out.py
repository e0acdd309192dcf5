"""``--out-lora RANK``: write a merge as a PEFT LoRA adapter, by truncated SVD of each merged update.

For a merged update ΔW = U S Vᵀ of a weight matrix, the best rank-r approximation (Eckart–Young) is
B A with B = U_r √S_r and A = √S_r V_rᵀ; with ``lora_alpha = r`` PEFT's scaling α / r is 1, so the
adapter applies exactly B A. The share of ΔW's energy kept, Σ_{i≤r} σ_i² / Σ σ_i², is reported per
module and overall (a value of 1 means the adapter is exact).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .api import Job, base_name, write_provenance
from .checkpoints import OutputEntry, SafetensorsWriter
from .checkpoints.llm import INPUT_EMBEDDINGS
from .checkpoints.lora import ADAPTER_CONFIG, PEFT_PREFIX, LoraCheckpoint
from .engine.execute import UnitFn
from .engine.plan import Unit
from .errors import OptionError

log = logging.getLogger("weightweaving")


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """B (out, rank) and A (rank, in) with B A the best rank-``rank`` approximation of ``delta``.

    Returns:
        B, A (zero-padded when the matrix's rank is below ``rank``), the energy kept and the total.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    energy = s.double().square()
    return b, a, float(energy[:k].sum()), float(energy.sum())


def _targets(job: Job) -> tuple[list[Unit], list[str]]:
    """Merged units an adapter can carry (matrices some model changes), and the changed ones it cannot."""
    changed: set[str] | None = set()
    for model in job.models:
        names = model.changed()
        if names is None or changed is None:
            changed = None
        else:
            changed |= names
    targets, left_out = [], []
    for unit in job.runner.plan.merge_units:
        if changed is not None and unit.name not in changed:
            continue  # every model reads the base here: the merged update is zero
        if len(unit.shape) == 2 and unit.name.endswith(".weight"):
            targets.append(unit)
        else:
            left_out.append(unit.name)
    return targets, left_out


def _task_type(job: Job) -> str | None:
    for model in job.models:
        inner = getattr(model, "inner", model)
        if isinstance(inner, LoraCheckpoint):
            task_type = inner.config.get("task_type")
            return str(task_type) if task_type else None
    return None


def deliver_lora(
    job: Job,
    unit_fn: UnitFn,
    *,
    rank: int,
    out: str | os.PathLike[str],
    overwrite: bool,
    record: dict[str, Any],
    desc: str,
) -> Path:
    """Stream the merged updates of ``job`` into a PEFT adapter folder at ``out``."""
    targets, left_out = _targets(job)
    if not targets:
        raise OptionError("--out-lora: no merged weight matrix changes, so there is nothing to write")
    if left_out:
        job.runner.plan.notes.append(
            f"--out-lora: {len(left_out)} changed parameters are not weight matrices and are not in the "
            f"adapter (their merged changes are lost): {', '.join(left_out[:5])}"
        )
        job.runner.plan.left_out["not a weight matrix (--out-lora)"] = left_out
        log.warning(job.runner.plan.notes[-1])
    kinds = {u.name: bool(INPUT_EMBEDDINGS.search(u.name)) for u in targets}

    def keys(unit: Unit) -> tuple[str, str]:
        module = PEFT_PREFIX + unit.name[: -len(".weight")]
        if kinds[unit.name]:
            return module + ".lora_embedding_A", module + ".lora_embedding_B"
        return module + ".lora_A.weight", module + ".lora_B.weight"

    entries = []
    for unit in targets:
        rows, cols = unit.shape[::-1] if kinds[unit.name] else unit.shape  # ΔW of an embedding is (B A)ᵀ
        a_key, b_key = keys(unit)
        entries += [
            OutputEntry(a_key, (rank, cols), unit.out_dtype),
            OutputEntry(b_key, (rows, rank), unit.out_dtype),
        ]
    per_module: dict[str, float] = {}
    kept_total = energy_total = 0.0
    with SafetensorsWriter(out, entries, overwrite=overwrite, basename="adapter_model") as writer:
        units = {u.name: u for u in targets}
        for name, delta in job.runner.run_deltas(unit_fn, targets, desc=desc):
            unit = units[name]
            matrix = delta.T if kinds[name] else delta
            b, a, kept, energy = low_rank(matrix, rank)
            a_key, b_key = keys(unit)
            writer.write(a_key, a.to(unit.out_dtype))
            writer.write(b_key, b.to(unit.out_dtype))
            per_module[name[: -len(".weight")]] = kept / energy if energy > 0 else 1.0
            kept_total += kept
            energy_total += energy
            log.info("--out-lora %s: kept %.6f of the energy", name, per_module[name[: -len(".weight")]])
        overall = kept_total / energy_total if energy_total > 0 else 1.0
        log.warning(
            "--out-lora %d: the adapter keeps %.4f%% of the merged updates' energy", rank, 100 * overall
        )
        config = {
            "peft_type": "LORA",
            "task_type": _task_type(job),
            "base_model_name_or_path": base_name(job),
            "r": rank,
            "lora_alpha": rank,
            "target_modules": sorted(per_module),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
            "init_lora_weights": True,
        }
        writer.add_file(ADAPTER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        record = {
            **record,
            "out_lora": {"rank": rank, "energy_kept": overall, "energy_kept_per_module": per_module},
        }
        write_provenance(writer, job, record, library_name="peft")
        return writer.commit()
