"""The one options model of ``weightweaving merge``: the YAML schema, the command-line flags and their
help, the Python API's keyword arguments and the error messages all come from :class:`MergeOptions`.

A new merge option is one new field here (plus the keyword of the same name in ``api.merge``); its
flag is ``--<name-with-dashes>`` unless the field's ``flag`` says otherwise. Example config::

    base: models/pretrained
    models: [models/ft_a, models/ft_b]
    method: ties
    lambda: 1.0
    hyperparameters: {k: 0.2}
    out: merged/
    weave:                  # optional: Weight Weaving instead of one λ
      lambdas: "0.1:1.5:0.1"
      pool: mean

A mergekit config (it has ``merge_method``) is read unchanged and translated into these options
(:mod:`weightweaving.mergekit_config`).
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from .errors import OptionError, WeightWeavingError, did_you_mean
from .files import read_small_file

MAX_CONFIG = 16 * 1024 * 1024

# keys that an output's weightweaving_config.yaml holds for the record only; ignored when read back
RECORD_ONLY = ("operation", "versions", "notes", "left_out", "clip")


def _flag(
    flag: str | None = None, *, metavar: str | None = None, kind: str | None = None, api: str | None = None
) -> dict[str, Any]:
    """Field metadata: the flag's name and metavar, how repeated values build it, the API keyword."""
    extra = {"flag": flag, "metavar": metavar, "kind": kind, "api": api}
    return {k: v for k, v in extra.items() if v is not None}


class WeaveOptions(BaseModel):
    """Weight Weaving: pool the merges of a search space instead of merging at one λ."""

    model_config = ConfigDict(extra="forbid")

    lambdas: str | float | list[float] | None = Field(
        None,
        description="λ search space: start:stop:step, a,b,c or a list (default: the paper's range)",
        json_schema_extra=_flag(metavar="SPEC"),
    )
    pool: str = Field(
        "mean",
        description="mean, random, magmax, trimmed_mean, median, agreement, fitted_lambda, calibrated, nearest_mean, norm_filtered, spectral_filtered, spectral_blended, or a method name",
    )
    pool_over: Literal["all", "merged"] = Field(
        "all", description="all = task vectors plus merged; merged = merged only"
    )
    setup: Literal["multitask", "continual", "domain"] = Field(
        "multitask", description="whose paper λ range to default to"
    )
    search: dict[str, list[Any]] | None = Field(
        None,
        description="search over another hyperparameter (repeatable: a grid)",
        json_schema_extra=_flag(metavar="NAME=v1,v2", kind="grid"),
    )
    points: list[dict[str, Any]] | None = Field(
        None,
        description="an explicit hyperparameter set instead of a grid, as YAML, e.g. '{k: 0.1, lam: [0.5, 1]}' (repeatable)",
        json_schema_extra=_flag("--point", metavar="YAML", kind="yaml"),
    )
    pool_hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="a hyperparameter of a method pool (repeatable)",
        json_schema_extra=_flag("--pool-set", metavar="NAME=VALUE", kind="assign"),
    )


