"""AdaMerging, layer-wise (Yang et al., ICLR 2024; EnnengYang/AdaMerging) and CART++ — **uses data**.

One coefficient per task and per parameter tensor ("layer"), learned by minimising the mean entropy
of the merged model's predictions on unlabeled test inputs:
``θ_l = offset_l + Σ_t λ[t, l] · D_t,l``. AdaMerging: ``offset = θ_pre``, ``D_t = Δ_t`` (every
floating-point parameter). CART++: ``offset = θ_avg``, ``D_t = SVD_k(θ_t − θ_avg)`` for CART's
selected weight matrices only (every other parameter stays ``θ_avg``).

The directions are held once; only λ trains (Adam); each step forms the merged parameters functionally
and runs ``torch.func.functional_call`` (no model copies). Each step, for every task, draws
``batches_per_task`` batches of ``batch_size`` inputs without replacement (the authors' code: two
batches of 16 from a freshly shuffled loader), sums the per-batch mean entropies over tasks and
batches, steps Adam, then clamps λ into ``[low, high]``. Batch order comes from a generator seeded by
``seed``: the same seed gives the same coefficients, bit for bit, on the same device.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import WeightWeavingError
from ..methods.base import seed_for
from ..methods.cart import REFERENCE_SVD_INCLUDE
from ..methods.steps import low_rank, name_matches, thin_svd
from .features import Forward, default_forward, persistent_names

log = logging.getLogger("weightweaving")

Head = Callable[[Tensor], Tensor]


class Inputs(Protocol):
    """A task's unlabeled inputs: a tensor (N, ...), or anything sized that a tensor of indices selects
    a batch from (images read and preprocessed on demand)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Tensor, /) -> Tensor: ...


Loss = Callable[[Tensor], Tensor]


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax of (B, classes) logits."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


@dataclass
class Learned:
    """What training found: the merged state dict and the coefficients per parameter."""

    state_dict: dict[str, Tensor]
    coefficients: dict[str, list[float]]  # parameter name -> λ per task
    losses: list[float]  # the summed loss at each step (before the update)


