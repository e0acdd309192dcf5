"""``merge_with_data``: the methods that use data, from the Python API.

* ``exemplar_projection`` (CAT Merging): a few unlabeled exemplars per task; their statistics are
  gathered with hooks, then the registered per-unit method runs through the streaming engine.
* ``adamerging`` (layer-wise) and ``cart_adamerging`` (CART++): unlabeled test inputs per task and a
  classifier head per task; coefficients are learned, then written through the same engine.

The output's ``weightweaving_config.yaml`` records which data were used: per task the folder (or
``<tensor>``), how many inputs it had and how many were used, and the SHA-256 of every file used
(of the tensor's bytes for in-memory inputs). Learned coefficients are recorded too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api import check_output, run_job
from ..checkpoints import open_checkpoint
from ..checkpoints.open import Source
from ..engine import Runner
from ..errors import OptionError, WeightWeavingError
from ..methods import UnitContext, get_method
from ..methods.cart import REFERENCE_SVD_INCLUDE
from ..methods.exemplar_projection import STATISTICS
from .adamerging import Head, Inputs, cart_directions, learn_coefficients, task_vector_directions
from .features import Forward, default_forward, gather_statistics, hookable_parameters
from .images import read_image_folder, tensor_inputs

METHODS_WITH_DATA = ("exemplar_projection", "adamerging", "cart_adamerging")
DEFAULT_EXEMPLARS = 5  # CAT: exemplars per task when not given (all of them when a task has fewer)
DataSource = Tensor | str | os.PathLike[str]


def load_inputs(
    data: Sequence[DataSource] | Mapping[str, DataSource],
    tasks: int,
    *,
    limit: int | None,
    seed: int,
    shape: tuple[int, ...] | None,
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """One input tensor per task (folders read, ``limit`` drawn per task) and what was read."""
    items = list(data.items()) if isinstance(data, Mapping) else [(f"task{i}", d) for i, d in enumerate(data)]
    if len(items) != tasks:
        raise WeightWeavingError(f"{len(items)} data sets given for {tasks} fine-tuned models (one per task)")
    inputs, records = [], []
    for name, source in items:
        if isinstance(source, Tensor):
            x, record = tensor_inputs(source, task=name, limit=limit, seed=seed, shape=shape)
        else:
            x, record = read_image_folder(source, task=name, limit=limit, seed=seed, shape=shape)
        inputs.append(x)
        records.append(record)
    return inputs, records


def weaver_for(
    method: str, options: Mapping[str, Any], fixed: Mapping[str, Any]
) -> tuple[Callable[[Runner], Any], dict[str, Any]]:
    """Weight Weaving's per-unit function for a method whose statistics arrive in ``extras``."""
    from ..weaving.pools import make_pool
    from ..weaving.search import build_groups, parse_lambdas
    from ..weaving.weave import Weaver

    known = {"lambdas", "setup", "search", "points", "pool", "pool_over", "pool_hyperparameters"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError(f"weave option '{unknown[0]}' is not one of: {', '.join(sorted(known))}")
    groups = build_groups(
        get_method(method),
        lambdas=parse_lambdas(options.get("lambdas")),
        setup=options.get("setup", "multitask"),
        fixed=dict(fixed),
        search=options.get("search"),
        points=options.get("points"),
    )
    pool = options.get("pool", "mean")
    weaver = Weaver(
        method, groups, make_pool(pool, options.get("pool_hyperparameters")), options.get("pool_over", "all")
    )

    def prepare(runner: Runner) -> Any:
        weaver.prepare(runner)
        return weaver

    space = [{"hyperparameters": g.hyperparameters, "lambdas": list(g.lams)} for g in groups]
    return prepare, {"search_space": space, "pool": pool, "pool_over": options.get("pool_over", "all")}


def read_state(source: Source, label: str) -> dict[str, Tensor]:
    ckpt = open_checkpoint(source, label=label)
    try:
        return {name: ckpt.get(name) for name in ckpt.keys()}
    finally:
        ckpt.close()


def merge_with_data(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str,
    *,
    model: nn.Module | Callable[[], nn.Module],
    data: Sequence[DataSource] | Mapping[str, DataSource],
    heads: Sequence[Head] | None = None,
    lam: float | None = None,
    inputs_per_task: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    prefix: str = "",
    forward: Forward = default_forward,
    batch_size: int | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    weave: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    **hyperparameters: Any,
) -> dict[str, Tensor] | Path:
    """Merge with a method that uses data: ``exemplar_projection``, ``adamerging`` or ``cart_adamerging``.

    Args:
        pretrained, finetuned: checkpoints (paths or state dicts), as for :func:`weightweaving.merge`.
        method: one of ``exemplar_projection`` (CAT Merging), ``adamerging``, ``cart_adamerging``.
        model: the architecture (a module or a factory); its state dict keys, after ``prefix``, are the
            checkpoints' keys. Its own weights are never used.
        data: per task (in the fine-tuned models' order, or a mapping task name -> source): an image
            folder or a tensor of inputs (N, ...). CAT: exemplars; AdaMerging/CART++: test inputs.
        heads: AdaMerging/CART++: one callable per task mapping the model's output to logits.
        lam: CAT's λ (default 1.0). inputs_per_task: how many inputs to draw per task (default all;
            CAT: 5, or all when fewer). input_shape: the expected (C, H, W) of every input.
        seed: draws the inputs and orders the batches; the same seed gives the same bytes.
        steps, lr: AdaMerging/CART++ training (500 steps, Adam lr 1e-3).
        weave: CAT only: Weight Weaving over its λ (and ``c``/``alpha`` with ``search``) instead of one
            merge, e.g. ``{"lambdas": "0.1:1.0", "search": {"c": [1, 3, 5]}, "pool": "mean"}``; keys as
            :func:`weightweaving.weave`'s ``lambdas``, ``setup``, ``search``, ``points``, ``pool``,
            ``pool_over``, ``pool_hyperparameters``.
        **hyperparameters: CAT: ``c``, ``alpha``; AdaMerging: ``init`` (0.3); CART++: ``init`` (1.0),
            ``low`` (0.0: the least a coefficient may become; the suite keeps it at CART's λ = 1),
            ``rank_fraction`` (0.08), ``svd_include``.

    Returns:
        The merged state dict, or the output folder when ``out`` is given.
    """
    if method not in METHODS_WITH_DATA:
        raise OptionError(f"unknown method with data '{method}'; valid: {', '.join(METHODS_WITH_DATA)}")
    if out is not None:
        check_output(out, [pretrained, *finetuned], overwrite)
    module = model if isinstance(model, nn.Module) else model()
    hookable_parameters(module, prefix)  # no hookable layer: one error before any reading
    if inputs_per_task is not None and inputs_per_task < 1:
        raise OptionError(f"--exemplars-per-task must be at least 1 (got {inputs_per_task})")
    limit = (
        -DEFAULT_EXEMPLARS if method == "exemplar_projection" and inputs_per_task is None else inputs_per_task
    )
    inputs, records = load_inputs(data, len(finetuned), limit=limit, seed=seed, shape=input_shape)
    return merge_loaded(
        pretrained, finetuned, method, model=module, inputs=inputs, records=records, heads=heads, lam=lam,
        out=out, overwrite=overwrite, seed=seed, device=device, prefix=prefix, forward=forward,
        batch_size=batch_size, steps=steps, lr=lr, weave=weave, progress=progress, **hyperparameters,
    )  # fmt: skip


def merge_loaded(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str,
    *,
    model: nn.Module,
    inputs: Sequence[Inputs],
    records: list[dict[str, Any]],
    heads: Sequence[Head] | None = None,
    lam: float | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    prefix: str = "",
    forward: Forward = default_forward,
    batch_size: int | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    weave: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    provenance: Mapping[str, Any] | None = None,
    **hyperparameters: Any,
) -> dict[str, Tensor] | Path:
    """:func:`merge_with_data` once the inputs are read: ``inputs[t]`` (indexable by a tensor of
    indices) and ``records[t]`` (what was read, for the provenance; ``provenance`` adds keys to it)."""
    if method not in METHODS_WITH_DATA:
        raise OptionError(f"unknown method with data '{method}'; valid: {', '.join(METHODS_WITH_DATA)}")
    module = model
    base = read_state(pretrained, "pretrained")
    tuned = [read_state(src, f"finetuned[{i}]") for i, src in enumerate(finetuned)]
    record: dict[str, Any] = {
        "operation": "merge_with_data",
        "method": method,
        "uses_data": True,
        **(provenance or {}),
        "data": records,
    }
    engine: dict[str, Any] = {"device": device, "seed": seed, "progress": progress}
    if method == "exemplar_projection":
        chosen = get_method(method)
        p = chosen.parse_params(hyperparameters)
        lam = chosen.default_lam if lam is None else lam
        if lam is None or not math.isfinite(lam):
            raise OptionError(f"--lambda {lam} is not a finite number")
        if not all(isinstance(x, Tensor) for x in inputs):
            raise OptionError("method 'exemplar_projection' takes its exemplars as tensors")
        stats = gather_statistics(
            module,
            base,
            tuned,
            [x for x in inputs if isinstance(x, Tensor)],
            device=device,
            batch_size=batch_size or 32,
            prefix=prefix,
            forward=forward,
        )
        record |= {"hyperparameters": p.model_dump(mode="json"), "not_hooked": stats.skipped}
        prepare_cat: Callable[[Runner], Any]
        if weave is not None:
            prepare_cat, woven = weaver_for(method, weave, hyperparameters)
            record |= {"weave": woven}
        else:
            record |= {"lambda": lam}

            def prepare_cat(runner: Runner) -> Callable[[Tensor, UnitContext], Tensor]:
                return lambda tv, ctx: chosen.merge_unit(tv, p, lam, ctx)

        return run_job(
            pretrained, finetuned, prepare_cat, record, out=out, overwrite=overwrite, shard_size=None,
            dtype=None, compute_dtype=None, include=None, exclude=None, common_only=False,
            allow_nonfinite=False, executor=None, workers=1, extras={STATISTICS: stats}, **engine,
        )  # fmt: skip
    if heads is None:
        raise OptionError(f"method '{method}' needs a classifier head per task (heads=)")
    options = dict(hyperparameters)
    if method == "adamerging":
        init = float(options.pop("init", 0.3))
        offset, directions = task_vector_directions(base, tuned)
        bounds = (0.0, 1.0)
    else:
        init = float(options.pop("init", 1.0))
        rank = float(options.pop("rank_fraction", 0.08))
        if not 0.0 < rank <= 1.0:
            raise OptionError(f"method '{method}': rank_fraction={rank} must be in (0, 1]")
        include = str(options.pop("svd_include", REFERENCE_SVD_INCLUDE))
        low = float(options.pop("low", 0.0))
        if not 0.0 <= low <= init <= 2.0:
            raise OptionError(f"method '{method}': needs 0 <= low <= init <= 2 (got low={low}, init={init})")
        offset, directions = cart_directions(base, tuned, rank_fraction=rank, svd_include=include)
        bounds = (low, 2.0)
    if options:
        raise OptionError(f"method '{method}' has no hyperparameter '{sorted(options)[0]}'")
    learned = learn_coefficients(
        module, offset, directions, inputs, heads, steps=steps, lr=lr, init=init, bounds=bounds,
        batch_size=batch_size or 16, seed=seed, device=device, prefix=prefix, forward=forward, progress=progress,
    )  # fmt: skip
    record |= {
        "steps": steps,
        "lr": lr,
        "init": init,
        "bounds": list(bounds),
        "coefficients": learned.coefficients,
    }
    merged_vectors = {
        k: learned.state_dict[k].float() - v.float() for k, v in base.items() if v.is_floating_point()
    }

    def prepare_learned(runner: Runner) -> Callable[[Tensor, UnitContext], Tensor]:
        return lambda tv, ctx: merged_vectors[ctx.name].to(tv.device, tv.dtype)

    return run_job(
        pretrained, finetuned, prepare_learned, record, out=out, overwrite=overwrite, shard_size=None,
        dtype=None, compute_dtype=None, include=None, exclude=None, common_only=False,
        allow_nonfinite=False, executor=None, workers=1, **engine,
    )  # fmt: skip
