"""The model zoo: the pre-trained encoder, frozen heads and every fine-tuned checkpoint, cached."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor
from tqdm.auto import tqdm

from . import train
from .cache import CheckpointCache, recipe_key
from .data import Split, Task, build_tasks, class_incremental_splits, continual_dataset
from .profiles import Recipe

log = logging.getLogger("weightweaving.suite")

StateDict = dict[str, Tensor]


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


def build_zoo(recipe: Recipe, seed: int, cache: CheckpointCache, progress: bool) -> Zoo:
    """Make (or load from the cache) every checkpoint the three protocols need."""
    tasks, pools = build_tasks(seed, recipe.sizes, list(recipe.tasks))
    cl_task = continual_dataset(tasks)
    cfg = recipe.vit
    pre_key = recipe_key(
        "pretrain",
        vit=cfg,
        sizes=recipe.sizes,
        tasks=recipe.tasks,
        epochs=recipe.pretrain_epochs,
        lr=recipe.pretrain_lr,
        batch=recipe.pretrain_batch,
        seed=seed,
        **({"contrastive": recipe.pretrain_contrastive} if recipe.pretrain_contrastive else {}),
    )
    log.info("pre-trained encoder %s", pre_key)

    def make_pretrained() -> StateDict:
        return train.pretrain(
            cfg,
            pools,
            epochs=recipe.pretrain_epochs,
            lr=recipe.pretrain_lr,
            batch=recipe.pretrain_batch,
            seed=seed,
            contrastive=recipe.pretrain_contrastive,
            progress=progress,
        )

    pretrained = cache.get_or_make(pre_key, make_pretrained)
    shots = recipe.head_shots
    heads = {t.name: train.prototype_head(cfg, pretrained, t.train, t.n_classes, shots) for t in tasks}
    heads["continual"] = train.prototype_head(cfg, pretrained, cl_task.train, cl_task.n_classes, shots)
    scale = recipe.logit_scale
    ft_options = {
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

    n_jobs = len(tasks) + 2 * sum(recipe.cl_splits)
    bar = tqdm(total=n_jobs, desc="fine-tune", disable=not progress, leave=False)
    finetuned: dict[str, StateDict] = {}
    for index, task in enumerate(tasks):
        key = recipe_key(
            "finetune", parent=pre_key, task=task.name, steps=recipe.ft_steps, scale=scale, **ft_options
        )

        def make_task(task: Task = task, index: int = index) -> StateDict:
            return tune(pretrained, task.train, heads[task.name], None, recipe.ft_steps, seed * 1000 + index)

        finetuned[task.name] = cache.get_or_make(key, make_task)
        bar.update(1)

    continual = []
    cl_head = heads["continual"]
    for n_tasks in recipe.cl_splits:
        groups = class_incremental_splits(cl_task.n_classes, n_tasks, seed)
        runs: dict[str, list[StateDict]] = {"sequential": [], "individual": []}
        for mode in runs:
            parent_key, start = pre_key, pretrained
            for t, group in enumerate(groups):
                key = recipe_key(
                    f"continual-{mode}",
                    parent=parent_key,
                    classes=group,
                    steps=recipe.cl_steps,
                    scale=scale,
                    **ft_options,
                )

                def make(start: StateDict = start, group: list[int] = group, t: int = t) -> StateDict:
                    return tune(start, cl_task.train, cl_head, group, recipe.cl_steps, seed * 1000 + 100 + t)

                state = cache.get_or_make(key, make)
                runs[mode].append(state)
                if mode == "sequential":
                    parent_key, start = key, state
                bar.update(1)
        continual.append(ContinualRun(n_tasks, groups, runs["sequential"], runs["individual"]))
    bar.close()
    return Zoo(recipe, seed, tasks, cl_task, pretrained, heads, finetuned, continual)
