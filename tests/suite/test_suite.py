"""Fast tests of the experiment suite's pieces, and one micro run end to end."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

import weightweaving
from weightweaving.suite import data, profiles, train
from weightweaving.suite.cache import CheckpointCache, recipe_key
from weightweaving.suite.merging import paper_grid
from weightweaving.suite.model import ViTConfig, build_model
from weightweaving.suite.parallel import fork_map, ray_map
from weightweaving.suite.run import run_suite
from weightweaving.suite.stability import seed_spread
from weightweaving.suite.zoo import ContinualRun, Zoo

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
    # the methods that use data, apart from the data-free methods, where each protocol allows them
    multitask = results["multitask"]
    for setup in ("multitask", "continual", "domain"):
        for method in ("exemplar_projection", "adamerging", "cart_adamerging"):
            if setup == "domain" and method != "exemplar_projection":
                assert method not in results[setup]  # domain: the held-out task's data is unseen
                continue
            entry = results[setup][method]
            assert entry["uses_data"] is True
            assert set(entry["default"]["per_task"]) == set(results[setup]["zero_shot"]["per_task"])
            assert 0 <= entry["default"]["average"] <= 100
    assert (
        multitask["exemplar_projection"]["tuned"]["lam"]
        in multitask["exemplar_projection"]["sweep"]["lambdas"]
    )
    assert list(multitask["exemplar_projection"]["exemplars_curve"]["average"]) == ["1", "2", "4", "8", "16"]
    assert "## Uses data (not data-free)" in (folder / "report.md").read_text()
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


def _random_zoo(n_tasks: int = 3, n_test: int = 30) -> Zoo:
    """A zoo of random tiny encoders and heads (no training): enough to score methods on."""
    recipe = dataclasses.replace(
        profiles.PROFILES["micro"], methods=("ties",), grid_stride=5, with_data=False
    )
    cfg = recipe.vit
    gen = torch.Generator().manual_seed(3)
    pretrained = {k: v.detach().clone() for k, v in build_model(cfg, 0).state_dict().items()}

    def tuned() -> dict[str, torch.Tensor]:
        return {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in pretrained.items()}

    def task(name: str, n_classes: int) -> data.Task:
        split = data.Split(torch.randn(n_test, 3, 28, 28, generator=gen), torch.arange(n_test) % n_classes)
        return data.Task(name, [str(c) for c in range(n_classes)], split, split)

    tasks = [task(f"t{i}", 3) for i in range(n_tasks)]
    heads = {t.name: torch.randn(3, cfg.embed_dim, generator=gen) for t in tasks}
    cl_head = torch.randn(4, cfg.embed_dim, generator=gen)
    run = ContinualRun(
        "cl", 2, [[0, 1], [2, 3]], [tuned(), tuned()], [tuned(), tuned()], task("cl", 4), cl_head
    )
    return Zoo(recipe, 0, tasks, pretrained, heads, {t.name: tuned() for t in tasks}, [run])


def test_executor_ray_scores_one_task_per_lambda_point(ray_cluster) -> None:
    """The Ray path splits every (setup, method) sweep into its points and folds them as a local run."""
    from weightweaving.suite import run

    zoo = _random_zoo()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_suite does (and ray_map's tasks)
    try:
        with train.flush_denormals():
            local = run._score(zoo, ["ties"], functools.partial(fork_map, workers=1), 1, False)
            sizes: list[int] = []

            def mapper(job, n):
                sizes.append(n)
                return ray_map(job, n, ray_cluster)

            remote = run._score(zoo, ["ties"], mapper, 1, False, per_point=True)
    finally:
        torch.set_num_threads(threads)
    assert remote[:2] == local[:2]  # results and diagnostics (not the timings)
    # the scores differ from point to point: a point folded at the wrong λ or pool would show
    sweep = local[0]["multitask"]["ties"]["sweep"]["per_task"]["t0"]
    assert len(set(sweep)) > 1
    # one task per point: multi-task has one problem, domain one per held-out task, continual one
    results = local[0]
    points = sum(
        n * (len(results[s]["ties"]["sweep"]["lambdas"]) + len(results[s]["ties"]["weave_pools"]))
        for s, n in (("multitask", 1), ("domain", 3), ("continual", 1))
    )
    baselines = 2  # multi-task (domain generalisation shares it) and continual
    assert sizes[0] == points + len(zoo.recipe.interference_lams) + len(zoo.continual) + baselines
