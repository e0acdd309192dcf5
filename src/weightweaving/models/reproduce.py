"""``weightweaving reproduce CONFIG.yaml``: the paper's protocols over a user's real CLIP checkpoints.

The same protocol code as the built-in suite (``suite.protocols.score_problems``) runs on a second
model source: CLIP image encoders, zero-shot heads from the base's text encoder, accuracy on the
user's images. Multi-task merges every task's fine-tune and scores each task with its head; domain
generalisation merges all but one and scores the held-out task; continual learning merges the
task vectors of sequential fine-tunes (in order) and scores one benchmark. Each method is scored
at its tuned λ (privileged), at λ = 1 and with Weight Weaving; the run folder holds the suite's
``report.md``, plots and ``results.json`` keys.

Memory: the base encoder and one merged encoder (plus the slope of a method linear in λ) are held;
the fine-tuned encoders are read from safetensors files tensor by tensor by the merge. Every
point's scores are appended to ``points-<config hash>.jsonl`` as soon as they are known, so a run
that is stopped and started again continues where it was. With ``executor: ray`` every λ point of
the sweeps (one merge and one evaluation) is a task on a Ray cluster whose nodes see the same paths;
the driver records the points as the local run does, and the results are the same.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..api import versions
from ..errors import OptionError, WeightWeavingError
from ..methods import list_methods
from .clip import Clip, load_clip
from .evaluate import Task, accuracy, check_device, resolve_task, task_heads, write_json

log = logging.getLogger("weightweaving")

DEFAULT_METHODS = ("task_arithmetic", "ties", "breadcrumbs", "magmax", "pcb", "tsv", "iso_c")
Scores = dict[str, float]


class TaskConfig(BaseModel):
    """One task of the multi-task and domain-generalisation setups."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(
        description="evaluation images: an image folder, a CSV of path,label, a paper dataset's "
        "torchvision/task_vectors layout (DATA[:SPLIT], default test), hf:FOLDER"
    )
    checkpoint: str = Field(
        description="the task's fine-tuned CLIP (CLIPModel or CLIPVisionModel folder, state dict)"
    )
    classes: str | None = Field(
        None, description="class names file (default: the paper dataset's, or folder names)"
    )
    templates: str | None = Field(None, description="templates file (default: the paper dataset's)")


class ContinualConfig(BaseModel):
    """A continual-learning benchmark: sequential fine-tunes in order and one evaluation over all classes."""

    model_config = ConfigDict(extra="forbid")
    name: str
    data: str
    checkpoints: list[str] = Field(min_length=1, description="the sequential fine-tunes, first to last")
    classes: str | None = None
    templates: str | None = None
    individual: list[str] | None = Field(
        None, description="each task's own fine-tune of the base on its classes only (same order)"
    )
    class_groups: list[list[str | int]] | None = Field(
        None, description="each task's classes (names or label indices), in the order of the checkpoints"
    )


def _all_pools() -> list[Literal["mean", "random", "magmax"]]:
    return ["mean", "random", "magmax"]


