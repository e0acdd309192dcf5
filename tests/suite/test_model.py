"""The suite encoder's fast paths compute the module's function: inference (``encode``), the class-token-only
last block used in fine-tuning and AdaMerging, and evaluation restricted to the groups asked for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightweaving.suite import train
from weightweaving.suite.data import Split
from weightweaving.suite.model import ViTConfig, build_model, encode, functional_forward, state_dict_of

CONFIGS = [ViTConfig(), ViTConfig(width=32, layers=1, heads=2, mlp_ratio=2, embed_dim=16)]


def _perturbed(config: ViTConfig, seed: int) -> dict[str, torch.Tensor]:
    state = state_dict_of(build_model(config, seed))
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.mark.parametrize("config", CONFIGS)
def test_encode_equals_the_module_forward(config: ViTConfig) -> None:
    state = _perturbed(config, 3)
    model = build_model(config, 0).eval()
    model.load_state_dict(state)
    images = torch.rand(
        37, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5)
    )
    with torch.inference_mode():
        expected = model(images)
    got = encode(config, state, images)
    assert got.shape == expected.shape == (37, config.embed_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the class token depends on every other token: changing one patch changes the output
    changed = images.clone()
    changed[:, :, -config.patch_size :, -config.patch_size :] = 0.0
    assert not torch.allclose(encode(config, state, changed), got)
    # batching (EVAL_BATCH) does not change the embeddings beyond rounding
    torch.testing.assert_close(
        train.embed(config, state, images), F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-5
    )


FAST_PATHS = {
    # the module's last block on the class token only
    "class_token_only": lambda model, images: model(images, class_token_only=True),
    # the written-out forward that fine-tuning and AdaMerging differentiate
    "functional_forward": lambda model, images: functional_forward(
        model.config, dict(model.named_parameters()), images
    ),
}


@pytest.mark.parametrize("path", sorted(FAST_PATHS))
@pytest.mark.parametrize("config", CONFIGS)
def test_fast_forwards_have_the_modules_output_and_gradients(config: ViTConfig, path: str) -> None:
    model = build_model(config, 1)
    model.load_state_dict(_perturbed(config, 1))
    images = torch.rand(
        9, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(2)
    )
    full = model(images)
    full.square().sum().backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert set(expected) == {k for k, _ in model.named_parameters()}
    model.zero_grad()
    short = FAST_PATHS[path](model, images)
    short.square().sum().backward()
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_group_accuracies_read_only_the_groups_asked_for() -> None:
    config = CONFIGS[1]
    state = _perturbed(config, 4)
    gen = torch.Generator().manual_seed(6)
    labels = torch.arange(6).repeat(7)
    split = Split(torch.rand(len(labels), 3, 28, 28, generator=gen), labels)
    head = F.normalize(torch.randn(6, config.embed_dim, generator=gen), dim=-1)
    predicted = (train.embed(config, state, split.images) @ head.T).argmax(-1)
    groups = [[0, 1], [2], [3, 4, 5]]
    expected = [
        100.0 * float((predicted == labels)[torch.isin(labels, torch.tensor(g))].float().mean())
        for g in groups
    ]
    assert train.group_accuracies(config, state, split, head, groups) == pytest.approx(expected)
    assert train.group_accuracies(config, state, split, head, [[2]]) == pytest.approx([expected[1]])
    # a group with no test image is nan, as before
    assert torch.isnan(torch.tensor(train.group_accuracies(config, state, split, head, [[7]])[0]))
