"""mergekit's YAML dialect, read unchanged and translated into our own options.

A config with ``merge_method`` is a mergekit config (mergekit 0.1.5, ``mergekit/config.py``). Each
method both tools have maps onto a registered method run the way mergekit runs it, so the output
equals mergekit's on the same config:

- ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``
  → ``gta`` (mergekit's per-tensor generalized task arithmetic, with its sparsification, sign
  consensus, normalisation and L1 rescale), not our paper-exact ``ties``/``dare``/``breadcrumbs``;
- ``linear`` → ``weight_averaging`` over every listed model; ``slerp`` and ``model_stock`` → ours.

The arithmetic runs in mergekit's working dtype (its ``dtype``, else the checkpoint's) on task
vectors held exactly in float64. Relative model paths are relative to the config file; nothing is
ever downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import OptionError, did_you_mean

log = logging.getLogger("weightweaving")

# mergekit method -> (sparsification, consensus, default normalize, default rescale)
GTA = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", "none", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
}
METHODS = sorted([*GTA, "linear", "slerp", "model_stock"])
# mergekit features we do not have: a config using them is refused by name
UNSUPPORTED = {
    "slices": "layer slices",
    "modules": "per-module configs",
    "tokenizer_source": "tokenizer merging",
    "tokenizer": "tokenizer merging",
    "chat_template": "chat templates",
}
KNOWN = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", *UNSUPPORTED}
DTYPES = ("float32", "float64", "bfloat16", "float16")
# our own options that may sit beside a mergekit config (everything but what the dialect fills)
OWN_ALLOWED = {
    "out",
    "device",
    "shard_size",
    "include",
    "exclude",
    "seed",
    "overwrite",
    "common_only",
    "allow_nonfinite",
    "workers",
}


def is_mergekit(data: dict[str, Any]) -> bool:
    """A mergekit config names its method ``merge_method``; ours says ``method``."""
    return "merge_method" in data


def _model_path(ref: Any, where: str, config_dir: Path, source: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise OptionError(f"{source}: '{where}' must be a model path")
    if "+" in ref:
        raise OptionError(f"{source}: '{where}': LoRA references (model+lora) are not supported: '{ref}'")
    name, _, revision = ref.partition("@")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = config_dir / path
    if not path.exists():
        raise OptionError(
            f"{source}: '{where}': '{ref}' is not a local file or folder; download it first "
            "(weightweaving never downloads)"
        )
    path = path.resolve()
    if revision:
        log.info(
            "%s: %s: using the local files of '%s' (revision '%s' is not checked)",
            source,
            where,
            name,
            revision,
        )
    return str(path)


def _num_layers(base: str) -> int | None:
    config = Path(base) / "config.json"
    try:
        value = json.loads(config.read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _check_names(found: dict[str, Any], valid: set[str], where: str, source: str) -> None:
    for name in found:
        if name not in valid:
            listed = ", ".join(sorted(valid)) or "none"
            raise OptionError(
                f"{source}: {where}: unknown parameter '{name}' (valid: {listed}){did_you_mean(name, valid)}"
            )


def translate(data: dict[str, Any], config_dir: Path, source: str) -> dict[str, Any]:
    """The options of :class:`~weightweaving.config.MergeOptions` that a mergekit config means."""
    for key in data:
        if key in UNSUPPORTED:
            raise OptionError(f"{source}: '{key}' ({UNSUPPORTED[key]}) is not supported")
        if key not in KNOWN and key not in OWN_ALLOWED:
            valid = KNOWN | OWN_ALLOWED
            raise OptionError(f"{source}: unknown mergekit option '{key}'{did_you_mean(key, valid)}")
    method = data["merge_method"]
    if method not in METHODS:
        raise OptionError(
            f"{source}: 'merge_method': '{method}' is not supported; supported: {', '.join(METHODS)}"
            + did_you_mean(str(method), METHODS)
        )
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise OptionError(f"{source}: 'models' must be a list of {{model: PATH, parameters: {{...}}}}")
    entries: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise OptionError(f"{source}: 'models[{i}]' must be a mapping with 'model'")
        _check_names({k: None for k in entry}, {"model", "parameters"}, f"models[{i}]", source)
        path = _model_path(entry["model"], f"models[{i}].model", config_dir, source)
        entries.append((path, dict(entry.get("parameters") or {})))
    base = None
    if data.get("base_model") is not None:
        base = _model_path(data["base_model"], "base_model", config_dir, source)
    shared = dict(data.get("parameters") or {})
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and str(data[key]).removeprefix("torch.") not in DTYPES:
            raise OptionError(f"{source}: '{key}': '{data[key]}' is not one of: {', '.join(DTYPES)}")
    dtype = str(data["dtype"]).removeprefix("torch.") if data.get("dtype") else None
    out_dtype = str(data["out_dtype"]).removeprefix("torch.") if data.get("out_dtype") else None

    options: dict[str, Any] = {k: v for k, v in data.items() if k in OWN_ALLOWED}
    options["compute_dtype"] = "float64"  # exact task vectors; the method works in mergekit's dtype
    options["dtype"] = out_dtype or dtype
    precision = dtype or "stored"
    if method == "linear":
        options.update(_linear(entries, base, shared, precision, source))
        return options
    if base is None:
        raise OptionError(f"{source}: 'base_model' is required for merge_method '{method}'")
    others = [(path, params) for path, params in entries if Path(path).resolve() != Path(base).resolve()]
    options["base"], options["models"] = base, [path for path, _ in others]
    layers = _num_layers(base)
    common: dict[str, Any] = {"precision": precision}
    if layers is not None:
        common["layers"] = layers
    if method == "slerp":
        _check_names(shared, {"t"}, "parameters", source)
        for i, (_, params) in enumerate(others):
            _check_names(params, set(), f"models[{i}].parameters", source)
        if "t" not in shared:
            raise OptionError(f"{source}: slerp needs 'parameters: {{t: ...}}'")
        options["method"], options["hyperparameters"] = "slerp", {**common, "t": shared["t"]}
    elif method == "model_stock":
        _check_names(shared, {"filter_wise"}, "parameters", source)
        for i, (_, params) in enumerate(others):
            _check_names(params, set(), f"models[{i}].parameters", source)
        hyper = {**common, "filter_wise": bool(shared.get("filter_wise", False))}
        options["method"], options["hyperparameters"] = "model_stock", hyper
    else:
        options["method"], options["hyperparameters"] = (
            "gta",
            {**common, **_gta(method, others, shared, source)},
        )
    return options


def _gta(
    method: str, others: list[tuple[str, dict[str, Any]]], shared: dict[str, Any], source: str
) -> dict[str, Any]:
    sparsification, consensus, normalize, rescale = GTA[method]
    per_model = {"weight", "density"} | ({"gamma"} if sparsification == "magnitude_outliers" else set())
    _check_names(shared, per_model | {"normalize", "rescale", "lambda", "int8_mask"}, "parameters", source)
    if "int8_mask" in shared:
        log.info("%s: int8_mask only sets the dtype of mergekit's sign mask, not the result; ignored", source)
    hyper: dict[str, Any] = {
        "sparsification": sparsification,
        "consensus": consensus,
        "normalize": bool(shared.get("normalize", normalize)),
        "rescale": bool(shared.get("rescale", rescale)),
        "scale": float(shared.get("lambda", 1.0)),
    }
    for name, key in (("weight", "weights"), ("density", "density"), ("gamma", "gamma")):
        if name not in per_model:
            continue
        values = []
        for i, (_, params) in enumerate(others):
            _check_names(params, per_model, f"models[{i}].parameters", source)
            value = params.get(name, shared.get(name))
            if value is None and name == "weight":
                raise OptionError(f"{source}: models[{i}].parameters: 'weight' is required for '{method}'")
            values.append(value)
        if any(v is not None for v in values):
            defaults = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
            hyper[key] = [defaults[name] if v is None else v for v in values]
    return hyper


def _linear(
    entries: list[tuple[str, dict[str, Any]]],
    base: str | None,
    shared: dict[str, Any],
    precision: str,
    source: str,
) -> dict[str, Any]:
    _check_names(shared, {"weight", "normalize"}, "parameters", source)
    if not shared.get("normalize", True):
        raise OptionError(
            f"{source}: 'normalize: false' is not supported for linear (only the weighted mean)"
        )
    paths = [path for path, _ in entries]
    if base is not None and Path(base).resolve() not in {Path(p).resolve() for p in paths}:
        raise OptionError(
            f"{source}: linear averages the listed models; list 'base_model' among them or drop it"
        )
    weights = []
    for i, (_, params) in enumerate(entries):
        _check_names(params, {"weight"}, f"models[{i}].parameters", source)
        weight = params.get("weight", shared.get("weight"))
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise OptionError(f"{source}: models[{i}].parameters: 'weight' must be a number for linear")
        weights.append(float(weight))
    # every model, the first one included, is averaged; the first is also the engine's base
    return {
        "base": paths[0],
        "models": paths,
        "method": "weight_averaging",
        "hyperparameters": {"weights": weights, "precision": precision},
    }
