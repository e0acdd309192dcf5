"""The model zoo: the pre-trained encoder, frozen heads and every fine-tuned checkpoint, cached."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor
from tqdm.auto import tqdm

from . import train
from .cache import CheckpointCache, recipe_key
from .data import Split, Task, build_tasks, class_incremental_splits, continual_dataset
from .encoder import asset_path, load_encoder, pretrain_encoder
from .parallel import fork_map
from .profiles import Recipe

log = logging.getLogger("weightweaving.suite")

StateDict = dict[str, Tensor]
Link = tuple[str, Callable[[StateDict], StateDict]]  # (cache key, make from the previous state)


@dataclass
class ContinualRun:
    """One class-incremental benchmark: N class groups fine-tuned in sequence and one by one."""

    n_tasks: int
    class_groups: list[list[int]]
    sequential: list[StateDict]  # θ_t fine-tuned from θ_{t-1}
    individual: list[StateDict]  # θ_t fine-tuned from θ_pre


@dataclass
class Zoo:
    recipe: Recipe
    seed: int
    tasks: list[Task]
    continual_task: Task
    pretrained: StateDict
    heads: dict[str, Tensor]  # task name -> (C, embed_dim); "continual" for the 20-class head
    finetuned: dict[str, StateDict]  # task name -> θ_t
    continual: list[ContinualRun]
    encoder_sha256: str | None = None  # of the shipped encoder file, when the recipe starts from one


def build_zoo(recipe: Recipe, seed: int, cache: CheckpointCache, progress: bool, workers: int = 1) -> Zoo:
    """Make (or load from the cache) every checkpoint the three protocols need.

    Fine-tuning runs in ``workers`` processes; the checkpoints do not depend on their number.
    """
    tick = time.perf_counter()
    # a shipped encoder needs no pre-training images (24k of them for the full profile)
    tasks, pools = build_tasks(seed, recipe.sizes, list(recipe.tasks), pools=recipe.encoder is None)
    log.info("data ready in %.1f s", time.perf_counter() - tick)
    cl_task = continual_dataset(tasks)
    cfg = recipe.vit
    tick = time.perf_counter()
    digest = None
    if recipe.encoder is not None:  # start from the shipped encoder, as the paper starts from CLIP
        path = asset_path(recipe.encoder)
        pretrained, digest = load_encoder(path, cfg)
        pre_key = recipe_key("encoder", recipe=recipe.encoder, sha256=digest)
        log.info("pre-trained encoder %s (%s)", path.name, digest[:16])
    else:
        spec = recipe.pretraining(seed)
        pre_key = recipe_key("pretrain", recipe=spec)
        log.info("pre-trained encoder %s", pre_key)
        pretrained = cache.get_or_make(pre_key, partial(pretrain_encoder, spec, progress, pools))
    log.info("pre-trained encoder ready in %.1f s", time.perf_counter() - tick)
    shots = recipe.head_shots
    heads = {t.name: train.prototype_head(cfg, pretrained, t.train, t.n_classes, shots) for t in tasks}
    heads["continual"] = train.prototype_head(cfg, pretrained, cl_task.train, cl_task.n_classes, shots)
    scale = recipe.logit_scale
    ft_options = {
        # the data (and so the heads) a fine-tune sees: a shipped encoder's key does not hold them
        "data": {"seed": seed, "sizes": recipe.sizes, "tasks": recipe.tasks},
        "lr": recipe.ft_lr,
        "batch": recipe.ft_batch,
        "weight_decay": recipe.ft_weight_decay,
        "head_shots": recipe.head_shots,
    }

    def tune(
        start: StateDict, split: Split, head: Tensor, classes: list[int] | None, steps: int, seed: int
    ) -> StateDict:
        return train.fine_tune(
            cfg,
            start,
            split,
            head,
            classes=classes,
            steps=steps,
            lr=recipe.ft_lr,
            batch=recipe.ft_batch,
            weight_decay=recipe.ft_weight_decay,
            scale=scale,
            seed=seed,
        )

    cl_head = heads["continual"]
    # Every checkpoint is made by a job: a chain of links, each fine-tuned from the previous link's
    # state (the first from θ_pre). Jobs are independent, so they run in worker processes.
    jobs: list[list[Link]] = []
    task_jobs: list[int] = []
    for index, task in enumerate(tasks):
        key = recipe_key(
            "finetune", parent=pre_key, task=task.name, steps=recipe.ft_steps, scale=scale, **ft_options
        )

        def make_task(start: StateDict, task: Task = task, index: int = index) -> StateDict:
            return tune(start, task.train, heads[task.name], None, recipe.ft_steps, seed * 1000 + index)

        task_jobs.append(len(jobs))
        jobs.append([(key, make_task)])

    def cl_link(mode: str, parent: str, group: list[int], t: int) -> Link:
        key = recipe_key(
            f"continual-{mode}",
            parent=parent,
            classes=group,
            steps=recipe.cl_steps,
            scale=scale,
            **ft_options,
        )

        def make(start: StateDict) -> StateDict:
            return tune(start, cl_task.train, cl_head, group, recipe.cl_steps, seed * 1000 + 100 + t)

        return key, make

    layout: list[tuple[int, list[list[int]], int, list[int]]] = []
    for n_tasks in recipe.cl_splits:
        groups = class_incremental_splits(cl_task.n_classes, n_tasks, seed)
        chain: list[Link] = []
        parent = pre_key
        for t, group in enumerate(groups):  # sequential: θ_t from θ_{t-1}
            chain.append(cl_link("sequential", parent, group, t))
            parent = chain[-1][0]
        sequential = len(jobs)
        jobs.append(chain)
        individual = []
        for t, group in enumerate(groups):  # individual: every θ_t from θ_pre
            individual.append(len(jobs))
            jobs.append([cl_link("individual", pre_key, group, t)])
        layout.append((n_tasks, groups, sequential, individual))

    tick = time.perf_counter()
    states = _run_jobs(jobs, pretrained, cache, workers, progress)
    log.info(
        "%d fine-tuned checkpoints ready in %.1f s (%d workers)",
        sum(map(len, jobs)),
        time.perf_counter() - tick,
        workers,
    )
    finetuned = {task.name: states[i][0] for task, i in zip(tasks, task_jobs, strict=True)}
    continual = [
        ContinualRun(n_tasks, groups, states[seq], [states[i][0] for i in ind])
        for n_tasks, groups, seq, ind in layout
    ]
    return Zoo(recipe, seed, tasks, cl_task, pretrained, heads, finetuned, continual, digest)


def _run_jobs(
    jobs: list[list[Link]], start: StateDict, cache: CheckpointCache, workers: int, progress: bool
) -> list[list[StateDict]]:
    """Each job's states, loaded from the cache or made (longest chains first, in ``workers`` processes)."""

    def run(index: int) -> list[StateDict]:
        state, out = start, []
        for key, make in jobs[index]:
            state = cache.get_or_make(key, partial(make, state))
            out.append(state)
        return out

    keys = [key for job in jobs for key, _ in job]
    cached = {key for key in keys if cache.path(key).exists()}
    hits, misses = cache.hits + len(cached), cache.misses + len(keys) - len(cached)
    todo = [i for i, job in enumerate(jobs) if any(key not in cached for key, _ in job)]
    todo.sort(key=lambda i: -len(jobs[i]))
    states = {i: run(i) for i in set(range(len(jobs))) - set(todo)}
    bar = tqdm(total=len(todo), desc="fine-tune", disable=not progress or not todo, leave=False)
    for i, made in zip(todo, fork_map(lambda k: run(todo[k]), len(todo), workers), strict=True):
        states[i] = made
        bar.update(1)
    bar.close()
    cache.hits, cache.misses = hits, misses  # workers count in their own processes
    return [states[i] for i in range(len(jobs))]
