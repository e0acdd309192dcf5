"""``run_suite``: build (or load) the zoo, score every method in the three setups, write the report."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import weightweaving
from weightweaving.errors import OptionError

from . import protocols, report, train, withdata
from .cache import CheckpointCache, default_cache_dir
from .merging import available_methods
from .parallel import default_workers, fork_map, ray_map
from .profiles import PAPER_METHODS, POOLS, PROFILES, TUNED_ON_SEEDS
from .timing import Stopwatch
from .zoo import Zoo, build_zoo

log = logging.getLogger("weightweaving.suite")


def run_suite(
    *,
    quick: bool = False,
    seed: int = 0,
    out: str | Path = "runs/suite",
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    profile: str | None = None,
    workers: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> Path:
    """Run the paper's three setups (multi-task, continual learning, domain generalisation) on a CPU.

    Args:
        quick: the smaller profile instead of the full one (6 min 56 s to 7 min 21 s from nothing on 2 cores, seeds 9-11).
        seed: seeds data, pre-training, fine-tuning and random pools; the same seed gives the same run.
        out: parent folder; the run goes to ``<out>/<profile>-seed<seed>``.
        cache_dir: where checkpoints are cached by a hash of their recipe
            (default ``~/.cache/weightweaving/suite``); a second run only merges and evaluates.
        progress: show progress bars (default: when stderr is a terminal).
        profile: a named recipe from ``PROFILES`` (overrides ``quick``; ``"micro"`` is for tests).
        workers: processes for fine-tuning and scoring (default: the usable cores, at most 8, or
            ``WEIGHTWEAVING_SUITE_WORKERS``); results do not depend on it.
        executor: ``"local"`` (``workers`` forked processes, one (setup, method) λ sweep each) or
            ``"ray"``: every point of every λ sweep (one merge plus one evaluation) is a task on the
            Ray cluster at ``ray_address``, folded here (the fine-tuning stays here); the same results.

    Returns:
        The run folder, holding ``report.md``, ``results.json``, ``config.json`` and the PNG plots.

    Example:
        >>> from weightweaving.suite import run_suite
        >>> folder = run_suite(quick=True)  # doctest: +SKIP
    """
    name = profile or ("quick" if quick else "full")
    if name not in PROFILES:
        raise weightweaving.WeightWeavingError(
            f"unknown suite profile '{name}'; valid: {', '.join(PROFILES)}"
        )
    recipe = PROFILES[name]
    show = sys.stderr.isatty() if progress is None else progress
    # One thread per process: on 2 busy cores the step time of this small model is 2-25x worse
    # with two threads; the cores are used by worker processes instead (see ``parallel``).
    torch.set_num_threads(int(os.environ.get("WEIGHTWEAVING_SUITE_THREADS", "1")))
    workers = workers if workers is not None else default_workers()
    if executor not in ("local", "ray"):
        raise OptionError(f"--executor '{executor}' is not one of: local, ray")
    started = time.perf_counter()
    folder = Path(out) / f"{name}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    cache = CheckpointCache(cache_dir if cache_dir is not None else default_cache_dir())

    with train.flush_denormals():
        zoo = build_zoo(recipe, seed, cache, show, workers)
        trained = time.perf_counter()
        methods = available_methods(recipe.methods)
        mapper: Mapper = (
            functools.partial(fork_map, workers=workers)
            if executor == "local"
            else functools.partial(ray_map, address=ray_address)
        )
        results, diagnostics, timings = _score(
            zoo, methods, mapper, workers, show, per_point=executor == "ray"
        )
    finished = time.perf_counter()
    meta = {
        "profile": name,
        "seed": seed,
        "recipe": dataclasses.asdict(recipe),
        "recipe_tuned_on_seeds": list(TUNED_ON_SEEDS),
        "encoder_sha256": zoo.encoder_sha256,
        "methods": methods,
        "methods_skipped": [m for m in recipe.methods if m not in methods],
        "weave_source": "weightweaving.weave" if hasattr(weightweaving, "weave") else "suite closed form",
        "cache_dir": str(cache.directory),
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "workers": workers,
        "seconds": {"train_or_load": round(trained - started, 1), "total": round(finished - started, 1)},
        "versions": {
            "weightweaving": weightweaving.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    meta["timings"] = timings

    def save() -> None:  # the results first: a report that fails loses none of them
        (folder / "results.json").write_text(
            # setups at the top level: results["continual"]["ties"]["weave"]["average"]
            json.dumps({**results, "diagnostics": diagnostics, "timings": timings, "meta": meta}, indent=1)
        )
        (folder / "config.json").write_text(json.dumps(meta, indent=1))

    save()
    tick = time.perf_counter()
    report.plots(results, diagnostics, folder, workers)
    markdown = report.markdown(results, diagnostics, meta)
    timings["stages"]["report and plots"] = {"wall": round(time.perf_counter() - tick, 1)}
    timings["total"] = {"wall": round(time.perf_counter() - started, 1), "cpu": round(_cpu_so_far(), 1)}
    save()
    (folder / "report.md").write_text(markdown + "\n".join(report.timings_section(timings)) + "\n")
    print(report.summary(results, diagnostics))
    print(f"suite ({name}, seed {seed}) done in {finished - started:.0f} s; report: {folder / 'report.md'}")
    return folder


Mapper = Callable[[Callable[[int], Any], int], Iterable[Any]]


def _score(
    zoo: Zoo, methods: list[str], mapper: Mapper, workers: int, show: bool, per_point: bool = False
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The baselines, every method in every setup, the methods that use data, the interference and
    continual diagnostics: independent jobs run by ``mapper`` (``fork_map`` over ``workers`` processes, or
    ``ray_map``), longest first. Returns the results, the diagnostics and the per-stage timings.

    ``per_point`` (Ray): every point of every λ sweep is a job of its own (one merge and one
    evaluation); the jobs return scores and each method's sweep is folded here from them exactly as
    it is in one process (the whole grid is scored, the coarse-to-fine search takes what it needs)."""
    recipe = zoo.recipe
    results: dict[str, Any] = {setup: {} for setup in protocols.SETUPS}
    jobs: list[tuple[str, Any]] = []
    if recipe.with_data:  # reported apart: these methods see data the data-free ones do not
        jobs += [("with_data", pair) for pair in withdata.jobs(protocols.SETUPS)]
    # domain generalisation first: eight merges per method
    pairs = [(setup, m) for setup in ("domain", "multitask", "continual") for m in methods]
    points: dict[tuple[str, str], list[str]] = {}
    if per_point:
        for setup, method in pairs:
            found = protocols.method_points(
                zoo, setup, method, _pools(zoo, setup, method), recipe.grid_stride
            )
            points[setup, method] = [p.key for p in found]
            jobs += [("point", (setup, method, k)) for k in range(len(found))]
    else:
        jobs += [("score", pair) for pair in pairs]
    jobs += [("interference", lam) for lam in recipe.interference_lams]
    jobs += [("continual", index) for index in range(len(zoo.continual))]
    # zero-shot and individual models (domain generalisation shares multi-task's, made after)
    jobs += [("baselines", setup) for setup in protocols.SETUPS if setup != "domain"]

    def job(index: int) -> tuple[Any, dict[str, dict[str, float]]]:
        kind, what = jobs[index]
        clock = Stopwatch()
        with clock("total"):
            if kind == "with_data":
                setup, method = what
                value = withdata.score_one(
                    zoo, setup, method, recipe.with_data_steps, recipe.with_data_lr, recipe.grid_stride
                )
            elif kind == "interference":
                value = protocols.interference(zoo, what)
            elif kind == "continual":
                value = protocols.continual_diagnostics(zoo, zoo.continual[what], CL_SURVIVAL_LAMS)
            elif kind == "baselines":
                value = protocols.baselines(zoo, what)
            elif kind == "point":
                setup, method, k = what
                pools = _pools(zoo, setup, method)
                value = protocols.method_points(zoo, setup, method, pools, recipe.grid_stride)[k].compute()
            else:
                setup, method = what
                value = protocols.score_method(
                    zoo, setup, method, _pools(zoo, setup, method), recipe.grid_stride, clock
                )
        log.info("%s %s: %.1f s (%.1f CPU s)", kind, what or "", clock.wall["total"], clock.cpu["total"])
        return value, clock.snapshot()

    interference, continual = [], []
    base: dict[str, Any] = {}  # each setup's baselines
    done: dict[str, Any] = {}
    clocks: dict[str, dict[str, dict[str, float]]] = {}
    tick = time.perf_counter()
    with tqdm(total=len(jobs), desc="merge+evaluate", disable=not show, leave=False) as bar:
        for (kind, what), (value, clock) in zip(jobs, mapper(job, len(jobs)), strict=True):
            if kind == "score":
                results[what[0]][what[1]] = value
                clocks[f"{what[0]}/{what[1]}"] = clock
            elif kind == "point":
                setup, method, k = what
                done[points[setup, method][k]] = value
                _add_clock(clocks, f"{setup}/{method}", clock)
            elif kind == "with_data":
                results[what[0]][what[1]] = value
                clocks[f"with_data/{what[0]}/{what[1]}"] = clock
            elif kind == "interference":
                interference.append(value)
                clocks[f"interference/{what}"] = clock
            elif kind == "baselines":
                base[what] = value
                clocks[f"baselines/{what}"] = clock
            else:
                continual.append(value)
                clocks[f"continual_diagnostics/{zoo.continual[what].key}"] = clock
            bar.update(1)
    base["domain"] = protocols.baselines(zoo, "domain", base["multitask"])
    for setup in protocols.SETUPS:  # the baselines first, as a reader expects them
        results[setup] = {**base[setup], **results[setup]}
    for setup, method in points:  # Ray: fold each sweep from its points, as in one process
        results[setup][method] = protocols.score_method(
            zoo,
            setup,
            method,
            _pools(zoo, setup, method),
            recipe.grid_stride,
            points=lambda key, _: done[key],
        )
    scoring_wall = time.perf_counter() - tick
    tick = time.perf_counter()
    _best_merge_per_task(zoo, results, continual, methods, mapper)
    diagnostics = {
        "interference": interference,
        "cosine": _cosines(zoo),
        "multitask_task_vector_cosine": _mean_offdiag(
            protocols.cosine_matrix(zoo.pretrained, [zoo.finetuned[t.name] for t in zoo.tasks])
        ),
        "continual": {run.key: d for run, d in zip(zoo.continual, continual, strict=True)},
    }
    stages = {
        **zoo.timings,
        "merge and evaluate (jobs in parallel)": {
            "wall": round(scoring_wall, 1),
            "cpu": round(sum(c["cpu"]["total"] for c in clocks.values()), 1),
        },
        "continual per-task tables": {"wall": round(time.perf_counter() - tick, 1)},
    }
    return results, diagnostics, _timings(stages, clocks, recipe.strategies, workers)