class ReproduceOptions(BaseModel):
    """The options of ``weightweaving reproduce`` (its YAML config)."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field(description="the pre-trained CLIPModel folder (text side, tokenizer, image processor)")
    out: str = Field("runs/reproduce", description="the run folder")
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict, description="name -> task (multi-task, domain)"
    )
    continual: list[ContinualConfig] = Field(default_factory=list)
    setups: list[Literal["multitask", "continual", "domain"]] | None = Field(
        None, description="default: multitask and domain (with tasks), continual (with benchmarks)"
    )
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    pools: list[Literal["mean", "random", "magmax"]] = Field(default_factory=_all_pools)
    grid_stride: int = Field(1, ge=1, description="score every n-th λ of the paper's grid (1: all)")
    interference_lams: list[float] = Field(
        default_factory=lambda: [1.0], description="λ of the interference diagnostic ([]: none)"
    )
    seed: int = 0
    device: str = "cpu"
    batch_size: int = Field(128, ge=1)
    workers: int = Field(0, ge=0, description="image-loading processes")
    executor: Literal["local", "ray"] = Field(
        "local", description="ray: every λ point (one merge and one evaluation) is a task on a Ray cluster"
    )
    ray_address: str | None = Field(None, description="the Ray cluster (default: RAY_ADDRESS or a new one)")

    @field_validator("pools")
    @classmethod
    def _mean_first(cls, pools: list[str]) -> list[str]:
        return ["mean", *[p for p in pools if p != "mean"]]


def load_options(path: str | Path, overrides: dict[str, Any] | None = None) -> ReproduceOptions:
    """Read and validate a reproduce config; relative paths are taken from the config's folder."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise OptionError(f"unreadable config: {str(exc).splitlines()[0]}", path=file) from None
    if not isinstance(raw, dict):
        raise OptionError("a reproduce config is a mapping of options", path=file)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        options = ReproduceOptions.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise OptionError(f"{where}: {first['msg']}", path=file) from None
    here = file.parent

    def rel(value: str | None) -> str | None:
        return None if value is None or Path(value).is_absolute() else str(here / value)

    def fix(value: str | None) -> str | None:
        return rel(value) or value

    def fix_data(value: str) -> str:
        if value.startswith("hf:"):  # hf:FOLDER[:...]: the folder is taken from the config's folder
            where, sep, more = value[3:].partition(":")
            return f"hf:{fix(where)}{sep}{more}"
        return value if value.startswith("hf-hub:") else fix(value) or value

    options.base = fix(options.base) or options.base
    if (overrides or {}).get("out") is None:  # --out is taken from the working folder, as typed
        options.out = fix(options.out) or options.out
    for task in options.tasks.values():
        task.data, task.checkpoint = fix_data(task.data), fix(task.checkpoint) or task.checkpoint
        task.classes, task.templates = fix(task.classes), fix(task.templates)
    for bench in options.continual:
        bench.data = fix_data(bench.data)
        bench.checkpoints = [fix(c) or c for c in bench.checkpoints]
        bench.classes, bench.templates = fix(bench.classes), fix(bench.templates)
        if bench.individual is not None:
            bench.individual = [fix(c) or c for c in bench.individual]
    _check(options, file)
    return options


def _check(options: ReproduceOptions, file: Path) -> None:
    setups: list[str] = list(options.setups or [])
    if not setups:
        setups = ["multitask", "domain"] if options.tasks else []
        setups += ["continual"] if options.continual else []
    if "multitask" not in setups:
        raise OptionError("the multi-task setup is needed (the report is built around it)", path=file)
    if len(options.tasks) < 2:
        raise OptionError("tasks: give at least two tasks", path=file)
    if "continual" in setups and not options.continual:
        raise OptionError("setups: 'continual' needs a 'continual' benchmark", path=file)
    unknown = [m for m in options.methods if m not in list_methods()]
    if unknown:
        raise OptionError(f"methods: unknown '{unknown[0]}'; valid: {', '.join(list_methods())}", path=file)
    for bench in options.continual:
        given = (bench.individual is not None, bench.class_groups is not None)
        if any(given) and not all(given):
            raise OptionError(
                f"continual '{bench.name}': 'individual' and 'class_groups' are given together", path=file
            )
        for field in ("individual", "class_groups"):
            value = getattr(bench, field)
            if value is not None and len(value) != len(bench.checkpoints):
                raise OptionError(
                    f"continual '{bench.name}': {field} needs one entry per checkpoint "
                    f"({len(bench.checkpoints)}), not {len(value)}",
                    path=file,
                )
    if options.executor == "ray" and options.device != "cpu":
        raise OptionError("executor: ray evaluates on the workers' CPUs; use device: cpu", path=file)
    options.setups = list(setups)  # type: ignore[arg-type]


