"""``reproduce`` end to end on tiny CLIP fine-tunes made with ``finetune``; resume; agreement with merge + evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.models.tiny_clip import image_folder
from weightweaving.cli import main

FT = ["--steps", "6", "--warmup", "1", "--lr", "3e-3", "--batch-size", "8"]


@pytest.fixture(scope="module")
def run(clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reproduce")
    paths: dict[str, Path] = {"root": root}
    for kind in ("colour", "shape"):
        image_folder(root / f"{kind}-train", per_class=3, seed=5, kind=kind)
        paths[kind] = image_folder(root / f"{kind}-test", per_class=3, seed=6, kind=kind)
        task = f"{kind}={root / f'{kind}-train'}"
        assert (
            main(
                ["finetune", "--model", str(clip_dir), "--task", task, *FT, "--out", str(root / f"ft-{kind}")]
            )
            == 0
        )
    # continual: the colour fine-tune, then fine-tuned further on shapes (sequential, in order)
    task = f"shape={root / 'shape-train'}"
    assert (
        main(
            ["finetune", "--model", str(root / "ft-colour"), "--task", task, *FT, "--out", str(root / "seq2")]
        )
        == 0
    )
    config = {
        "base": str(clip_dir),
        "tasks": {
            "colour": {"data": "colour-test", "checkpoint": "ft-colour"},
            "shape": {"data": "shape-test", "checkpoint": "ft-shape"},
        },
        "continual": [
            {
                "name": "colours2",
                "data": "colour-test",
                "checkpoints": ["ft-colour", "seq2"],
                # task-aware individual baseline: each task's own model on its classes (a name or an index)
                "individual": ["ft-colour", "ft-shape"],
                "class_groups": [["blue", "red"], [1]],
            }
        ],
        "methods": ["task_arithmetic", "ties"],
        "grid_stride": 4,
        "batch_size": 16,
        "out": "run",
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["reproduce", str(root / "config.yaml")]) == 0
    paths["out"] = root / "run"
    return paths


def test_results_have_the_suite_keys_and_report(run):
    results = json.loads((run["out"] / "results.json").read_text())
    for setup in ("multitask", "domain", "continual"):
        for method in ("task_arithmetic", "ties"):
            for variant in ("tuned", "data_free", "weave"):
                assert 0 <= results[setup][method][variant]["average"] <= 100
        assert set(results[setup]["zero_shot"]["per_task"]) == set(results[setup]["individual"]["per_task"])
    assert "privileged" in results["multitask"]["ties"]["tuned"]["note"]
    report = (run["out"] / "report.md").read_text()
    assert report.startswith("# weightweaving reproduce") and "## Table 2" in report
    assert (run["out"] / "sweeps.png").is_file()


def test_baselines_and_lambda_one_match_evaluate_and_merge(run, clip_dir, capsys):
    results = json.loads((run["out"] / "results.json").read_text())
    tasks = ["--task", f"colour={run['colour']}", "--task", f"shape={run['shape']}"]
    root = run["root"]
    merged = root / "merged-ta"
    assert (
        main(
            [
                "merge",
                "--base",
                str(clip_dir),
                "--models",
                str(root / "ft-colour"),
                str(root / "ft-shape"),
                "--method",
                "task_arithmetic",
                "--lambda",
                "1.0",
                "--out",
                str(merged),
            ]
        )
        == 0
    )
    for model, variant in ((clip_dir, "zero_shot"), (root / "ft-colour", None), (merged, "ta")):
        out = root / f"eval-{model.name}.json"
        assert main(["evaluate", "--model", str(model), *tasks, "--json", str(out)]) == 0
        scores = json.loads(out.read_text())["per_task"]
        if variant == "zero_shot":
            assert scores == results["multitask"]["zero_shot"]["per_task"]
        elif variant == "ta":
            assert scores == results["multitask"]["task_arithmetic"]["data_free"]["per_task"]
        else:
            assert scores["colour"] == results["multitask"]["individual"]["per_task"]["colour"]


def test_a_second_run_continues_from_the_points_on_disk(run, capsys):
    before = json.loads((run["out"] / "results.json").read_text())
    store = next(run["out"].glob("points-*.jsonl"))
    lines = store.read_text().splitlines()
    store.write_text("\n".join(lines[:-1]) + '\n{"key": "cut sho')  # as if stopped while writing the last
    capsys.readouterr()
    assert main(["reproduce", str(run["root"] / "config.yaml")]) == 0
    assert "(1 points computed, " in capsys.readouterr().out
    after = json.loads((run["out"] / "results.json").read_text())
    assert {k: v for k, v in after.items() if k != "meta"} == {k: v for k, v in before.items() if k != "meta"}


def test_bad_config_is_one_line_error(run, capsys):
    bad = run["root"] / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"base": "x", "tasks": {"a": {"data": "d", "checkpoint": "c"}}, "methods": ["nope"]})
    )
    assert main(["reproduce", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: tasks: give at least two tasks"


def test_diagnostics_match_an_independent_computation(run, clip_dir):
    from weightweaving.models.clip import load_clip
    from weightweaving.suite.protocols import cosine_matrix

    results = json.loads((run["out"] / "results.json").read_text())
    diag, root = results["diagnostics"], run["root"]

    def encoder(name: str) -> dict:
        return load_clip(str(root / name), base=str(clip_dir)).image_encoder_state()

    base = load_clip(str(clip_dir)).image_encoder_state()
    seq = cosine_matrix(base, [encoder("ft-colour"), encoder("seq2")])
    ind = cosine_matrix(base, [encoder("ft-colour"), encoder("ft-shape")])
    cos = diag["cosine"]["colours2"]
    assert sum(cos["sequential"], []) == pytest.approx(sum(seq, []), abs=1e-5)
    assert sum(cos["individual"], []) == pytest.approx(sum(ind, []), abs=1e-5)
    assert diag["multitask_task_vector_cosine"] == pytest.approx(ind[0][1], abs=1e-5)
    # interference at λ = 1: task vector j added in full is task j's own fine-tune
    (block,) = diag["interference"]
    assert block["lam"] == 1.0 and block["tasks"] == ["colour", "shape"]
    mt = results["multitask"]
    for i, name in enumerate(block["tasks"]):
        own = mt["individual"]["per_task"][name] - mt["zero_shot"]["per_task"][name]
        assert block["delta"][i][i] == pytest.approx(own)
    report = (run["out"] / "report.md").read_text()
    assert "## Interference diagnostic" in report and "## Task-vector cosine similarity" in report
    assert "sequential fine-tuning gives more correlated task vectors" in report
    assert (run["out"] / "cosine.png").is_file() and (run["out"] / "interference.png").is_file()


def test_continual_individual_is_task_aware_routing(run, capsys):
    """Each task's own model on a folder of just its classes, weighted by images: the routed baseline."""
    import shutil

    root = run["root"]
    correct, total = 0.0, 0
    for model, group in (("ft-colour", ["blue", "red"]), ("ft-shape", ["green"])):
        folder = root / f"group-{model}"
        for name in group:
            if not (folder / name).exists():
                shutil.copytree(run["colour"] / name, folder / name)
        out = root / f"group-{model}.json"
        assert (
            main(["evaluate", "--model", str(root / model), "--task", f"g={folder}", "--json", str(out)]) == 0
        )
        images = json.loads(out.read_text())["images"]["g"]
        correct += images * json.loads(out.read_text())["per_task"]["g"]
        total += images
    results = json.loads((run["out"] / "results.json").read_text())
    individual = results["continual"]["individual"]
    assert individual["per_task"]["colours2"] == pytest.approx(correct / total)
    assert "task-aware" in individual["note"]