def _pools(zoo: Zoo, setup: str, method: str) -> tuple[str, ...]:
    """The pools a method is woven with in a setup: Table 3's where it runs, then the strategies."""
    recipe = zoo.recipe
    strategies = recipe.strategies if method in recipe.strategy_methods else ()
    table3 = setup in recipe.pool_setups and method in recipe.pool_methods
    return (*(POOLS if table3 else ("mean",)), *strategies)


def _add_clock(
    clocks: dict[str, dict[str, dict[str, float]]], name: str, clock: dict[str, dict[str, float]]
) -> None:
    """Sum a point's seconds into its method's clock (Ray: a sweep's points are jobs of their own)."""
    into = clocks.setdefault(name, {"wall": {}, "cpu": {}})
    for kind in ("wall", "cpu"):
        for part, seconds in clock[kind].items():
            into[kind][part] = into[kind].get(part, 0.0) + seconds


def _timings(
    stages: dict[str, Any],
    clocks: dict[str, dict[str, dict[str, float]]],
    strategies: Sequence[str],
    workers: int,
) -> dict[str, Any]:
    """results.json ``timings``: stages (wall; CPU where measured), each job, and CPU seconds by part."""
    parts: dict[str, float] = {}
    methods: dict[str, float] = {}
    setups: dict[str, float] = {}
    for name, clock in clocks.items():
        for part, cpu in clock["cpu"].items():
            if part != "total":
                parts[part] = parts.get(part, 0.0) + cpu
        if "/" in name and not name.startswith(
            ("interference", "continual_diagnostics", "with_data", "baselines")
        ):
            setup, method = name.split("/", 1)
            methods[method] = methods.get(method, 0.0) + clock["cpu"]["total"]
            setups[setup] = setups.get(setup, 0.0) + clock["cpu"]["total"]
    strategy_cpu = sum(parts.get(f"pool:{s}", 0.0) for s in strategies)
    return {
        "workers": workers,
        "note": "CPU seconds are each process's own; wall seconds grow with the machine's load",
        "stages": stages,
        "cpu_by_part": {k: round(v, 1) for k, v in sorted(parts.items())},
        "cpu_by_method": {k: round(v, 1) for k, v in methods.items()},
        "cpu_by_setup": {k: round(v, 1) for k, v in setups.items()},
        "shares_cpu": {
            "fine-tuning": stages.get("fine-tuning", {}).get("cpu", 0.0),
            "data-free strategies (evaluation of their pools)": round(strategy_cpu, 1),
            "methods that use data": round(
                sum(c["cpu"]["total"] for n, c in clocks.items() if n.startswith("with_data/")), 1
            ),
        },
        "jobs": {
            name: {"wall": round(c["wall"]["total"], 1), "cpu": round(c["cpu"]["total"], 1)}
            for name, c in clocks.items()
        },
    }


