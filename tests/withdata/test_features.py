"""Forward hooks record exactly the inputs a manual forward computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from weightweaving.errors import WeightWeavingError
from weightweaving.methods import UnitContext, get_method
from weightweaving.methods.exemplar_projection import STATISTICS
from weightweaving.suite.model import ViTConfig, build_model, state_dict_of
from weightweaving.withdata.features import (
    ExemplarStatistics,
    LayerGrams,
    _Recorder,
    gather_statistics,
    hookable_parameters,
    task_parameters,
)


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
        "conv1.weight",  # the patch embedding: a linear map of its patches
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
    # the patch embedding's Gram: the non-overlapping 4x4 patches of (images - 0.5), C·kh·kw each
    patches = (images - 0.5).unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 2, 4, 4)
    rows = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * 4 * 4)
    torch.testing.assert_close(stats.grams["conv1.weight"][0], rows.T @ rows, rtol=1e-5, atol=1e-5)


class Convolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2))
        self.depthwise = nn.Conv2d(3, 3, 1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.conv(x))


def test_a_convolution_is_recorded_as_a_linear_map_of_its_patches() -> None:
    torch.manual_seed(0)
    model = Convolutional()
    base = state_dict_of(model)
    task = perturbed(base, 5)
    images = torch.randn(4, 2, 5, 6)
    stats = gather_statistics(model, base, [task], [images])
    assert set(stats.grams) == {"conv.weight"}  # the grouped convolution is not hooked
    assert stats.biases == {"conv.bias"}
    assert "depthwise" in stats.skipped
    # manual im2col: the conv's output is weight.flatten(1) applied to each patch column
    pad = nn.functional.pad(images, (1, 1, 1, 1))
    columns = []
    for i in range(0, pad.shape[2] - 3 + 1, 2):  # kernel height 3, stride 2, dilation 1
        for j in range(0, pad.shape[3] - 3 + 1, 1):  # kernel width 2 with dilation 2 spans 3
            columns.append(pad[:, :, i : i + 3, j : j + 3 : 2].reshape(4, -1))
    rows = torch.cat(columns)  # (positions × exemplars, C·kh·kw)
    torch.testing.assert_close(stats.grams["conv.weight"][0], rows.T @ rows, rtol=1e-5, atol=1e-5)
    out = nn.functional.conv2d(images, task["conv.weight"], task["conv.bias"], (2, 1), 1, (1, 2))
    by_columns = torch.stack(columns, 1) @ task["conv.weight"].flatten(1).T + task["conv.bias"]
    torch.testing.assert_close(by_columns, out.flatten(2).transpose(1, 2))  # same order as unfold


def test_no_hookable_layer_is_one_error() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Embedding(3, 2))
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


def one_pass_statistics(
    model: nn.Module,
    base: dict[str, torch.Tensor],
    tasks: list[dict[str, torch.Tensor]],
    data: list[torch.Tensor],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """The former implementation: one pass per task recording every layer's Grams at once."""
    model.eval()
    per_task = []
    for sd, x in zip(tasks, data, strict=True):
        params = task_parameters(model, base, sd, scale=1.0, device=torch.device("cpu"), prefix="")
        recorder = _Recorder(model, "")
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                functional_call(model, params, (x[start : start + batch_size],))
        recorder.close()
        per_task.append(recorder.grams)
    return {k: torch.stack([g[k] for g in per_task]) for k in per_task[0]}


def test_one_layer_at_a_time_gives_the_one_pass_grams_and_the_same_merge() -> None:
    config = ViTConfig(image_size=8, patch_size=4, width=8, layers=2, heads=2, mlp_ratio=2, embed_dim=4)
    model = build_model(config, seed=0)
    base = state_dict_of(model)
    tasks = [perturbed(base, 5), perturbed(base, 6), perturbed(base, 7)]
    data = [torch.rand(5, 3, 8, 8), torch.rand(3, 3, 8, 8), torch.rand(4, 3, 8, 8)]
    reference = one_pass_statistics(model, base, tasks, data, batch_size=2)
    stats = gather_statistics(model, base, tasks, data, batch_size=2)
    grams = stats.grams
    assert isinstance(grams, LayerGrams) and grams.held == [] and set(grams) == set(reference)
    for key in reference:  # bit for bit: the same batches, the same order of accumulation
        assert torch.equal(grams[key], reference[key])
        assert grams.held == [key]  # only the layer asked for last is in memory
    assert grams.gathered == list(reference)
    # CAT Merging on the lazy statistics is the merge on the one-pass statistics, tensor for tensor
    method = get_method("exemplar_projection")
    p = method.parse_params({"c": 2})
    eager = ExemplarStatistics(
        grams=reference, norm_squares=stats.norm_squares, biases=stats.biases, exemplars=stats.exemplars
    )
    for name in base:
        tv = torch.stack([sd[name] - base[name] for sd in tasks])
        lazy_out = method.merge_unit(tv, p, 1.0, UnitContext(name=name, extras={STATISTICS: stats}))
        eager_out = method.merge_unit(tv, p, 1.0, UnitContext(name=name, extras={STATISTICS: eager}))
        assert torch.equal(lazy_out, eager_out), name


def test_a_layer_pass_stops_after_the_layer() -> None:
    torch.manual_seed(0)
    model = Tiny()
    base = state_dict_of(model)
    seen: list[str] = []
    model.fc2.register_forward_pre_hook(lambda mod, args: seen.append("fc2"))
    stats = gather_statistics(model, base, [perturbed(base, 1)], [torch.randn(4, 4)], batch_size=2)
    assert seen == ["fc2", "fc2"]  # the first pass (norm statistics, calls): two batches
    stats.grams["fc1.weight"]
    assert seen == ["fc2", "fc2"]  # fc1's pass stops at fc1
    stats.grams["fc2.weight"]
    assert seen == ["fc2"] * 4 and stats.grams.held == ["fc2.weight"]
