"""Named steps that several methods share, so that no method repeats another's lines."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def weighted_sum(task_vectors: Tensor, weights: Sequence[float] | None) -> Tensor:
    """Σ_t w_t Δ_t over the task axis (w_t = 1 when ``weights`` is None). (T, *s) -> (*s)."""
    if weights is None:
        return task_vectors.sum(0)
    w = torch.tensor(list(weights), dtype=task_vectors.dtype, device=task_vectors.device)
    return torch.tensordot(w, task_vectors, dims=1)


def mean_over_tasks(task_vectors: Tensor) -> Tensor:
    """mean_t Δ_t. (T, *s) -> (*s)."""
    return task_vectors.mean(0)


def check_weights(weights: Sequence[float] | None, num_tasks: int, method: str) -> None:
    from ..errors import OptionError

    if weights is not None and len(weights) != num_tasks:
        raise OptionError(
            f"method '{method}': 'weights' has {len(weights)} values but there are {num_tasks} fine-tuned models"
        )