def test_report_with_some_pools_only(run):
    """A config may ask for some pools only (pools: [mean], [mean, magmax]); Table 3 shows those."""
    from weightweaving.suite import report

    stored = json.loads((run["out"] / "results.json").read_text())
    diagnostics, meta = stored.pop("diagnostics"), stored.pop("meta")
    for kept, expected in (
        (("mean",), "Only the mean pool was run"),
        (("mean", "magmax"), "| method | mean | magmax |"),
    ):
        results = json.loads(json.dumps(stored))
        for setup in results.values():
            for entry in setup.values():
                if isinstance(entry, dict) and "weave_pools" in entry:
                    entry["weave_pools"] = {p: entry["weave_pools"][p] for p in kept}
        assert expected in report.markdown(results, diagnostics, meta)


def test_executor_ray_one_task_per_point_same_results(run, ray_cluster, monkeypatch, capsys):
    """``executor: ray``: every λ point is a Ray task; the same results and points as the local run."""
    from weightweaving.suite import parallel

    calls = []
    real = parallel.ray_map

    def spy(job, n, *args, **kwargs):
        calls.append(n)
        return real(job, n, *args, **kwargs)

    monkeypatch.setattr(parallel, "ray_map", spy)
    config = yaml.safe_load((run["root"] / "config.yaml").read_text())
    config.update(setups=["multitask", "domain"], methods=["ties"], executor="ray")  # a part, to be quick
    (run["root"] / "ray.yaml").write_text(yaml.safe_dump(config))
    out = run["root"] / "ray"
    assert (
        main(["reproduce", str(run["root"] / "ray.yaml"), "--out", str(out), "--ray-address", ray_cluster])
        == 0
    )
    local = json.loads((run["out"] / "results.json").read_text())
    remote = json.loads((out / "results.json").read_text())
    for setup in ("multitask", "domain"):
        assert remote[setup] == {k: v for k, v in local[setup].items() if k != "task_arithmetic"}
    ties = [local[s]["ties"] for s in ("multitask", "domain", "domain")]  # domain: one per held-out task
    assert calls == [sum(len(t["sweep"]["lambdas"]) + len(t["weave_pools"]) for t in ties)]
    # the driver wrote each point as the local run did: the same scores, in the local run's order
    records = [json.loads(line) for line in next(out.glob("points-*.jsonl")).read_text().splitlines()]
    ours = [json.loads(line) for line in next(run["out"].glob("points-*.jsonl")).read_text().splitlines()]
    keys = {r["key"] for r in records}
    assert records == [r for r in ours if r["key"] in keys]
    assert remote["meta"]["points"]["computed"] == len(records)


def test_executor_ray_evaluates_on_cpus(run, capsys):
    config = run["root"] / "config.yaml"
    assert main(["reproduce", str(config), "--executor", "ray", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {config}: executor: ray evaluates on the workers' CPUs; use device: cpu"
    )
