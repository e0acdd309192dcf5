"""model_stock: the ratio t from the angle between task vectors (Model Stock, ECCV 2024, eq. 5)."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError


def merged(base, deltas, **hyper):
    tuned = [{"w": base["w"] + d} for d in deltas]
    return weightweaving.merge(base, tuned, "model_stock", **hyper)["w"]


def test_orthogonal_task_vectors_keep_the_base():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    got = merged(base, [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])])  # cos = 0 → t = 0
    torch.testing.assert_close(got, base["w"])


def test_equal_task_vectors_give_their_mean():
    base = {"w": torch.zeros(3)}
    delta = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(merged(base, [delta, delta]), delta)  # cos = 1 → t = 1


def test_three_models_by_hand():
    base = {"w": torch.zeros(2)}
    deltas = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])]
    cos = (2**-0.5 + 0.0 + 2**-0.5) / 3
    t = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(merged(base, deltas), t * torch.stack(deltas).mean(0))


def test_filter_wise_takes_one_angle_per_row():
    base = {"w": torch.zeros(2, 2)}
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    second = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # row 0 orthogonal (t = 0), row 1 equal (t = 1)
    got = merged(base, [first, second], filter_wise=True)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


def test_needs_two_fine_tuned_models():
    sd = {"w": torch.ones(2)}
    with pytest.raises(OptionError, match="method 'model_stock' merges at least 2 fine-tuned models, got 1"):
        weightweaving.merge(sd, [sd], "model_stock")
