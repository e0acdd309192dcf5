"""The YAML schema of ``weightweaving merge CONFIG.yaml``, validated into the arguments of the API.

Example::

    base: models/pretrained
    models: [models/ft_a, models/ft_b]
    method: ties
    lambda: 1.0
    hyperparameters: {k: 0.2}
    out: merged/
    weave:                  # optional: Weight Weaving instead of one λ
      lambdas: "0.1:1.5:0.1"
      pool: mean
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import OptionError, WeightWeavingError
from .files import read_small_file

MAX_CONFIG = 16 * 1024 * 1024


class WeaveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lambdas: str | float | list[float] | None = Field(
        None, description="λ search space: start:stop:step, a,b,c or a list (default: the paper's range)"
    )
    pool: str = Field("mean", description="mean, random, magmax or a method name")
    pool_over: Literal["all", "merged"] = Field(
        "all", description="all = task vectors plus merged; merged = merged only"
    )
    setup: Literal["multitask", "continual", "domain"] = Field(
        "multitask", description="which paper range to default to"
    )
    search: dict[str, list[Any]] | None = Field(
        None, description="grid over other hyperparameters, e.g. {k: [0.1, 0.2]}"
    )
    points: list[dict[str, Any]] | None = Field(
        None, description="explicit hyperparameter sets instead of a grid"
    )
    pool_hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="for a method used as the pool"
    )


class MergeOptions(BaseModel):
    """Everything one merge or weave needs; the CLI flags and YAML keys map onto these fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    base: str = Field(description="pre-trained checkpoint (file or folder)")
    models: list[str] = Field(min_length=1, description="fine-tuned checkpoints")
    method: str = Field("task_arithmetic", description="merge method (see `weightweaving methods`)")
    lam: float | str | None = Field(
        None,
        alias="lambda",
        description="λ (default: the method's data-free default), or auto:metagpt / auto:nan: per-task "
        "coefficients from the task vectors' norms",
    )
    task_weights: str | list[float] | None = Field(
        None, description="scale each task vector first: a list, or auto:metagpt / auto:nan (mean 1)"
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="the method's hyperparameters")
    out: str = Field(description="output folder")
    device: str = Field("cpu", description="cpu or cuda")
    dtype: str | None = Field(None, description="output dtype (default: the base's)")
    compute_dtype: str | None = Field(None, description="float32 (default) or float64")
    shard_size: str | int | None = Field(
        None, description="largest output shard, e.g. 2GB (default: one file)"
    )
    include: list[str] = Field(
        default_factory=list, description="regexes of parameters to merge (default: all)"
    )
    exclude: list[str] = Field(
        default_factory=list, description="regexes of parameters to copy from the base"
    )
    seed: int = Field(0, description="seed of every random draw")
    overwrite: bool = Field(False, description="replace an existing output folder")
    common_only: bool = Field(False, description="merge only the parameters every checkpoint has")
    allow_nonfinite: bool = Field(False, description="merge even if a checkpoint holds NaN or Inf")
    workers: int = Field(1, ge=1, description="threads (overlap reading with computing)")
    resource_check: bool = Field(
        True, description="refuse up front a merge whose output or peak memory cannot fit"
    )
    weave: WeaveOptions | None = Field(None, description="Weight Weaving options (omit for a plain merge)")
    vocab: Literal["error", "base"] = Field(
        "error",
        description="fine-tunes with added tokens: error, or base = merge the rows all models share",
    )
    out_lora: int | None = Field(
        None, ge=1, description="write a LoRA adapter of this rank (truncated SVD) instead of a full model"
    )


def describe_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "?"
    if first.get("type") == "extra_forbidden":
        return f"{source}: unknown option '{loc}'"
    if first.get("type") == "missing":
        return f"{source}: option '{loc}' is required"
    return f"{source}: option '{loc}': {first.get('msg', 'invalid')} (got {first.get('input')!r})"


def reserved_names() -> set[str]:
    """Arguments of ``merge`` and ``weave`` themselves: a hyperparameter of that name would collide."""
    import inspect

    from .api import merge
    from .weaving import weave

    names = set(inspect.signature(merge).parameters) | set(inspect.signature(weave).parameters)
    return (names - {"hyperparameters"}) | {"lambda"}


def option_flag(name: str) -> str:
    """The command-line flag of an option name."""
    return {"lam": "--lambda", "lambda": "--lambda", "pretrained": "--base", "finetuned": "--models"}.get(
        name, "--" + name.replace("_", "-")
    )


def validate(values: dict[str, Any], source: str) -> MergeOptions:
    try:
        options = MergeOptions.model_validate(values)
    except ValidationError as exc:
        raise OptionError(describe_error(exc, source)) from None
    reserved = reserved_names()
    for name in options.hyperparameters:
        if name in reserved:
            raise OptionError(
                f"{source}: hyperparameter '{name}' is an option of its own ({option_flag(name)}), not a hyperparameter"
            )
    return options


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config safely (``yaml.safe_load``: no tags that construct objects)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise WeightWeavingError("no such config file", path=path)
    try:  # a regular file of at most 16 MiB: never a FIFO, a device or /proc
        text = read_small_file(path, MAX_CONFIG).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightWeavingError(f"cannot read the config: {exc}", path=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise WeightWeavingError(f"not valid YAML{where}: {problem}", path=path) from None
    if data is None:
        raise WeightWeavingError("the config is empty", path=path)
    if not isinstance(data, dict):
        raise WeightWeavingError("the config must be a mapping of options", path=path)
    base_dir = path.parent
    for key in ("base", "out"):  # relative paths in a config are relative to the config file
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str(base_dir / data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [
            str(base_dir / m) if isinstance(m, str) and not Path(m).is_absolute() else m
            for m in data["models"]
        ]
    return data


def run_options(options: MergeOptions, *, progress: bool | None = None) -> Path:
    """Run a validated merge or weave and return the output folder."""
    from .api import merge
    from .weaving import weave

    common: dict[str, Any] = dict(
        out=options.out,
        device=options.device,
        dtype=options.dtype,
        compute_dtype=options.compute_dtype,
        include=options.include,
        exclude=options.exclude,
        seed=options.seed,
        shard_size=options.shard_size,
        overwrite=options.overwrite,
        common_only=options.common_only,
        allow_nonfinite=options.allow_nonfinite,
        workers=options.workers,
        resource_check=options.resource_check,
        progress=progress,
        vocab=options.vocab,
        out_lora=options.out_lora,
        task_weights=options.task_weights,
    )
    if options.weave is None:
        result = merge(
            options.base, options.models, options.method, options.lam, **common, **options.hyperparameters
        )
    else:
        w = options.weave
        if options.lam is not None:
            raise OptionError("--lambda and --weave exclude each other; give the search space with --lambdas")
        result = weave(
            options.base,
            options.models,
            options.method,
            w.lambdas,
            pool=w.pool,
            pool_over=w.pool_over,
            setup=w.setup,
            search=w.search,
            points=w.points,
            pool_hyperparameters=w.pool_hyperparameters,
            **common,
            **options.hyperparameters,
        )
    assert isinstance(result, Path)
    return result
