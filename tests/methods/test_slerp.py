"""slerp: the interpolation itself, its ends, the collinear fallback and mergekit's per-layer t."""

from __future__ import annotations

import math

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods.mergekit_steps import Conditional, layer_position, resolve
from weightweaving.methods.slerp import slerp


def test_orthogonal_unit_vectors_move_on_the_circle():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.0, 0.25, 0.5, 1.0):
        angle = t * math.pi / 2
        torch.testing.assert_close(slerp(t, v0, v1), torch.tensor([math.cos(angle), math.sin(angle)]))


def test_it_interpolates_the_directions_not_the_norms():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])  # Ω = 90°; sin Ω = 1
    want = math.sin(0.5 * math.pi / 2) * (v0 + v1)
    torch.testing.assert_close(slerp(0.5, v0, v1), want)


def test_nearly_collinear_vectors_are_lerped():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = 1.5 * v0  # |cos Ω| = 1 > 0.9995
    torch.testing.assert_close(slerp(0.3, v0, v1), 0.7 * v0 + 0.3 * v1)


def test_ends_give_the_base_and_the_model():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=gen)}
    tuned = {"w": torch.randn(6, 5, generator=gen)}
    at_0 = weightweaving.merge(base, [tuned], "slerp", t=0.0)
    at_1 = weightweaving.merge(base, [tuned], "slerp", t=1.0)
    torch.testing.assert_close(at_0["w"], base["w"])
    torch.testing.assert_close(at_1["w"], tuned["w"])


def test_exactly_one_fine_tuned_model():
    sd = {"w": torch.ones(2)}
    with pytest.raises(OptionError, match="method 'slerp' merges exactly 1 fine-tuned model, got 2"):
        weightweaving.merge(sd, [sd, sd], "slerp")


def test_gradients_and_filters_follow_mergekit():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 3) == 0.0
    assert layer_position("model.layers.2.mlp.up_proj.weight", 3) == 1.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert layer_position("model.embed_tokens.weight", 3) == 0.0
    assert resolve([0.0, 1.0, 0.5], "model.layers.1.x", 5) == pytest.approx(0.5)  # t = 1/4 → index 0.5
    assert resolve([0.0, 1.0, 0.5], "model.layers.3.x", 5) == pytest.approx(0.75)
    setting = [Conditional(filter="self_attn", value=[0.0, 1.0]), Conditional(value=0.3)]
    assert resolve(setting, "model.layers.1.self_attn.q_proj.weight", 2) == 1.0
    assert resolve(setting, "model.layers.1.mlp.up_proj.weight", 2) == 0.3


def test_a_gradient_needs_the_number_of_layers():
    sd = {"model.layers.0.w": torch.ones(2)}
    with pytest.raises(OptionError, match="a gradient over the layers needs 'layers'"):
        weightweaving.merge(sd, [{"model.layers.0.w": torch.zeros(2)}], "slerp", t=[0.0, 1.0])