class PointStore:
    """Scores of finished points, appended to a JSON-lines file as they come (a resumed run reads them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known: dict[str, Scores] = {}
        self.reused = self.computed = 0
        self._recorded: set[str] = set()  # computed elsewhere (record), not yet asked for
        if path.is_file():
            text = path.read_text("utf-8")
            good = []
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    self.known[record["key"]] = record["scores"]
                    good.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interruption: that point is recomputed
            if len(good) != len(text.splitlines()) or not text.endswith("\n"):
                staging = path.with_suffix(".partial")
                staging.write_text("".join(f"{line}\n" for line in good), "utf-8")
                staging.replace(path)

    def __call__(self, key: str, compute: Callable[[], Scores]) -> Scores:
        if key in self._recorded:  # counted when recorded
            self._recorded.discard(key)
            return self.known[key]
        if key in self.known:
            self.reused += 1
            return self.known[key]
        return self._keep(key, compute())

    def record(self, key: str, scores: Scores) -> None:
        """Keep the scores of a point computed elsewhere (a Ray task), as :meth:`__call__` keeps its
        own; the first call asking for it then returns them as if it had computed them."""
        self._keep(key, scores)
        self._recorded.add(key)

    def _keep(self, key: str, scores: Scores) -> Scores:
        self.computed += 1
        self.known[key] = scores
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "scores": scores}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return scores


class ClipSource:
    """The real-CLIP model source: encoder state dicts, heads and an evaluate function for the protocols."""

    def __init__(self, options: ReproduceOptions, folder: Path, progress: bool) -> None:
        self.options, self.folder, self.progress = options, folder, progress
        self.clip: Clip = load_clip(options.base, device=check_device(options.device))
        self.pretrained = self.clip.image_encoder_state()
        self.tasks = {
            name: resolve_task(name, t.data, classes_file=t.classes, templates_file=t.templates)
            for name, t in options.tasks.items()
        }
        self.benchmarks = {
            b.name: resolve_task(b.name, b.data, classes_file=b.classes, templates_file=b.templates)
            for b in options.continual
        }
        every = [*self.tasks.values(), *self.benchmarks.values()]
        self.heads = task_heads(self.clip, every, folder / "heads")

    def encoder_file(self, checkpoint: str) -> str:
        """The checkpoint's image encoder as a safetensors file under ``encoders/`` (written once)."""
        digest = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:16]
        target = self.folder / "encoders" / f"{digest}.safetensors"
        if not target.is_file():
            loaded = load_clip(checkpoint, base=self.options.base)
            state = loaded.image_encoder_state()
            del loaded
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_suffix(".partial")
            save_file(state, str(staging), metadata={"checkpoint": str(checkpoint)})
            staging.replace(target)
        return str(target)

    def evaluator(self, tasks: list[Task]) -> Callable[[dict[str, torch.Tensor]], Scores]:
        def evaluate(state: dict[str, torch.Tensor]) -> Scores:
            self.clip.load_image_encoder(state)
            return {
                t.name: accuracy(
                    self.clip,
                    self.heads[t.name],
                    t.data,
                    batch_size=self.options.batch_size,
                    workers=self.options.workers,
                )
                for t in tasks
            }

        return evaluate

    def scores_of(self, encoder: str | None, tasks: list[Task]) -> Scores:
        state = self.pretrained if encoder is None else load_file(encoder)
        return self.evaluator(tasks)(state)


def _problems(source: ClipSource, setup: str, files: dict[str, str]) -> list[Any]:
    from ..suite.protocols import Problem

    names = list(source.tasks)
    if setup == "multitask":
        return [Problem([files[n] for n in names], source.evaluator(list(source.tasks.values())))]
    if setup == "domain":
        return [
            Problem([files[o] for o in names if o != n], source.evaluator([source.tasks[n]])) for n in names
        ]
    return [
        Problem(
            [source.encoder_file(c) for c in b.checkpoints], source.evaluator([source.benchmarks[b.name]])
        )
        for b in source.options.continual
    ]


def _baselines(source: ClipSource, setup: str, files: dict[str, str], points: PointStore) -> dict[str, Any]:
    from ..suite.protocols import entry

    def score(key: str, encoder: str | None, task: Task) -> float:
        return points(key, lambda: source.scores_of(encoder, [task]))[task.name]

    if setup in ("multitask", "domain"):
        zero = {n: score(f"zero_shot/{n}", None, t) for n, t in source.tasks.items()}
        own = {n: score(f"individual/{n}", files[n], t) for n, t in source.tasks.items()}
        out = {"zero_shot": entry(zero), "individual": entry(own)}
        if setup == "domain":
            out["individual"]["note"] = "oracle: the held-out task's own fine-tuned model"
        return out
    zero, last, own, routed = {}, {}, {}, []
    for b in source.options.continual:
        task = source.benchmarks[b.name]
        zero[b.name] = score(f"zero_shot/{b.name}", None, task)
        last[b.name] = score(f"sequential/{b.name}", source.encoder_file(b.checkpoints[-1]), task)
        if b.individual is not None and b.class_groups is not None:
            own[b.name] = _routed_accuracy(source, points, b.name, b.individual, b.class_groups)
            routed.append(b.name)
        else:
            own[b.name] = last[b.name]
    individual = entry(own)
    individual["note"] = "; ".join(
        part
        for part in (
            f"{', '.join(routed)}: task-aware: each task's individual model on its own classes' images and head rows"
            if routed
            else "",
            f"{', '.join(n for n in own if n not in routed)}: the last sequential fine-tune "
            "(no individual models and class groups given)"
            if len(routed) < len(own)
            else "",
        )
        if part
    )
    sequential = entry(last)
    sequential["note"] = "the last model of sequential fine-tuning (no merging)"
    return {"zero_shot": entry(zero), "individual": individual, "sequential_finetuning": sequential}


