"""``run_suite``: build (or load) the zoo, score every method in the three setups, write the report."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
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
from .profiles import POOLS, PROFILES, TUNED_ON_SEEDS
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
        quick: the CI profile (under 2 minutes) instead of the full one (under 10 minutes).
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
        if executor == "local":
            results, diagnostics = _score(zoo, methods, functools.partial(fork_map, workers=workers), show)
        else:
            results, diagnostics = _score_points(
                zoo, methods, functools.partial(ray_map, address=ray_address), show
            )
        if recipe.with_data:  # reported apart: these methods see data the data-free ones do not
            setups = [s for s in protocols.SETUPS if s in results]
            scored = withdata.score_with_data(
                zoo, recipe.with_data_steps, recipe.with_data_lr, recipe.grid_stride, setups, workers
            )
            for setup, entries in scored.items():
                results[setup].update(entries)
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
    (folder / "results.json").write_text(
        # setups at the top level: results["continual"]["ties"]["weave"]["average"]
        json.dumps({**results, "diagnostics": diagnostics, "meta": meta}, indent=1)
    )
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    report.plots(results, diagnostics, folder)
    (folder / "report.md").write_text(report.markdown(results, diagnostics, meta))
    print(report.summary(results, diagnostics))
    print(f"suite ({name}, seed {seed}) done in {finished - started:.0f} s; report: {folder / 'report.md'}")
    return folder


def _score(
    zoo: Zoo, methods: list[str], mapper: Callable[[Callable[[int], Any], int], Iterable[Any]], show: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method in every setup (and the interference diagnostic), as jobs run by ``mapper``
    (``fork_map`` over worker processes, or ``ray_map``)."""
    recipe = zoo.recipe
    results: dict[str, Any] = {setup: protocols.baselines(zoo, setup) for setup in protocols.SETUPS}
    # independent jobs: every (setup, method) scoring, then each interference λ
    pairs = [(setup, method) for setup in protocols.SETUPS for method in methods]

    def job(index: int) -> Any:
        if index >= len(pairs):
            return protocols.interference(zoo, recipe.interference_lams[index - len(pairs)])
        setup, method = pairs[index]
        tick = time.perf_counter()
        scored = protocols.score_method(zoo, setup, method, _pools(zoo, setup), recipe.grid_stride)
        log.info("%s / %s: %.1f s", setup, method, time.perf_counter() - tick)
        return scored

    n_jobs = len(pairs) + len(recipe.interference_lams)
    interference = []
    with tqdm(total=n_jobs, desc="merge+evaluate", disable=not show, leave=False) as bar:
        for index, value in enumerate(mapper(job, n_jobs)):
            if index < len(pairs):
                setup, method = pairs[index]
                results[setup][method] = value
            else:
                interference.append(value)
            bar.update(1)
    return results, _diagnostics(zoo, interference)


def _pools(zoo: Zoo, setup: str) -> tuple[str, ...]:
    recipe = zoo.recipe
    return (*(POOLS if setup in recipe.pool_setups else ("mean",)), *recipe.strategies)


def _score_points(
    zoo: Zoo, methods: list[str], mapper: Callable[[Callable[[int], Any], int], Iterable[Any]], show: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What :func:`_score` finds, with every λ point of every sweep a job of its own (``ray_map``):
    the jobs return scores, and each method's sweep is folded here from them as it is locally."""
    recipe = zoo.recipe
    results: dict[str, Any] = {setup: protocols.baselines(zoo, setup) for setup in protocols.SETUPS}
    pairs = [(setup, method) for setup in protocols.SETUPS for method in methods]
    # (pair, point) of every job; the points' keys are the driver's, for the fold
    keys = [
        [p.key for p in protocols.method_points(zoo, setup, method, _pools(zoo, setup), recipe.grid_stride)]
        for setup, method in pairs
    ]
    jobs = [(pair, point) for pair, found in enumerate(keys) for point in range(len(found))]

    def job(index: int) -> Any:
        if index >= len(jobs):
            return protocols.interference(zoo, recipe.interference_lams[index - len(jobs)])
        pair, point = jobs[index]
        setup, method = pairs[pair]
        found = protocols.method_points(zoo, setup, method, _pools(zoo, setup), recipe.grid_stride)
        return found[point].compute()

    n_jobs = len(jobs) + len(recipe.interference_lams)
    done: dict[str, Any] = {}
    interference = []
    with tqdm(total=n_jobs, desc="merge+evaluate", disable=not show, leave=False) as bar:
        for index, value in enumerate(mapper(job, n_jobs)):
            if index < len(jobs):
                pair, point = jobs[index]
                done[keys[pair][point]] = value
            else:
                interference.append(value)
            bar.update(1)
    for setup, method in pairs:
        results[setup][method] = protocols.score_method(
            zoo, setup, method, _pools(zoo, setup), recipe.grid_stride, lambda key, _: done[key]
        )
    return results, _diagnostics(zoo, interference)


def _diagnostics(zoo: Zoo, interference: list[Any]) -> dict[str, Any]:
    return {
        "interference": interference,
        "cosine": _cosines(zoo),
        "multitask_task_vector_cosine": _mean_offdiag(
            protocols.cosine_matrix(zoo.pretrained, [zoo.finetuned[t.name] for t in zoo.tasks])
        ),
    }


_mean_offdiag = protocols.mean_offdiag


def _cosines(zoo: Any) -> dict[str, Any]:
    return {
        f"split{run.n_tasks}": protocols.cosine_summary(
            protocols.cosine_matrix(zoo.pretrained, run.sequential),
            protocols.cosine_matrix(zoo.pretrained, run.individual),
        )
        for run in zoo.continual
    }