def task_vector_directions(
    pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """AdaMerging's offset (θ_pre) and directions (Δ_t stacked, (T, *shape)) in float32."""
    offset = {k: v.float() if v.is_floating_point() else v for k, v in pretrained.items()}
    directions = {
        k: torch.stack([tuned[k].float() - v for tuned in finetuned])
        for k, v in offset.items()
        if v.is_floating_point()
    }
    return offset, directions


def cart_directions(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    *,
    rank_fraction: float = 0.08,
    svd_include: str = REFERENCE_SVD_INCLUDE,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """CART++'s offset (θ_avg) and directions (each task's rank-k centred vector) in float32."""
    offset: dict[str, Tensor] = {}
    directions: dict[str, Tensor] = {}
    for name, base in pretrained.items():
        if not base.is_floating_point():
            offset[name] = base
            continue
        tuned = torch.stack([sd[name].float() for sd in finetuned])
        average = tuned.mean(0)
        offset[name] = average
        if tuned.dim() == 3 and name_matches(svd_include, name):
            centered = tuned - average
            keep = max(1, int(rank_fraction * min(centered.shape[1:])))
            directions[name] = low_rank(*thin_svd(centered), keep)
    return offset, directions


def _outputs(
    model: nn.Module,
    params: dict[str, Tensor],
    drawn: list[tuple[int, Tensor]],
    forward: Forward,
    joint: bool,
) -> list[tuple[int, Tensor]]:
    """The model's output for each drawn batch: one forward over all of them, or one per batch."""
    shapes = {tuple(x.shape[1:]) for _, x in drawn}
    if joint and len(drawn) > 1 and len(shapes) == 1:
        out = forward(model, params, torch.cat([x for _, x in drawn]))
        if isinstance(out, Tensor) and len(out) == sum(len(x) for _, x in drawn):
            parts = out.split([len(x) for _, x in drawn])
            return [(t, part) for (t, _), part in zip(drawn, parts, strict=True)]
    return [(t, forward(model, params, x)) for t, x in drawn]


def learn_coefficients(
    model: nn.Module,
    offset: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    data: Sequence[Inputs],
    heads: Sequence[Head],
    *,
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 16,
    batches_per_task: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    prefix: str = "",
    loss: Loss = entropy,
    forward: Forward = default_forward,
    joint: bool = True,
    progress: bool | None = None,
) -> Learned:
    """Learn ``λ[t, l]`` for ``θ_l = offset_l + Σ_t λ[t, l]·directions_l[t]`` on unlabeled ``data``.

    Args:
        model: the architecture; its state dict keys, after ``prefix``, are the keys of ``offset``.
        data: unlabeled inputs per task, (n_t, ...); ``heads[t]`` maps the model's output to logits.
        loss: what is minimised per batch (default: the mean prediction entropy).
        joint: run a step's batches (every task's) through the model as one batch when their shapes
            allow and the output is a tensor; the loss is the same sum of per-batch losses (the model
            is in eval mode, so no layer mixes the samples), only faster for small models.
    """
    if len(data) != len(heads):
        raise WeightWeavingError(f"{len(data)} test-time data sets for {len(heads)} classifier heads")
    for t, inputs in enumerate(data):
        if len(inputs) == 0:
            raise WeightWeavingError(f"task {t} has no test-time inputs")
    if not directions:
        raise WeightWeavingError("no parameter has a direction to weigh: nothing to learn")
    dev = torch.device(device)
    num_tasks = len(heads)
    fixed: dict[str, Tensor] = {}
    for name in persistent_names(model):
        key = prefix + name
        if key not in offset:
            raise WeightWeavingError(f"the model's '{name}' is not in the checkpoints (looked for '{key}')")
        fixed[name] = offset[key].to(dev)
    local = {prefix + n: n for n in fixed}
    # parameters the model does not use (another tower) keep λ = init: no input reaches them
    names = sorted(k for k in directions if k in local)
    if not names:
        raise WeightWeavingError("no parameter of the model has a direction to weigh: nothing to learn")
    held = {name: directions[name].to(dev) for name in names}  # held once, never copied per step
    for name in names:
        if held[name].shape[0] != num_tasks:
            raise WeightWeavingError(f"'{name}' has {held[name].shape[0]} directions for {num_tasks} tasks")
    index = {name: i for i, name in enumerate(names)}
    lam = torch.full((num_tasks, len(names)), float(init), device=dev, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    generators = [torch.Generator().manual_seed(seed_for(seed, "adamerging", t)) for t in range(num_tasks)]
    frozen = [
        p for head in heads if isinstance(head, nn.Module) for p in head.parameters() if p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    try:
        for _ in tqdm(range(steps), desc="learning coefficients", disable=disable, leave=False):
            params = dict(fixed)
            for key, name in local.items():
                if key in index:
                    column = lam[:, index[key]]
                    params[name] = fixed[name] + torch.tensordot(column, held[key], dims=1)
            drawn: list[tuple[int, Tensor]] = []  # (task, batch of inputs)
            for t, inputs in enumerate(data):
                order = torch.randperm(len(inputs), generator=generators[t])
                for b in range(batches_per_task):
                    chosen = order[b * batch_size : (b + 1) * batch_size]
                    if len(chosen) == 0:
                        break
                    drawn.append((t, inputs[chosen].to(dev)))
            total = torch.zeros((), device=dev)
            for t, outputs in _outputs(model, params, drawn, forward, joint):
                total = total + loss(heads[t](outputs))
            losses.append(float(total.detach()))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            with torch.no_grad():
                lam.clamp_(*bounds)
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    final = lam.detach().cpu()
    coefficients = {
        name: final[:, index[name]].tolist() if name in index else [float(init)] * num_tasks
        for name in sorted(directions)
    }
    merged = {k: v.clone() for k, v in offset.items()}
    for name, values in coefficients.items():
        merged[name] = offset[name] + torch.tensordot(torch.tensor(values), directions[name].float(), dims=1)
    log.info(
        "learned %d coefficients over %d steps (final loss %.4g)",
        final.numel(),
        steps,
        losses[-1] if losses else float("nan"),
    )
    return Learned(state_dict=merged, coefficients=coefficients, losses=losses)