def _routed_accuracy(
    source: ClipSource, points: PointStore, name: str, models: list[str], groups: list[list[str | int]]
) -> float:
    """Task-aware accuracy: task t's images (labels in its class group) scored by its own model and head rows."""
    task, head = source.benchmarks[name], source.heads[name]
    labels = task.data.labels()
    correct, seen = 0.0, 0
    for t, (model, group) in enumerate(zip(models, groups, strict=True)):
        rows = [_class_index(task, c) for c in group]
        remap = {label: i for i, label in enumerate(rows)}
        chosen = [i for i in range(len(task.data)) if int(labels[i]) in remap]
        if not chosen:
            raise WeightWeavingError(
                f"continual '{name}': class group {t + 1} has no images", path=task.data.source
            )
        items = [(task.data.items[i][0], remap[task.data.items[i][1]]) for i in chosen]
        part = Task(
            f"{name}/{t}",
            dataclasses.replace(task.data, classes=[task.data.classes[r] for r in rows], items=items),
            task.templates,
        )
        sub_head = head[torch.tensor(rows)]
        encoder = source.encoder_file(model)

        def compute(encoder: str = encoder, part: Task = part, sub_head: Tensor = sub_head) -> Scores:
            source.clip.load_image_encoder(load_file(encoder))
            return {
                "accuracy": accuracy(
                    source.clip,
                    sub_head,
                    part.data,
                    batch_size=source.options.batch_size,
                    workers=source.options.workers,
                )
            }

        correct += len(chosen) * points(f"individual/{name}/{t}", compute)["accuracy"] / 100
        seen += len(chosen)
    return 100.0 * correct / seen


def _class_index(task: Task, value: str | int) -> int:
    classes = task.data.classes
    if isinstance(value, int):
        if not 0 <= value < len(classes):
            raise OptionError(
                f"class_groups: label {value} is not one of the {len(classes)} classes of '{task.name}'"
            )
        return value
    if value not in classes:
        raise OptionError(f"class_groups: '{value}' is not a class of '{task.name}'")
    return classes.index(value)


def _diagnostics(
    source: ClipSource, files: dict[str, str], points: PointStore, setups: Sequence[str]
) -> dict[str, Any]:
    """Task-vector cosines (multi-task; continual: sequential and individual) and the interference matrix."""
    from ..analysis.similarity import task_vector_similarity
    from ..suite import protocols

    def cosines(models: list[str]) -> list[list[float]]:
        if len(models) < 2:
            return [[1.0]]
        return task_vector_similarity(source.pretrained, models, progress=False).model.tolist()

    names = list(source.tasks)
    out: dict[str, Any] = {
        "multitask_task_vector_cosine": protocols.mean_offdiag(cosines([files[n] for n in names]))
    }
    if "continual" in setups:
        out["cosine"] = {
            b.name: protocols.cosine_summary(
                cosines([source.encoder_file(c) for c in b.checkpoints]),
                None if b.individual is None else cosines([source.encoder_file(c) for c in b.individual]),
            )
            for b in source.options.continual
        }
    tasks = list(source.tasks.values())
    zero = {
        n: points(f"zero_shot/{n}", functools.partial(source.scores_of, None, [t]))[n]
        for n, t in source.tasks.items()
    }
    out["interference"] = []
    for lam in source.options.interference_lams:
        scored = [
            points(
                f"interference/lam={lam}/{j}",
                functools.partial(_score_scaled, source, tasks, files[j], lam),
            )
            for j in names
        ]
        out["interference"].append(protocols.interference_block(lam, names, zero, scored))
    return out


def _score_scaled(source: ClipSource, tasks: list[Task], file: str, lam: float) -> Scores:
    return source.evaluator(tasks)(_scaled(source, file, lam))


def _scaled(source: ClipSource, file: str, lam: float) -> dict[str, Tensor]:
    """``θ_pre + λ (θ_j − θ_pre)``, reading the fine-tune one tensor at a time."""
    from safetensors import safe_open

    out = {}
    with safe_open(file, framework="pt") as fh:
        for key, base in source.pretrained.items():
            tuned = fh.get_tensor(key).to(base.device, base.dtype)
            out[key] = base + lam * (tuned - base)
    return out


def _sweep_points(source: ClipSource, files: dict[str, str], setup: str, method: str) -> list[Any]:
    from ..suite import protocols

    options = source.options
    found = _problems(source, setup, files)
    pools = tuple(options.pools)
    return protocols.sweep_points(
        source.pretrained, found, options.seed, setup, method, pools, options.grid_stride
    )