def _cpu_so_far() -> float:
    """CPU seconds of this process and of its finished children (the worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# λ at which each continual task's own gain is measured in θ_pre + λ·Δ_t (the report's survival table)
CL_SURVIVAL_LAMS = (0.1, 0.3, 1.0)


def _best_merge_per_task(
    zoo: Zoo, results: dict[str, Any], continual: list[dict[str, Any]], methods: list[str], mapper: Mapper
) -> None:
    """Add to each split's diagnostics the per-task accuracies under the best data-free merge (Weight
    Weaving over the paper's method with the best continual average) and the best privileged one."""
    paper = [m for m in ("task_arithmetic", *PAPER_METHODS) if m in methods]
    if not paper or not zoo.continual:
        return
    cl = results["continual"]
    woven = max(paper, key=lambda m: cl[m]["weave"]["average"])
    tuned = max(paper, key=lambda m: cl[m]["tuned"]["average"])
    asks = [(i, woven, None) for i in range(len(zoo.continual))]
    asks += [(i, tuned, cl[tuned]["tuned"]["lam"]) for i in range(len(zoo.continual))]

    def job(k: int) -> list[float]:
        i, method, lam = asks[k]
        return protocols.merged_per_task(zoo, zoo.continual[i], method, lam)

    for (i, method, lam), accs in zip(asks, mapper(job, len(asks)), strict=True):
        label = "best_weave" if lam is None else "best_tuned"
        continual[i][label] = {"method": method, "lam": lam, "per_task": accs}


_mean_offdiag = protocols.mean_offdiag


def _cosines(zoo: Any) -> dict[str, Any]:
    return {
        run.key: protocols.cosine_summary(
            protocols.cosine_matrix(zoo.pretrained, run.sequential),
            None if run.individual is None else protocols.cosine_matrix(zoo.pretrained, run.individual),
        )
        for run in zoo.continual
    }
