"""merge_with_data end to end: image folders, provenance, bad input as one error with nothing written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import weightweaving
from weightweaving.errors import WeightWeavingError
from weightweaving.suite.model import ViTConfig, build_model, state_dict_of

CONFIG = ViTConfig(image_size=8, patch_size=4, width=8, layers=1, heads=2, mlp_ratio=2, embed_dim=4)


def checkpoints() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = state_dict_of(build_model(CONFIG, seed=0))
    gen = torch.Generator().manual_seed(5)
    tasks = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    return base, tasks


def image_folder(root: Path, count: int, size: int = 8, mode: str = "RGB", seed: int = 0) -> Path:
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        channels = len(mode)
        pixels = torch.randint(0, 256, (size, size, channels), generator=gen, dtype=torch.uint8)
        array = pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy()
        Image.fromarray(array, mode=mode).save(root / f"{i}.png")
    return root


def test_cat_from_folders_records_the_data(tmp_path: Path) -> None:
    base, tasks = checkpoints()
    folders = [image_folder(tmp_path / "a", 4), image_folder(tmp_path / "b", 3, seed=1)]
    out = weightweaving.merge_with_data(
        base, tasks, "exemplar_projection", model=lambda: build_model(CONFIG, 0), data=folders,
        inputs_per_task=2, out=tmp_path / "out", seed=3, c=1,
    )  # fmt: skip
    assert isinstance(out, Path)
    record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
    assert record["method"] == "exemplar_projection" and record["uses_data"] is True
    data = record["data"]
    assert [d["available"] for d in data] == [4, 3] and [d["used"] for d in data] == [2, 2]
    for d, folder in zip(data, folders, strict=True):
        for f in d["files"]:
            assert f["sha256"] == hashlib.sha256((folder / f["path"]).read_bytes()).hexdigest()
    assert "transformer.resblocks.0.attn.out_proj" in record["not_hooked"]


def test_cat_with_c_zero_is_task_arithmetic_end_to_end() -> None:
    base, tasks = checkpoints()
    images = [torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8)]
    got = weightweaving.merge_with_data(
        base, tasks, "exemplar_projection", model=build_model(CONFIG, 0), data=images, c=0, lam=0.5
    )
    want = weightweaving.merge(base, tasks, method="task_arithmetic", lam=0.5)
    assert isinstance(got, dict) and isinstance(want, dict)
    assert all(torch.equal(got[k], want[k]) for k in want)
    projected = weightweaving.merge_with_data(
        base, tasks, "exemplar_projection", model=build_model(CONFIG, 0), data=images, c=2, lam=0.5
    )
    assert isinstance(projected, dict)
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(projected[name], want[name])


@pytest.mark.parametrize("method", ["adamerging", "cart_adamerging"])
def test_learned_methods_are_deterministic_bytes(tmp_path: Path, method: str) -> None:
    base, tasks = checkpoints()
    data = {"a": torch.rand(6, 3, 8, 8), "b": torch.rand(6, 3, 8, 8)}
    torch.manual_seed(0)
    heads = [nn.Linear(4, 3), nn.Linear(4, 5)]

    def run(where: str) -> Path:
        out = weightweaving.merge_with_data(
            base, tasks, method, model=build_model(CONFIG, 0), data=data, heads=heads, steps=3, lr=0.05,
            batch_size=2, out=tmp_path / where, seed=1,
        )  # fmt: skip
        assert isinstance(out, Path)
        return out

    first, second = run("x"), run("y")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    record = yaml.safe_load((first / "weightweaving_config.yaml").read_text())
    assert [d["task"] for d in record["data"]] == ["a", "b"]
    assert all(len(v) == 2 for v in record["coefficients"].values())


def test_cart_plus_plus_floor_keeps_every_coefficient_at_least_low(tmp_path: Path) -> None:
    base, tasks = checkpoints()
    data = {"a": torch.rand(6, 3, 8, 8), "b": torch.rand(6, 3, 8, 8)}
    torch.manual_seed(0)
    heads = [nn.Linear(4, 3), nn.Linear(4, 5)]

    def coefficients(**options: float) -> list[float]:
        out = weightweaving.merge_with_data(
            base, tasks, "cart_adamerging", model=build_model(CONFIG, 0), data=data, heads=heads, steps=8,
            lr=0.2, batch_size=2, out=tmp_path / str(sorted(options.items())), seed=1, **options,
        )  # fmt: skip
        assert isinstance(out, Path)
        record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
        assert record["bounds"] == [options.get("low", 0.0), 2.0]
        return [v for vs in record["coefficients"].values() for v in vs]

    free = coefficients(init=1.0)
    assert min(free) < 1.0  # entropy pulls some coefficient down when nothing holds it
    floored = coefficients(init=1.5, low=1.0)
    assert min(floored) >= 1.0 and max(floored) <= 2.0
    with pytest.raises(WeightWeavingError, match="low <= init"):
        coefficients(init=1.0, low=1.5)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "task 'task1': no such image folder"),
        ("empty", "task 'task1': the folder holds no images"),
        ("size", "expected 3 channel(s) 8x8"),
        ("channels", "image is 1 channel(s) 8x8; expected 3 channel(s) 8x8"),
        ("too_many", "task 'task1': 4 exemplars asked, only 2 exist"),
        ("no_hooks", "no hookable layer"),
    ],
)
def test_bad_input_is_one_error_and_nothing_written(tmp_path: Path, case: str, message: str) -> None:
    base, tasks = checkpoints()
    good = image_folder(tmp_path / "good", 4)
    other = tmp_path / "other"
    if case == "empty":
        other.mkdir()
    elif case == "size":
        image_folder(other, 2, size=6)
    elif case == "channels":
        image_folder(other, 2, mode="L")
    elif case in ("too_many", "no_hooks"):
        image_folder(other, 2)
    model: nn.Module = (
        nn.Sequential(nn.Conv2d(3, 3, 1, groups=3)) if case == "no_hooks" else build_model(CONFIG, 0)
    )
    out = tmp_path / "out"
    with pytest.raises(WeightWeavingError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        weightweaving.merge_with_data(
            base, tasks, "exemplar_projection", model=model, data=[good, other], inputs_per_task=4 if case == "too_many" else 2,
            input_shape=(3, 8, 8), out=out,
        )  # fmt: skip
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_cat_weaves_over_lambda_and_c() -> None:
    base, tasks = checkpoints()
    images = [torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8)]
    model = build_model(CONFIG, 0)
    woven = weightweaving.merge_with_data(
        base, tasks, "exemplar_projection", model=model, data=images, c=0, weave={"lambdas": [0.5, 1.0]}
    )
    want = weightweaving.weave(base, tasks, "task_arithmetic", lambdas=[0.5, 1.0])
    assert isinstance(woven, dict) and isinstance(want, dict)
    for k in want:
        torch.testing.assert_close(woven[k], want[k])
    over_c = weightweaving.merge_with_data(
        base,
        tasks,
        "exemplar_projection",
        model=model,
        data=images,
        weave={"lambdas": [0.5, 1.0], "search": {"c": [0, 2]}},
    )
    assert isinstance(over_c, dict)
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(over_c[name], woven[name])
    with pytest.raises(WeightWeavingError, match="weave option 'bogus'"):
        weightweaving.merge_with_data(
            base, tasks, "exemplar_projection", model=model, data=images, weave={"bogus": 1}
        )