def _sweeps_on_ray(
    source: ClipSource, files: dict[str, str], jobs: Sequence[tuple[str, str]], points: PointStore, show: bool
) -> None:
    """Every λ point of every sweep not yet in ``points``, one Ray task each (merge and evaluate on
    the worker, which reads the checkpoints and images from the same paths); the driver records the
    scores in ``points`` in the local run's order, as they come."""
    from ..suite.parallel import ray_map

    todo = [
        (job, index, point.key)
        for job, (setup, method) in enumerate(jobs)
        for index, point in enumerate(_sweep_points(source, files, setup, method))
        if point.key not in points.known
    ]

    def task(n: int) -> Scores:
        job, index, _ = todo[n]
        scores: Scores = _sweep_points(source, files, *jobs[job])[index].compute()
        return scores

    address = source.options.ray_address
    results = ray_map(task, len(todo), address, threads=None, flush_denormal=False)
    with tqdm(total=len(todo), desc="λ points on Ray", disable=not show, leave=False) as bar:
        for (_, _, key), scores in zip(todo, results, strict=True):
            points.record(key, scores)
            bar.update(1)


def _fingerprint(options: ReproduceOptions) -> str:
    """What the points depend on: checkpoints, data, heads, seed (not the device, batch size or folder)."""
    keep = options.model_dump(include={"base", "tasks", "continual", "seed"})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def reproduce(options: ReproduceOptions, *, progress: bool | None = None) -> Path:
    """Run the configured setups and write ``results.json``, ``report.md`` and the plots to ``options.out``.

    Returns:
        The run folder.
    """
    from ..suite import protocols, report
    from ..suite.merging import available_methods

    show = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    folder = Path(options.out)
    source = ClipSource(options, folder, show)  # a bad device, model or data stops here: no run folder yet
    folder.mkdir(parents=True, exist_ok=True)
    points = PointStore(folder / f"points-{_fingerprint(options)}.jsonl")
    files = {name: source.encoder_file(t.checkpoint) for name, t in options.tasks.items()}
    methods = available_methods(options.methods)
    setups = [s for s in protocols.SETUPS if s in (options.setups or [])]
    results: dict[str, Any] = {s: _baselines(source, s, files, points) for s in setups}
    jobs = [(s, m) for s in setups for m in methods]
    if options.executor == "ray":  # the sweeps' points first, one Ray task each; folded below
        _sweeps_on_ray(source, files, jobs, points, show)
    with tqdm(total=len(jobs), desc="merge+evaluate", disable=not show, leave=False) as bar:
        for setup, method in jobs:
            found = _problems(source, setup, files)
            results[setup][method] = protocols.score_problems(
                source.pretrained,
                found,
                options.seed,
                setup,
                method,
                tuple(options.pools),
                options.grid_stride,
                points,
            )
            bar.update(1)
    diagnostics = _diagnostics(source, files, points, setups)
    meta = _meta(options, methods, points, time.perf_counter() - started)
    write_json(folder / "results.json", {**results, "diagnostics": diagnostics, "meta": meta})
    write_json(folder / "config.json", meta)
    try:
        report.plots(results, diagnostics, folder)
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'weightweaving[suite]'): no plots")
    (folder / "report.md").write_text(report.markdown(results, diagnostics, meta), encoding="utf-8")
    print(report.summary(results, diagnostics))
    print(
        f"reproduce done in {meta['seconds']:.0f} s ({points.computed} points computed, "
        f"{points.reused} answered from {points.path.name}); report: {folder / 'report.md'}"
    )
    return folder


def _meta(
    options: ReproduceOptions, methods: list[str], points: PointStore, seconds: float
) -> dict[str, Any]:
    tasks = ", ".join(options.tasks)
    return {
        "title": f"# weightweaving reproduce — CLIP `{Path(options.base).name}`, seed {options.seed}",
        "model_lines": [
            f"Real CLIP: the image encoders of the given fine-tunes of `{options.base}` ({tasks}), merged;",
            "frozen zero-shot heads from the base's text encoder. Accuracies in percent on the given images.",
        ],
        "profile": "reproduce",
        "seed": options.seed,
        "recipe": {},
        "options": options.model_dump(mode="json"),
        "methods": methods,
        "methods_skipped": [m for m in options.methods if m not in methods],
        "points": {"computed": points.computed, "reused": points.reused},
        "seconds": round(seconds, 1),
        "versions": versions(),
    }


def run_reproduce(
    config: str,
    *,
    out: str | None = None,
    device: str | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
) -> Path:
    """``weightweaving reproduce CONFIG.yaml``."""
    overrides = {"out": out, "device": device, "executor": executor, "ray_address": ray_address}
    options = load_options(config, overrides)
    if not Path(options.base).exists():
        raise WeightWeavingError("no such file or folder", path=options.base)
    return reproduce(options)
