"""End-to-end: the CLI on checkpoints built in a temporary folder, including the error cases."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import weightweaving
from tests.helpers import load_folder, run_cli, save_hf_folder, save_safetensors, toy_models
from tests.oracles import assert_matches, case_paths, load_case


def _write_case(tmp_path, case):
    base = save_safetensors(tmp_path / "pre.safetensors", case.pretrained)
    models = [save_safetensors(tmp_path / f"ft{i}.safetensors", sd) for i, sd in enumerate(case.tasks)]
    return base, models


@pytest.mark.parametrize("path", case_paths("task_arithmetic")[:2], ids=lambda p: p.stem)
def test_merge_oracle_through_cli(tmp_path, path):
    case = load_case(path)
    base, models = _write_case(tmp_path, case)
    out = tmp_path / "merged"
    res = run_cli(
        "merge",
        "--base",
        base,
        "--models",
        *models,
        "--method",
        "task_arithmetic",
        "--lambda",
        case.meta["lam"],
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    assert_matches(case, load_folder(out))
    record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
    assert record["method"] == "task_arithmetic" and record["lambda"] == case.meta["lam"]
    assert "torch" in record["versions"]


def test_weave_oracle_through_cli_and_yaml(tmp_path):
    case = load_case(case_paths("weave")[0])  # task_arithmetic, mean over A*
    assert case.meta["method"] == "task_arithmetic"
    base, models = _write_case(tmp_path, case)
    lambdas = ",".join(str(x) for x in case.meta["lambdas"])
    res = run_cli(
        "merge",
        "--base",
        base,
        "--models",
        *models,
        "--method",
        "task_arithmetic",
        "--weave",
        "--lambdas",
        lambdas,
        "--pool",
        "mean",
        "--out",
        tmp_path / "w1",
    )
    assert res.returncode == 0, res.stderr
    assert_matches(case, load_folder(tmp_path / "w1"))
    config = {
        "base": "pre.safetensors",
        "models": [m.name for m in models],
        "method": "task_arithmetic",
        "out": "w2",
        "weave": {"lambdas": case.meta["lambdas"], "pool": "mean", "pool_over": "all"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = run_cli("merge", tmp_path / "c.yaml")
    assert res.returncode == 0, res.stderr
    assert_matches(case, load_folder(tmp_path / "w2"))


def test_sharded_output_and_hf_files(tmp_path):
    base, tuned = toy_models()
    save_hf_folder(tmp_path / "pre", base, {"model_type": "toy", "hidden": 8})
    (tmp_path / "pre" / "tokenizer.json").write_text("{}")
    for i, sd in enumerate(tuned):
        save_hf_folder(tmp_path / f"ft{i}", sd)
    out = tmp_path / "out"
    res = run_cli(
        "merge",
        "--base",
        tmp_path / "pre",
        "--models",
        *[tmp_path / f"ft{i}" for i in range(3)],
        "--lambda",
        "0.5",
        "--shard-size",
        "400B",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    got = load_folder(out)
    want = weightweaving.merge(base, tuned, "task_arithmetic", 0.5)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["position_ids"], base["position_ids"])


def test_methods_command_lists_registry():
    res = run_cli("methods")
    assert res.returncode == 0
    for name in weightweaving.list_methods():
        assert f"{name}:" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown method 'nope'; valid methods:"),
        (["--set", "bogus=1"], "method 'task_arithmetic' has no hyperparameter 'bogus'"),
        (["--lambdas", "0.1:1"], "need --weave"),
        (["--weave", "--lambdas", "1:0.5"], "is empty"),
    ],
)
def test_option_errors_are_one_line(tmp_path, args, message):
    base, tuned = toy_models(2)
    b = save_safetensors(tmp_path / "b.safetensors", base)
    ms = [save_safetensors(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    res = run_cli("merge", "--base", b, "--models", *ms, "--out", tmp_path / "out", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_file_and_parameter(tmp_path):
    base, tuned = toy_models(2)
    tuned[1]["blocks.0.attn.in_proj.weight"] = torch.zeros(16, 8)
    b = save_safetensors(tmp_path / "b.safetensors", base)
    ms = [save_safetensors(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    res = run_cli("merge", "--base", b, "--models", *ms, "--out", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: {ms[1]}: parameter 'blocks.0.attn.in_proj.weight' has shape (16, 8), expected (12, 8) as in the base"
    )
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    base, tuned = toy_models(2)
    b = save_safetensors(tmp_path / "b.safetensors", base)
    ms = [save_safetensors(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    res = run_cli("merge", "--base", b, "--models", *ms, "--out", tmp_path / "out")
    assert res.returncode == 2 and "pass --overwrite" in res.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    res = run_cli("merge", "--base", b, "--models", *ms, "--out", tmp_path / "out", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_file(tmp_path):
    res = run_cli(
        "merge",
        "--base",
        tmp_path / "nope.safetensors",
        "--models",
        tmp_path / "a.safetensors",
        "--out",
        tmp_path / "o",
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file or folder"


def test_suite_command_runs_micro_profile(tmp_path):
    res = run_cli(
        "suite",
        "--profile",
        "micro",
        "--out",
        tmp_path / "runs",
        "--cache-dir",
        tmp_path / "cache",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr  # worker processes end quietly when the pool terminates them
    report = tmp_path / "runs" / "micro-seed0" / "report.md"
    assert "report:" in res.stdout and report.exists()
    results = json.loads((report.parent / "results.json").read_text())
    assert {"multitask", "continual", "domain"} <= set(results)
    assert "average" in results["multitask"]["zero_shot"]
