"""The Python API: ``merge`` (one method at one λ) and the machinery ``weave`` shares with it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .card import model_card
from .checkpoints import OutputEntry, SafetensorsWriter, open_checkpoint
from .checkpoints.base import Checkpoint
from .checkpoints.llm import fit_to_base, read_config
from .checkpoints.open import WEIGHT_FILES, Source
from .checkpoints.writer import output_lock, output_path
from .engine import Executor, Runner, make_plan
from .engine.execute import entrywise_threads
from .engine.executors import make_executor
from .engine.plan import align_keys
from .engine.resources import check_resources
from .errors import OptionError, WeightWeavingError
from .methods import Hyperparameters, Method, Scope, UnitContext, get_method

log = logging.getLogger("weightweaving")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, option: str = "--dtype") -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise OptionError(f"{option} '{value}' is not one of: {', '.join(sorted(DTYPES))}") from None


@dataclasses.dataclass
class Job:
    """Opened checkpoints plus a plan and a runner: what merge and weave share."""

    base: Checkpoint
    models: list[Checkpoint]
    runner: Runner
    sources: list[str]

    def close(self) -> None:
        for ckpt in [self.base, *self.models]:
            ckpt.close()


def open_job(
    pretrained: Source,
    finetuned: Sequence[Source],
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    compute_dtype: str | torch.dtype | None,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    seed: int,
    common_only: bool,
    allow_nonfinite: bool,
    executor: Executor | str | None,
    workers: int,
    progress: bool | None,
    extras: dict[str, Any] | None = None,
    vocab: str = "error",
    ray_address: str | None = None,
) -> Job:
    if isinstance(finetuned, (str, os.PathLike, Mapping)):
        raise OptionError("'finetuned' must be a list of checkpoints, one per fine-tuned model")
    chosen_executor = make_executor(executor, workers, ray_address)  # an unknown one fails first
    base = open_checkpoint(pretrained, label="pretrained")
    models, fit_notes = [], []
    for i, src in enumerate(finetuned):
        model = align_keys(base, open_checkpoint(src, label=f"finetuned[{i}]", base=base))
        model, notes = fit_to_base(base, model, vocab=vocab)
        models.append(model)
        fit_notes += notes
    plan = make_plan(
        base,
        models,
        include=include,
        exclude=exclude,
        out_dtype=parse_dtype(dtype),
        common_only=common_only,
    )
    for note in fit_notes:
        log.warning(note)
    plan.notes[:0] = fit_notes
    cdtype = parse_dtype(compute_dtype, "--compute-dtype") or torch.float32
    if not cdtype.is_floating_point or cdtype in (torch.float16, torch.bfloat16):
        raise OptionError("--compute-dtype must be float32 or float64")
    runner = Runner(
        plan,
        base,
        models,
        device=device,
        compute_dtype=cdtype,
        seed=seed,
        allow_nonfinite=allow_nonfinite,
        executor=chosen_executor,
        progress=progress,
        extras=extras,
    )
    sources = [c.label() for c in [base, *models]]
    return Job(base=base, models=models, runner=runner, sources=sources)


def method_stats(
    method: Method, p: Hyperparameters, runner: Runner, deliver: Callable[[Any], None] | None = None
) -> Any:
    """Run a global-scope method's first passes (nothing for local scopes).

    A method that declares :meth:`~Method.stages` runs them on the runner; with ``deliver``, a
    final fused stage is left to the merge pass, which hands its result to ``deliver`` (the value
    returned is then the statistics found so far). Otherwise ``global_stats`` scans.
    """
    if method.scope_of(p) is not Scope.GLOBAL:
        return None
    stages = method.stages(p)
    if stages:
        return runner.run_stages(stages, deliver)
    return method.global_stats(runner.scan, p, runner.seed)


def with_stats(ctx: UnitContext, stats: Any) -> UnitContext:
    return dataclasses.replace(ctx, stats=stats)


def parse_size(value: str | int | None) -> int | None:
    """``'5GB'``, ``'500MB'``, ``'2GiB'`` or a number of bytes."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    suffix = next((u for u in units if text.endswith(u)), "")
    number, factor = text[: len(text) - len(suffix)], units.get(suffix, 1)
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise OptionError(f"--shard-size '{value}' is not a size such as 2GB or 500MB") from None
    if size <= 0:
        raise OptionError(f"--shard-size '{value}' must be positive")
    return size