class MergeOptions(BaseModel):
    """Everything one merge or weave needs; the CLI flags and YAML keys map onto these fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    base: str = Field(
        description="pre-trained checkpoint (file or folder)", json_schema_extra=_flag(api="pretrained")
    )
    models: list[str] = Field(
        min_length=1,
        description="fine-tuned checkpoints",
        json_schema_extra=_flag(metavar="PATH", api="finetuned"),
    )
    method: str = Field("task_arithmetic", description="merge method (see 'weightweaving methods')")
    lam: float | str | None = Field(
        None,
        alias="lambda",
        description="λ (default: the method's data-free default), or auto:metagpt / auto:nan: per-task "
        "coefficients from the task vectors' norms",
        json_schema_extra=_flag("--lambda", metavar="X", kind="lam"),
    )
    task_weights: str | list[float] | None = Field(
        None,
        description="scale each task vector first: numbers a,b,c, or auto:metagpt / auto:nan (mean 1)",
        json_schema_extra=_flag(metavar="SPEC", kind="weights"),
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="a hyperparameter of the method (repeatable)",
        json_schema_extra=_flag("--set", metavar="NAME=VALUE", kind="assign"),
    )
    out: str = Field(description="output folder")
    device: str = Field("cpu", description="cpu or cuda")
    dtype: str | None = Field(None, description="output dtype (default: the base's, per tensor)")
    compute_dtype: str | None = Field(None, description="float32 (the default) or float64")
    shard_size: str | int | None = Field(
        None, description="largest output shard, e.g. 2GB (default: one file)"
    )
    include: list[str] = Field(
        default_factory=list,
        description="regexes of parameters to merge (default: all)",
        json_schema_extra=_flag(metavar="REGEX"),
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="regexes of parameters to copy from the base",
        json_schema_extra=_flag(metavar="REGEX"),
    )
    seed: int = Field(0, description="seed of every random draw")
    overwrite: bool = Field(False, description="replace an existing output folder")
    common_only: bool = Field(False, description="merge only the parameters every checkpoint has")
    allow_nonfinite: bool = Field(False, description="merge even if a checkpoint holds NaN or Inf")
    workers: int = Field(1, ge=1, description="threads (overlap reading with computing)")
    executor: Literal["local", "ray"] = Field(
        "local",
        description="local (this machine) or ray (a Ray cluster: pip install 'weightweaving[ray]'; "
        "inputs and output on a path every node sees)",
    )
    ray_address: str | None = Field(
        None,
        description="the Ray cluster to join, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else a new local one)",
        json_schema_extra=_flag(metavar="ADDR"),
    )
    resource_check: bool = Field(
        True,
        description="refuse up front a merge whose output or peak memory cannot fit "
        "(--no-resource-check: do not)",
        json_schema_extra=_flag("--no-resource-check", kind="negate"),
    )
    weave: WeaveOptions | None = Field(
        None, description="pool merges over a search space instead of one λ (Weight Weaving)"
    )
    vocab: Literal["error", "base"] = Field(
        "error",
        description="fine-tunes with added tokens: error, or base = merge the rows all models share",
    )
    out_lora: int | None = Field(
        None,
        ge=1,
        description="write a LoRA adapter of this rank (truncated SVD) instead of a full model",
        json_schema_extra=_flag(metavar="RANK"),
    )
    # the methods that use data (CLIP folders; weightweaving.withdata.command): not merge()'s keywords
    exemplars: dict[str, str] = Field(
        default_factory=dict,
        description="uses data (exemplar_projection): a folder of unlabeled exemplar images per "
        "fine-tuned model, in --models order (repeatable)",
        json_schema_extra=_flag(metavar="TASK=DIR", kind="pairs"),
    )
    tta_data: dict[str, str] = Field(
        default_factory=dict,
        description="uses data (adamerging, cart_adamerging): unlabeled test images per fine-tuned "
        "model, read as 'evaluate' reads a task (its classes name the zero-shot head), in --models "
        "order (repeatable)",
        json_schema_extra=_flag(metavar="TASK=DATA", kind="pairs"),
    )
    exemplars_per_task: int | None = Field(
        None,
        ge=1,
        description="uses data: images drawn per task with --seed (default: 5 exemplars, or all when "
        "fewer; all test-time images)",
        json_schema_extra=_flag(metavar="N"),
    )


#: MergeOptions fields only the methods that use data read (``withdata.command``)
DATA_FIELDS = ("exemplars", "tta_data", "exemplars_per_task")


# -- what the fields say about themselves --------------------------------------------------------------


def field_extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def option_flag(name: str) -> str:
    """The command-line flag of an option (a field of MergeOptions or WeaveOptions, or its API name)."""
    for model in (MergeOptions, WeaveOptions):
        for field, info in model.model_fields.items():
            extra = field_extra(info)
            if name in (field, info.alias, extra.get("api")):
                return str(extra.get("flag") or "--" + field.replace("_", "-"))
    return "--" + name.replace("_", "-")


def api_name(field: str) -> str:
    """The keyword of ``merge``/``weave`` that a field of MergeOptions is passed as."""
    return str(field_extra(MergeOptions.model_fields[field]).get("api", field))


def default_text(info: FieldInfo) -> str:
    """What ``--help`` says about a field's default: the real one, 'required', or nothing."""
    if info.is_required():
        return " (required)"
    default = info.get_default(call_default_factory=True)
    if default is None or default is False or default == [] or default == {}:
        return ""  # switches are off; an absent value is described by the field's description
    return f" (default: {default})"


def plain_type(annotation: Any) -> Any:
    """The annotation without ``None``; ``str`` where several types are allowed (parsed later)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return plain_type(args[0]) if len(args) == 1 else str
    return annotation


def describe_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "?"
    if first.get("type") == "extra_forbidden":
        parent: type[BaseModel] = WeaveOptions if loc.startswith("weave.") else MergeOptions
        name = loc.rsplit(".", 1)[-1]
        valid = [info.alias or field for field, info in parent.model_fields.items()]
        return f"{source}: unknown option '{loc}'{did_you_mean(name, valid)}"
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
    """Read a YAML config safely (``yaml.safe_load``: no tags that construct objects); a mergekit
    config is translated into our options. Relative paths are relative to the config file."""
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
    from .mergekit_config import is_mergekit, translate

    if is_mergekit(data):
        data = translate(data, base_dir, str(path))
    for key in RECORD_ONLY:
        data.pop(key, None)
    if isinstance(data.get("out_lora"), dict):  # a LoRA output records its rank with the energy kept
        data["out_lora"] = data["out_lora"].get("rank")
    for key in DATA_FIELDS:  # TASK -> folder mappings of the methods that use data
        if isinstance(data.get(key), dict):
            from .withdata.command import data_paths

            data[key] = data_paths(data[key], base_dir)
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
    from .withdata import METHODS_WITH_DATA

    if options.method in METHODS_WITH_DATA or any(getattr(options, f) for f in DATA_FIELDS):
        from .withdata.command import run_with_data

        return run_with_data(options, progress=progress)
    positional = ("base", "models", "method", "lam", "hyperparameters", "weave", *DATA_FIELDS)
    common = {api_name(f): getattr(options, f) for f in MergeOptions.model_fields if f not in positional}
    if options.weave is None:
        result = merge(
            options.base,
            options.models,
            options.method,
            options.lam,
            **common,
            progress=progress,
            **options.hyperparameters,
        )
    else:
        if options.lam is not None:
            raise OptionError("--lambda and --weave exclude each other; give the search space with --lambdas")
        result = weave(
            options.base,
            options.models,
            options.method,
            **options.weave.model_dump(),
            **common,
            progress=progress,
            **options.hyperparameters,
        )
    assert isinstance(result, Path)
    return result
