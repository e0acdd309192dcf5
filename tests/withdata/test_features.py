"""Forward hooks record exactly the inputs a manual forward computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightweaving.errors import WeightWeavingError
from weightweaving.suite.model import ViTConfig, build_model, state_dict_of
from weightweaving.withdata.features import gather_statistics, hookable_parameters


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


def perturbed(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in sd.items()
    }


def test_hooks_capture_the_manual_forward_inputs() -> None:
    torch.manual_seed(0)
    model = Tiny()
    base = state_dict_of(model)
    tasks = [perturbed(base, 1), perturbed(base, 2)]
    data = [torch.randn(5, 2, 4), torch.randn(3, 2, 4)]  # (exemplars, tokens, d_in)
    stats = gather_statistics(model, base, tasks, data, batch_size=2)
    assert stats.exemplars == [5, 3]
    assert stats.biases == {"fc1.bias", "norm.bias", "fc2.bias"}
    for t, (sd, x) in enumerate(zip(tasks, data, strict=True)):
        h = torch.relu(x @ sd["fc1.weight"].T + sd["fc1.bias"])
        normed = nn.functional.layer_norm(h, (6,))
        after = normed * sd["norm.weight"] + sd["norm.bias"]
        x1, x2 = x.reshape(-1, 4), after.reshape(-1, 6)
        torch.testing.assert_close(stats.grams["fc1.weight"][t], x1.T @ x1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.grams["fc2.weight"][t], x2.T @ x2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            stats.norm_squares["norm.weight"][t], normed.reshape(-1, 6).square().sum(0)
        )
    # the model's own weights are untouched
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_scale_runs_the_scaled_task_vector() -> None:
    torch.manual_seed(0)
    model = Tiny()
    base = state_dict_of(model)
    task = perturbed(base, 3)
    x = torch.randn(4, 4)
    stats = gather_statistics(model, base, [task], [x], scale=0.5)
    w = base["fc1.weight"] + 0.5 * (task["fc1.weight"] - base["fc1.weight"])
    b = base["fc1.bias"] + 0.5 * (task["fc1.bias"] - base["fc1.bias"])
    h = nn.functional.layer_norm(torch.relu(x @ w.T + b), (6,))
    torch.testing.assert_close(stats.norm_squares["norm.weight"][0], h.square().sum(0))


def test_suite_vit_attention_and_skipped_out_proj() -> None:
    config = ViTConfig(image_size=8, patch_size=4, width=8, layers=1, heads=2, mlp_ratio=2, embed_dim=4)
    model = build_model(config, seed=0)
    base = state_dict_of(model)
    task = perturbed(base, 4)
    images = torch.rand(3, 3, 8, 8)
    stats = gather_statistics(model, base, [task], [images])
    block = "transformer.resblocks.0"
    assert set(stats.grams) == {
        f"{block}.attn.in_proj_weight",
        f"{block}.mlp.c_fc.weight",
        f"{block}.mlp.c_proj.weight",
    }
    assert f"{block}.attn.out_proj" in stats.skipped
    assert f"{block}.attn.in_proj_bias" in stats.biases
    assert set(stats.norm_squares) == {
        "ln_pre.weight",
        f"{block}.ln_1.weight",
        f"{block}.ln_2.weight",
        "ln_post.weight",
    }
    # manual forward up to ln_1's output: the attention's input
    model.load_state_dict(task)
    with torch.no_grad():
        x = model.conv1(images - 0.5).flatten(2).transpose(1, 2)
        x = torch.cat([model.class_embedding.expand(3, 1, -1), x], dim=1) + model.positional_embedding
        h = model.transformer.resblocks[0].ln_1(model.ln_pre(x)).reshape(-1, 8)
    torch.testing.assert_close(stats.grams[f"{block}.attn.in_proj_weight"][0], h.T @ h, rtol=1e-5, atol=1e-5)


def test_no_hookable_layer_is_one_error() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    with pytest.raises(WeightWeavingError, match="no hookable layer"):
        hookable_parameters(model)


def test_missing_key_and_empty_task_are_errors() -> None:
    model = Tiny()
    base = state_dict_of(model)
    broken = {k: v for k, v in base.items() if k != "fc2.bias"}
    with pytest.raises(WeightWeavingError, match="fc2.bias"):
        gather_statistics(model, broken, [base], [torch.randn(2, 4)])
    with pytest.raises(WeightWeavingError, match="task 1 has no exemplars"):
        gather_statistics(model, base, [base, base], [torch.randn(2, 4), torch.randn(0, 4)])
