"""Fast tests of the experiment suite's pieces, and one micro run end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import weightweaving
from weightweaving.suite import data, profiles
from weightweaving.suite.cache import CheckpointCache, recipe_key
from weightweaving.suite.merging import paper_grid
from weightweaving.suite.model import ViTConfig, build_model
from weightweaving.suite.run import run_suite
from weightweaving.suite.stability import seed_spread

SMALL = data.Sizes(train=30, test=20, pretrain=10)


def test_procedural_tasks_shapes_labels_and_determinism() -> None:
    names = ["shapes", "stripe_angle", "stripe_freq", "dot_count", "blob_position", "noise_spectrum"]
    tasks, pools = data.build_tasks(3, SMALL, names)
    again, _ = data.build_tasks(3, SMALL, names)
    other, _ = data.build_tasks(4, SMALL, names)
    for task, twin, different in zip(tasks, again, other, strict=True):
        assert task.train.images.shape == (30, 3, 28, 28)
        assert task.test.images.shape == (20, 3, 28, 28)
        assert task.train.images.dtype == torch.float32
        assert 0 <= float(task.train.images.min()) and float(task.train.images.max()) <= 1
        assert int(task.train.labels.min()) >= 0 and int(task.train.labels.max()) < task.n_classes
        assert torch.equal(task.train.images, twin.train.images)
        assert torch.equal(task.test.labels, twin.test.labels)
        assert not torch.equal(task.train.images, different.train.images)
        assert pools[task.name].shape == (10, 3, 28, 28)


def test_real_datasets_load() -> None:
    tasks, _ = data.build_tasks(0, SMALL, ["fashion", "digits"])
    fashion, digits = tasks
    assert fashion.n_classes == 10 and digits.n_classes == 10
    assert fashion.train.images.shape == (30, 3, 28, 28)
    assert digits.test.images.shape == (20, 3, 28, 28)
    joint = data.continual_dataset(tasks)
    assert joint.n_classes == 20
    assert int(joint.train.labels.max()) < 20 and len(joint.test) == 40


def test_digits_test_images_never_seen_by_the_encoder_whatever_the_seed() -> None:
    sizes = data.Sizes(train=2000, test=300, pretrain=3000)  # the shipped encoder's sizes
    (zero,), pools = data.build_tasks(0, sizes, ["digits"])
    (one,), _ = data.build_tasks(1, sizes, ["digits"])
    assert torch.equal(zero.test.images, one.test.images)  # one fixed test split
    assert not torch.equal(zero.train.images, one.train.images)  # other seeds shuffle the rest
    assert torch.allclose(zero.train.images.sum(0), one.train.images.sum(0))  # ... the same images
    seen = {bytes(image.numpy()) for image in pools["digits"]}
    assert len(seen) > 1000 and not any(bytes(image.numpy()) in seen for image in one.test.images)


def test_missing_fashion_mnist_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(weightweaving.WeightWeavingError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion(tmp_path)


def test_class_incremental_splits_are_disjoint_and_complete() -> None:
    for n in (5, 10):
        groups = data.class_incremental_splits(20, n, seed=0)
        assert len(groups) == n
        flat = [c for g in groups for c in g]
        assert sorted(flat) == list(range(20))
        assert groups == data.class_incremental_splits(20, n, seed=0)


def test_model_parameter_names_mirror_clip() -> None:
    model = build_model(ViTConfig(width=32, layers=2, heads=2, embed_dim=16), seed=0)
    names = set(model.state_dict())
    clip_names = {
        "conv1.weight",
        "class_embedding",
        "positional_embedding",
        "ln_pre.weight",
        "ln_pre.bias",
        "ln_post.weight",
        "ln_post.bias",
        "proj",
    }
    for i in range(2):
        prefix = f"transformer.resblocks.{i}."
        clip_names |= {
            prefix + s
            for s in (
                "attn.in_proj_weight",
                "attn.in_proj_bias",
                "attn.out_proj.weight",
                "attn.out_proj.bias",
                "ln_1.weight",
                "ln_1.bias",
                "mlp.c_fc.weight",
                "mlp.c_fc.bias",
                "mlp.c_proj.weight",
                "mlp.c_proj.bias",
                "ln_2.weight",
                "ln_2.bias",
            )
        }
    assert names == clip_names
    state = model.state_dict()
    assert state["conv1.weight"].shape == (32, 3, 7, 7)
    assert state["positional_embedding"].shape == (17, 32)
    assert state["transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert state["proj"].shape == (32, 16)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 16)


def test_cache_key_follows_the_recipe(tmp_path: Path) -> None:
    recipe = profiles.PROFILES["quick"]
    key = recipe_key("pretrain", vit=recipe.vit, epochs=recipe.pretrain_epochs, seed=0)
    assert key == recipe_key("pretrain", vit=recipe.vit, epochs=recipe.pretrain_epochs, seed=0)
    assert key != recipe_key("pretrain", vit=recipe.vit, epochs=recipe.pretrain_epochs + 1, seed=0)
    assert key != recipe_key(
        "pretrain", vit=dataclasses.replace(recipe.vit, width=48), epochs=recipe.pretrain_epochs, seed=0
    )
    assert key != recipe_key("pretrain", vit=recipe.vit, epochs=recipe.pretrain_epochs, seed=1)
    cache = CheckpointCache(tmp_path)
    made = []

    def make() -> dict[str, torch.Tensor]:
        made.append(1)
        return {"w": torch.arange(3.0)}

    first = cache.get_or_make(key, make)
    second = cache.get_or_make(key, make)
    assert len(made) == 1 and torch.equal(first["w"], second["w"])
    assert (cache.hits, cache.misses) == (1, 1)


def test_paper_grid_includes_both_ends_and_lambda_one() -> None:
    assert paper_grid("task_arithmetic", "multitask") == [round(0.1 * i, 10) for i in range(1, 11)]
    coarse = paper_grid("task_arithmetic", "continual", stride=4)
    assert coarse[0] == 0.1 and coarse[-1] == 1.0


def _micro(tmp_path: Path, out: str, cache: str, workers: int) -> Path:
    return run_suite(
        profile="micro",
        seed=0,
        out=tmp_path / out,
        cache_dir=tmp_path / cache,
        progress=False,
        workers=workers,
    )


def test_micro_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _micro(tmp_path, "runs", "cache", workers=2)
    payload = json.loads((folder / "results.json").read_text())
    results = payload  # setups at the top level, beside "diagnostics" and "meta"
    for setup in ("multitask", "continual", "domain"):
        for baseline in ("zero_shot", "individual"):
            assert isinstance(results[setup][baseline]["average"], float)
        for method in profiles.PROFILES["micro"].methods:
            for variant in ("tuned", "data_free", "weave"):
                entry = results[setup][method][variant]
                assert set(entry["per_task"]) == set(results[setup]["zero_shot"]["per_task"])
                assert 0 <= entry["average"] <= 100
            assert "lam" in results[setup][method]["tuned"]
    assert set(results["continual"]["zero_shot"]["per_task"]) == {"split5"}
    # the methods that use data: multi-task only, apart from the data-free methods
    multitask = results["multitask"]
    for method in ("exemplar_projection", "adamerging", "cart_adamerging"):
        assert multitask[method]["uses_data"] is True
        assert set(multitask[method]["default"]["per_task"]) == set(multitask["zero_shot"]["per_task"])
        assert 0 <= multitask[method]["default"]["average"] <= 100
        assert method not in results["domain"]
    assert (
        multitask["exemplar_projection"]["tuned"]["lam"]
        in multitask["exemplar_projection"]["sweep"]["lambdas"]
    )
    assert list(multitask["exemplar_projection"]["exemplars_curve"]["average"]) == ["1", "2", "4", "8", "16"]
    assert "## Uses data (multi-task; not data-free)" in (folder / "report.md").read_text()
    assert (folder / "report.md").read_text().startswith("# weightweaving suite")
    for png in (
        "sweeps.png",
        "best_lambda_hist.png",
        "cosine.png",
        "interference.png",
        "with_data_exemplars.png",
    ):
        assert (folder / png).stat().st_size > 0
    assert "task_arithmetic" in capsys.readouterr().out
    first_meta = json.loads((folder / "config.json").read_text())
    assert first_meta["cache"]["hits"] == 0 and first_meta["cache"]["misses"] > 0

    def same_results(run: Path) -> bool:
        payload = json.loads((run / "results.json").read_text())
        return payload == {**results, "timings": payload["timings"], "meta": payload["meta"]}

    # a second run, in one process, finds every checkpoint in the cache and scores the same
    again = _micro(tmp_path, "runs", "cache", workers=1)
    meta = json.loads((again / "config.json").read_text())
    assert meta["cache"] == {"hits": first_meta["cache"]["misses"], "misses": 0}
    assert same_results(again)
    # training in one process from nothing gives the same checkpoints as two workers did
    serial = _micro(tmp_path, "serial", "cache1", workers=1)
    assert same_results(serial)
    spread = seed_spread([folder, again], tmp_path / "spread")
    assert "| multitask | zero_shot |" in spread.read_text()


def test_report_names_tuned_lambdas_at_the_ends_of_the_grid() -> None:
    from weightweaving.suite.report import _grid_edges

    def entry(lam: float) -> dict[str, object]:
        return {"tuned": {"lam": lam}, "sweep": {"lambdas": [0.1, 0.5, 1.0]}}

    results = {
        "multitask": {"zero_shot": {}, "ties": entry(0.5), "tsv": entry(1.0)},
        "continual": {"ties": entry(0.1), "tsv": entry(0.5)},
    }
    assert _grid_edges(results, ["multitask", "continual"]) == [
        "multi-task: tsv 1.0",
        "continual learning: ties 0.1",
    ]
    assert _grid_edges({"multitask": {"ties": entry(0.5)}}, ["multitask"]) == []


def test_report_says_whether_the_seed_was_used_to_choose_the_recipe() -> None:
    from weightweaving.suite.report import _seed_line

    assert _seed_line({"seed": 1, "recipe_tuned_on_seeds": [0, 1, 2]}).startswith(
        "The recipe was chosen looking at seeds 0, 1, 2: this run is one of them"
    )
    assert _seed_line({"seed": 3, "recipe_tuned_on_seeds": [0]}).endswith("seed 3 is an independent check.")
