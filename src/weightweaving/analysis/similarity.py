"""Pairwise cosine similarity of task vectors, whole model and per layer, streamed tensor by tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..api import open_job
from ..checkpoints.open import Source


@dataclass
class Similarity:
    """``model``: (T, T) cosine over the whole flattened model; ``per_layer``: name -> (T, T)."""

    model: Tensor
    per_layer: dict[str, Tensor]


def _cosine(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    return torch.where(denom > 0, gram / denom.clamp_min(1e-30), torch.zeros_like(gram))


def task_vector_similarity(
    pretrained: Source,
    finetuned: Sequence[Source],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool | None = None,
) -> Similarity:
    """Cosine similarity of every pair of task vectors Δ_i = θ_i − θ_pre (the paper's Figure 3).

    Args:
        pretrained, finetuned: checkpoints (paths or state dicts), as in :func:`weightweaving.merge`.
        include, exclude: regular expressions choosing the parameters that count.

    Returns:
        A :class:`Similarity`; only one (T, T) Gram matrix per parameter is ever held.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2)}
        >>> sim = task_vector_similarity(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}])
        >>> round(float(sim.model[0, 1]), 4)
        0.7071
    """
    job = open_job(
        pretrained,
        finetuned,
        device=device,
        dtype=None,
        compute_dtype=torch.float64,
        include=include,
        exclude=exclude,
        seed=0,
        common_only=False,
        allow_nonfinite=False,
        executor=None,
        workers=1,
        progress=progress,
    )
    try:

        def gram(task_vectors: Tensor, ctx: object) -> Tensor:
            flat = task_vectors.reshape(task_vectors.shape[0], -1)  # (T, n)
            return (flat @ flat.T).cpu()

        grams = job.runner.scan(gram, desc="similarity")
    finally:
        job.close()
    names = [u.name for u in job.runner.plan.merge_units]
    total = torch.stack(grams).sum(0)
    return Similarity(
        model=_cosine(total), per_layer={n: _cosine(g) for n, g in zip(names, grams, strict=True)}
    )
