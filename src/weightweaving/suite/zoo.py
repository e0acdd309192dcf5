"""The model zoo: the pre-trained encoder, frozen heads and every fine-tuned checkpoint, cached."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor
from tqdm.auto import tqdm

from . import train
from .cache import CheckpointCache, recipe_key
from .data import CL_BENCHMARKS, Split, Task, build_tasks, class_incremental_splits, continual_dataset
from .encoder import asset_path, load_encoder, pretrain_encoder
from .parallel import fork_map
from .profiles import CL_HEADS, Recipe

log = logging.getLogger("weightweaving.suite")

StateDict = dict[str, Tensor]
Link = tuple[str, Callable[[StateDict], StateDict]]  # (cache key, make from the previous state)


@dataclass
class ContinualRun:
    """One class-incremental split of a benchmark: N class groups fine-tuned in sequence (and one by
    one from θ_pre, where the recipe makes those)."""

    benchmark: str  # the continual dataset's name, e.g. "fashion+digits"
    n_tasks: int
    class_groups: list[list[int]]
    sequential: list[StateDict]  # θ_t fine-tuned from θ_{t-1}
    individual: list[StateDict] | None  # θ_t fine-tuned from θ_pre (None: not made)
    task: Task  # the benchmark's data
    head: Tensor  # one head over all of its classes

    @property
    def key(self) -> str:
        """The name of this split in the results (``split5`` for the first benchmark, as before)."""
        return f"split{self.n_tasks}" if self.first else f"{self.benchmark}/split{self.n_tasks}"

    first: bool = True


@dataclass
class Zoo:
    recipe: Recipe
    seed: int
    tasks: list[Task]
    pretrained: StateDict
    heads: dict[str, Tensor]  # task name -> (C, embed_dim); "continual:<benchmark>" for those heads
    finetuned: dict[str, StateDict]  # task name -> θ_t
    continual: list[ContinualRun]
    encoder_sha256: str | None = None  # of the shipped encoder file, when the recipe starts from one
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {"wall", "cpu"} seconds


def build_zoo(recipe: Recipe, seed: int, cache: CheckpointCache, progress: bool, workers: int = 1) -> Zoo:
    """Make (or load from the cache) every checkpoint the three protocols need.

    Fine-tuning runs in ``workers`` processes; the checkpoints do not depend on their number.
    """
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    tick = start_wall
    # a shipped encoder needs no pre-training images (24k of them for the full profile)
    tasks, pools = build_tasks(
        seed, recipe.sizes, list(recipe.tasks), pools=recipe.encoder is None, workers=workers
    )
    log.info("data ready in %.1f s", time.perf_counter() - tick)
    benchmarks = [CL_BENCHMARKS[name] for name in recipe.cl_benchmarks]
    cl_tasks = [continual_dataset(tasks, b.domains, b.clutter, seed) for b in benchmarks]
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
    for cl_task in cl_tasks:
        heads[f"continual:{cl_task.name}"] = train.prototype_head(
            cfg, pretrained, cl_task.train, cl_task.n_classes, shots
        )
    scale = recipe.logit_scale
    ft_options = {
        # the data (and so the heads) a fine-tune sees: a shipped encoder's key does not hold them
        "data": {"seed": seed, "sizes": recipe.sizes, "tasks": recipe.tasks},
        "lr": recipe.ft_lr,
        "batch": recipe.ft_batch,
        "weight_decay": recipe.ft_weight_decay,
        "head_shots": recipe.head_shots,
    }

    cl_lr = recipe.cl_lr if recipe.cl_lr is not None else recipe.ft_lr
    cl_batch = recipe.cl_batch if recipe.cl_batch is not None else recipe.ft_batch

    def tune(
        start: StateDict,
        split: Split,
        head: Tensor,
        classes: list[int] | None,
        steps: int,
        seed: int,
        head_classes: list[int] | None = None,
    ) -> StateDict:
        continual = classes is not None
        return train.fine_tune(
            cfg,
            start,
            split,
            head,
            classes=classes,
            head_classes=head_classes,
            steps=steps,
            lr=cl_lr if continual else recipe.ft_lr,
            batch=cl_batch if continual else recipe.ft_batch,
            weight_decay=recipe.ft_weight_decay,
            scale=scale,
            seed=seed,
        )

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

    cl_options = {**ft_options, "lr": cl_lr, "batch": cl_batch, "head": recipe.cl_head}
    spec_of = {t.name: b for t, b in zip(cl_tasks, benchmarks, strict=True)}

    def cl_link(
        mode: str, parent: str, cl_task: Task, group: list[int], rows: list[int], t: int, steps: int
    ) -> Link:
        key = recipe_key(
            f"continual-{mode}",
            parent=parent,
            benchmark=cl_task.name,
            benchmark_spec=spec_of[cl_task.name],
            classes=group,
            head_classes=rows,
            steps=steps,
            scale=scale,
            **cl_options,
        )
        head = heads[f"continual:{cl_task.name}"]

        def make(start: StateDict) -> StateDict:
            return tune(start, cl_task.train, head, group, steps, seed * 1000 + 100 + t, rows)

        return key, make

    if recipe.cl_head not in CL_HEADS:
        raise ValueError(f"cl_head must be one of {', '.join(CL_HEADS)}, not {recipe.cl_head!r}")
    layout: list[tuple[Task, int, list[list[int]], int, list[int] | None]] = []
    for cl_task in cl_tasks:
        for n_tasks in recipe.cl_splits:
            groups = class_incremental_splits(cl_task.n_classes, n_tasks, seed)
            # the same passes over each task's data whatever the split: a task's data shrinks with N
            steps = max(1, round(recipe.cl_sequence_steps / n_tasks))
            everything = list(range(cl_task.n_classes))
            chain: list[Link] = []
            seen: list[int] = []
            parent = pre_key
            for t, group in enumerate(groups):  # sequential: θ_t from θ_{t-1}
                seen = sorted([*seen, *group])
                rows = {"group": group, "seen": seen, "all": everything}[recipe.cl_head]
                chain.append(cl_link("sequential", parent, cl_task, group, rows, t, steps))
                parent = chain[-1][0]
            sequential = len(jobs)
            jobs.append(chain)
            individual: list[int] | None = None
            if recipe.cl_individual and (
                recipe.cl_individual_splits is None or n_tasks in recipe.cl_individual_splits
            ):
                individual = []
                for t, group in enumerate(groups):  # individual: every θ_t from θ_pre, its own classes
                    individual.append(len(jobs))
                    rows = everything if recipe.cl_head == "all" else group
                    jobs.append([cl_link("individual", pre_key, cl_task, group, rows, t, steps)])
            layout.append((cl_task, n_tasks, groups, sequential, individual))

    timings = {"data, encoder, heads": _since(start_wall, start_cpu)}
    tick = time.perf_counter()
    states, ft_cpu = _run_jobs(jobs, pretrained, cache, workers, progress)
    timings["fine-tuning"] = {"wall": round(time.perf_counter() - tick, 1), "cpu": round(ft_cpu, 1)}
    log.info(
        "%d fine-tuned checkpoints ready in %.1f s (%d workers, %.1f CPU s)",
        sum(map(len, jobs)),
        time.perf_counter() - tick,
        workers,
        ft_cpu,
    )
    finetuned = {task.name: states[i][0] for task, i in zip(tasks, task_jobs, strict=True)}
    continual = [
        ContinualRun(
            cl_task.name,
            n_tasks,
            groups,
            states[seq],
            None if ind is None else [states[i][0] for i in ind],
            cl_task,
            heads[f"continual:{cl_task.name}"],
            first=cl_task.name == cl_tasks[0].name,
        )
        for cl_task, n_tasks, groups, seq, ind in layout
    ]
    return Zoo(recipe, seed, tasks, pretrained, heads, finetuned, continual, digest, timings)


def _since(wall: float, cpu: float) -> dict[str, float]:
    return {"wall": round(time.perf_counter() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}


def _run_jobs(
    jobs: list[list[Link]], start: StateDict, cache: CheckpointCache, workers: int, progress: bool
) -> tuple[list[list[StateDict]], float]:
    """Each job's states, loaded from the cache or made (longest chains first, in ``workers`` processes),
    and the CPU seconds the jobs took (summed over the processes)."""
    cpu = 0.0

    def timed(index: int) -> tuple[list[StateDict], float]:
        tick = time.process_time()
        states = run(index)
        return states, time.process_time() - tick

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
    tick = time.process_time()
    states = {i: run(i) for i in set(range(len(jobs))) - set(todo)}
    cpu += time.process_time() - tick
    bar = tqdm(total=len(todo), desc="fine-tune", disable=not progress or not todo, leave=False)
    for i, (made, seconds) in zip(todo, fork_map(lambda k: timed(todo[k]), len(todo), workers), strict=True):
        states[i] = made
        cpu += seconds
        bar.update(1)
    bar.close()
    cache.hits, cache.misses = hits, misses  # workers count in their own processes
    return [states[i] for i in range(len(jobs))], cpu