def check_output(out: str | os.PathLike[str], sources: Sequence[Source], overwrite: bool) -> Path:
    out_path = Path(out)
    resolved = _resolve(out_path)
    if resolved is None:
        raise WeightWeavingError(
            "cannot resolve the output path: Too many levels of symbolic links", path=out_path
        )
    for src in sources:
        if isinstance(src, (str, os.PathLike)):
            src_path = _resolve(Path(src))
            if src_path is None:
                continue  # a link loop: opening it reports that, by name
            if src_path == resolved or resolved in src_path.parents:
                raise WeightWeavingError(
                    "the output folder is one of the inputs; choose another --out", path=out_path
                )
    if out_path.exists() and not overwrite:
        raise WeightWeavingError("the output folder exists; pass --overwrite to replace it", path=out_path)
    ancestor = resolved.parent  # fail before any reading if the output cannot be created there
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise WeightWeavingError(
            f"cannot create the output folder: '{ancestor}' is a file, not a folder", path=out_path
        )
    if not os.access(ancestor, os.W_OK):
        raise WeightWeavingError(
            f"cannot create the output folder: '{ancestor}' is not writable", path=out_path
        )
    return out_path


def _resolve(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a symlink loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def versions() -> dict[str, str]:
    from . import __version__

    return {
        "weightweaving": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def deliver(
    job: Job,
    results: Iterator[tuple[str, tuple[int, int] | None, Tensor]],
    *,
    out: str | os.PathLike[str] | None,
    overwrite: bool,
    shard_size: str | int | None,
    record: dict[str, Any],
    direct: Callable[[SafetensorsWriter], None] | None = None,
) -> dict[str, Tensor] | Path:
    """Stream results into a new output folder (atomically), or collect them as a state dict.

    ``direct(writer)``, when given, fills the writer's files itself instead of ``results`` (the
    Ray executor: its workers write their tensors into the laid-out files)."""
    if out is None:
        collected = dict(job.runner.assemble(results))  # deferred units come last: plan order again
        return {u.name: collected[u.name] for u in job.runner.plan.units}
    entries = [OutputEntry(u.name, u.shape, u.out_dtype) for u in job.runner.plan.units]
    with SafetensorsWriter(
        out, entries, max_shard_bytes=parse_size(shard_size), overwrite=overwrite
    ) as writer:
        if direct is not None:
            direct(writer)
        for name, rows, tensor in results:
            if rows is None:
                writer.write(name, tensor)
            else:
                writer.write_rows(name, rows[0], tensor)
        for ckpt in [job.base, *job.models]:  # an input replaced while we read it: stop, keep nothing
            ckpt.verify_unchanged()
        for extra in job.base.extra_files:
            writer.copy_file(extra)
        library = "transformers" if read_config(job.base) is not None else None
        write_provenance(writer, job, record, library_name=library)
        return writer.commit()


def base_name(job: Job) -> str:
    """The base as a user names it: its folder when it is a model folder's weights file."""
    path = job.base.path
    if path is not None and path.name in WEIGHT_FILES:
        return str(path.parent)
    return job.sources[0]


def write_provenance(
    writer: SafetensorsWriter, job: Job, record: dict[str, Any], *, library_name: str | None
) -> None:
    """Add ``weightweaving_config.yaml`` and the model card (``README.md``) to an output."""
    record = {
        **record,
        "versions": versions(),
        "notes": job.runner.plan.notes,
        "left_out": job.runner.plan.left_out,
    }
    config_text = yaml.safe_dump(record, sort_keys=False, allow_unicode=True)
    writer.add_file("weightweaving_config.yaml", config_text.encode())
    card = model_card(
        record, config_text, base_model=base_name(job), library_name=library_name, title=writer.out_dir.name
    )
    writer.add_file("README.md", card.encode())


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    parsed = parse_dtype(dtype)
    return None if parsed is None else str(parsed).removeprefix("torch.")


def _absolute(source: Source, label: str) -> str:
    """The path the user gave, made absolute (a state dict is named by its label)."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).resolve())
    return label


def provenance(
    job: Job,
    record: dict[str, Any],
    inputs: Sequence[Source],
    *,
    out: str | os.PathLike[str] | None,
    shard_size: str | int | None,
    engine: dict[str, Any],
) -> dict[str, Any]:
    """What produced an output, as the options of ``weightweaving merge`` with every default
    resolved: ``weightweaving merge <out>/weightweaving_config.yaml`` reruns it to the same bytes.
    ``operation``, ``versions``, ``notes`` and ``left_out`` are for the record only."""
    operation = {"operation": record.pop("operation")}
    return {
        **operation,
        "base": _absolute(inputs[0], job.sources[0]),
        "models": [_absolute(src, label) for src, label in zip(inputs[1:], job.sources[1:], strict=True)],
        **record,
        "out": str(Path(out).resolve()) if out is not None else None,
        "device": str(job.runner.device),
        "dtype": dtype_name(engine.get("dtype")),
        "compute_dtype": dtype_name(job.runner.compute_dtype),
        "shard_size": shard_size,
        "include": list(engine.get("include") or []),
        "exclude": list(engine.get("exclude") or []),
        "seed": engine.get("seed", 0),
        "common_only": bool(engine.get("common_only")),
        "allow_nonfinite": bool(engine.get("allow_nonfinite")),
        "workers": engine.get("workers", 1),
    }


def run_job(
    pretrained: Source,
    finetuned: Sequence[Source],
    prepare: Callable[[Runner], Callable[[Tensor, UnitContext], Tensor]],
    record: dict[str, Any],
    *,
    out: str | os.PathLike[str] | None,
    overwrite: bool,
    shard_size: str | int | None,
    desc: str = "merging",
    out_lora: int | None = None,
    resource_check: bool = True,
    row_chunks: bool = False,
    entrywise: bool | None = None,
    **engine: Any,
) -> dict[str, Tensor] | Path:
    """Open the checkpoints, let ``prepare`` run its first passes and return the per-unit function,
    then stream every unit to the output (what ``merge`` and ``weave`` share). ``entrywise``: the
    method works entry by entry, so it runs with one intra-op thread on a busy CPU
    (:func:`~weightweaving.engine.execute.entrywise_threads`); by default, when ``row_chunks``."""
    if out_lora is not None:
        if out is None:
            raise OptionError("--out-lora needs an output folder (--out)")
        if isinstance(out_lora, bool) or not isinstance(out_lora, int) or out_lora < 1:
            raise OptionError(f"--out-lora {out_lora} must be a rank >= 1")
        if shard_size is not None:
            raise OptionError("--out-lora writes one adapter file; --shard-size does not apply")
    if out is not None:
        check_output(out, [pretrained, *finetuned], overwrite)
    clip_rule = _clip_default(pretrained, engine)
    if clip_rule:
        engine = {**engine, "include": clip_rule}
    # a second run writing the same output stops now, not at the end (the writer holds it on)
    with output_lock(output_path(out)) if out is not None else contextlib.nullcontext():
        job = open_job(pretrained, finetuned, **engine)
        try:
            # entry-by-entry methods (by default those merged in chunks of rows) are bound by memory
            entrywise_now = row_chunks if entrywise is None else entrywise
            with entrywise_threads(job.runner.device, entrywise_now):
                runner = job.runner
                if resource_check:
                    workers = getattr(runner.executor, "workers", 1)
                    chunk = runner.chunk_bytes if row_chunks else None  # the method merges chunks of rows
                    check_resources(
                        runner.plan, len(job.models), runner.compute_dtype, workers, out, runner.device, chunk
                    )
                unit_fn = prepare(runner)
                if clip_rule:
                    record = {**record, "clip": _clip_provenance(runner.plan)}
                inputs = [pretrained, *finetuned]
                record = provenance(job, record, inputs, out=out, shard_size=shard_size, engine=engine)
                record["vocab"] = engine.get("vocab", "error")
                record["out_lora"] = out_lora
                if out_lora is not None:
                    from .lora_out import deliver_lora

                    assert out is not None
                    return deliver_lora(
                        job, unit_fn, rank=out_lora, out=out, overwrite=overwrite, record=record, desc=desc
                    )
                write_merge = getattr(runner.executor, "write_merge", None)
                if write_merge is not None and out is not None:  # workers write the output themselves
                    return deliver(
                        job,
                        iter(()),
                        out=out,
                        overwrite=overwrite,
                        shard_size=shard_size,
                        record=record,
                        direct=lambda writer: write_merge(runner, unit_fn, writer, desc),
                    )
                stream = runner.run_pieces(unit_fn, desc=desc)
                return deliver(
                    job, stream, out=out, overwrite=overwrite, shard_size=shard_size, record=record
                )
        finally:
            job.close()


def _clip_default(pretrained: Source, engine: dict[str, Any]) -> list[str] | None:
    """A CLIPModel base merges its image encoder only unless --include/--exclude say otherwise."""
    if engine.get("include") or engine.get("exclude"):
        return None
    from .models.clip import default_include  # reads config.json only; no transformers import

    rule = default_include(pretrained)
    if rule:
        log.info("CLIP base: merging the image encoder only (%s); the text side is kept from the base", rule)
    return rule


def _clip_provenance(plan: Any) -> dict[str, Any]:
    kept = [u.name for u in plan.units if not u.merge]
    log.info("CLIP: %d parameters merged, %d kept from the base", len(plan.units) - len(kept), len(kept))
    return {
        "merged": "the image encoder (vision_model.*, visual_projection.*); pass --include to choose",
        "merged_count": len(plan.units) - len(kept),
        "kept_from_base": kept,
    }


def apply_estimators(
    runner: Runner, method: Method, p: Hyperparameters, rule: str | None, record: dict[str, Any]
) -> Hyperparameters:
    """``--lambda auto:<rule>`` for a method with per-task ``weights``: estimate them (one scan)."""
    if rule is None:
        return p
    from .weaving.estimators import estimate

    weights = estimate(rule, runner.scan)
    record["estimated_weights"] = {"rule": rule, "weights": weights}
    return method.parse_params({**p.model_dump(), "weights": weights})


def scale_task_vectors(runner: Runner, spec: str | Sequence[float] | None, record: dict[str, Any]) -> None:
    """The generic ``task_weights`` option: Δ_t ← w_t·Δ_t for every later pass of the runner."""
    from .weaving.estimators import resolve_task_weights

    scales = resolve_task_weights(spec, runner.scan, len(runner.models))
    if scales is not None:
        runner.task_scales = scales
        record["task_weights"] = {
            "given": spec if isinstance(spec, str) else list(spec or []),
            "scales": scales,
        }


def check_lam(chosen: Any, number: float | None) -> None:
    """A λ ``chosen`` accepts: finite and within the method's range (one-line errors)."""
    if number is not None and not math.isfinite(number):
        raise OptionError(f"--lambda {number} is not a finite number")
    chosen.check_lam(number)


def merge(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str = "task_arithmetic",
    lam: float | str | None = None,
    *,
    task_weights: str | Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    shard_size: str | int | None = None,
    overwrite: bool = False,
    common_only: bool = False,
    allow_nonfinite: bool = False,
    workers: int = 1,
    executor: Executor | str | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
    extras: dict[str, Any] | None = None,
    vocab: str = "error",
    out_lora: int | None = None,
    resource_check: bool = True,
    **hyperparameters: Any,
) -> dict[str, Tensor] | Path:
    """Merge fine-tuned models into their pre-trained base with one method at one λ.

    Args:
        pretrained: the pre-trained checkpoint: a path (file or folder) or a state dict.
        finetuned: the fine-tuned checkpoints, paths or state dicts, all of the base's architecture.
        method: a registered method name (``weightweaving.list_methods()``).
        lam: the scaling factor λ; ``None`` takes the method's data-free default. ``"auto:metagpt"``
            or ``"auto:nan"`` estimates per-task coefficients from the task vectors' norms
            (``weightweaving.weaving.estimators``): methods with per-task ``weights`` (Task
            Arithmetic, weight averaging) take them as those weights at λ = 1 (Task Arithmetic then
            gives exactly MetaGPT's ``Σ_t λ_t τ_t``); every other method takes them as
            ``task_weights`` at its default λ.
        task_weights: scale each Δ_t before the method: a list of numbers, or ``"auto:<rule>"``
            (the rule's weights times T, so their mean is 1).
        out: write a Hugging Face-style folder there instead of returning a state dict.
        device: ``"cpu"`` or ``"cuda"``; dtype: output dtype (default: the base's, per tensor).
        compute_dtype: ``float32`` (default) or ``float64``.
        include, exclude: regular expressions choosing which parameters are merged (others are copied).
        seed: seeds every random draw (DARE masks); the same seed gives the same bytes.
        shard_size: largest shard of the output (``"2GB"``); default one file.
        vocab: ``"error"`` (default) refuses fine-tunes with more vocabulary rows than the base;
            ``"base"`` merges the rows all models share and keeps the base's size.
        out_lora: write a PEFT LoRA adapter of this rank (truncated SVD of each merged update)
            instead of a full model; needs ``out``.
        resource_check: refuse up front a merge whose output or peak memory cannot fit (default).
        executor: ``"local"`` (default: ``workers`` threads here), ``"ray"`` (a Ray cluster; workers
            read the inputs and write the output on a path every node sees) or an Executor.
        ray_address: the Ray cluster to join (default: ``RAY_ADDRESS``, else a new local one).
        **hyperparameters: the method's hyperparameters by their canonical names.

    Returns:
        The merged state dict, or the output folder's path when ``out`` is given.

    Example:
        >>> import torch, weightweaving
        >>> base = {"w": torch.zeros(2)}
        >>> merged = weightweaving.merge(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}],
        ...                              method="task_arithmetic", lam=0.5)
        >>> merged["w"]
        tensor([0.5000, 1.0000])
    """
    from .weaving.estimators import parse_auto

    chosen = get_method(method)
    p = chosen.parse_params(hyperparameters)
    rule = parse_auto(lam)
    if isinstance(lam, str) and rule is None:
        raise OptionError(f"--lambda '{lam}' is neither a number nor auto:<rule>")
    takes_weights = rule is not None and "weights" in chosen.params.model_fields
    if takes_weights and hyperparameters.get("weights") is not None:
        raise OptionError(f"--lambda {lam} estimates the 'weights' of '{method}'; do not give them too")
    if rule is not None and not takes_weights and task_weights is not None:
        raise OptionError(f"--lambda {lam} sets the task weights of '{method}'; do not give task_weights too")
    number = chosen.default_lam if lam is None or rule is not None else float(lam)
    check_lam(chosen, number)
    if not isinstance(finetuned, (str, os.PathLike, Mapping)):
        chosen.check_num_models(len(finetuned))
    record: dict[str, Any] = {
        "operation": "merge",
        "method": method,
        "lambda": lam if rule is not None else number,
        "hyperparameters": p.model_dump(mode="json"),
    }

    def prepare(runner: Runner) -> Callable[[Tensor, UnitContext], Tensor]:
        params = apply_estimators(runner, chosen, p, rule if takes_weights else None, record)
        weights_spec = f"auto:{rule}" if rule is not None and not takes_weights else task_weights
        scale_task_vectors(runner, weights_spec, record)
        found: dict[str, Any] = {}
        runner.row_chunks = chosen.row_chunks(params)
        runner.check_merged = chosen.propagates_nonfinite(params)
        found["stats"] = method_stats(chosen, params, runner, deliver=lambda s: found.update(stats=s))
        return lambda tv, ctx: chosen.merge_unit(tv, params, number, with_stats(ctx, found["stats"]))

    return run_job(
        pretrained,
        finetuned,
        prepare,
        record,
        out=out,
        overwrite=overwrite,
        shard_size=shard_size,
        resource_check=resource_check,
        row_chunks=chosen.row_chunks(p) and out_lora is None,
        entrywise=chosen.one_thread(p) and out_lora is None,
        device=device,
        dtype=dtype,
        compute_dtype=compute_dtype,
        include=include,
        exclude=exclude,
        seed=seed,
        common_only=common_only,
        allow_nonfinite=allow_nonfinite,
        executor=executor,
        ray_address=ray_address,
        workers=workers,
        progress=progress,
        extras=extras,
        vocab=vocab,
        out_lora=out_lora,
    )
