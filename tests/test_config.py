"""One options model: MergeOptions drives the flags, their help, the API keywords and the provenance."""

from __future__ import annotations

import argparse
import inspect

import pytest
import yaml

import weightweaving
from tests.helpers import load_folder, run_cli, save_safetensors, toy_models
from weightweaving.cli import build_parser, main
from weightweaving.config import DATA_FIELDS, MergeOptions, WeaveOptions, api_name, option_flag

PROGRAMMATIC = {"progress", "extras", "closed_form"}  # API keywords a file cannot hold


def merge_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["merge"]


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_every_field_has_a_flag_and_every_flag_a_field():
    fields = [*MergeOptions.model_fields, *WeaveOptions.model_fields]
    from_fields = {option_flag(f) for f in fields}
    assert len(from_fields) == len(fields)  # no two fields share a flag
    assert flags_of(merge_parser()) - {"--help", "--verbose", "--debug"} == from_fields


def test_api_keywords_are_the_fields():
    merge_keywords = (
        set(inspect.signature(weightweaving.merge).parameters) - PROGRAMMATIC - {"hyperparameters"}
    )
    fields = {api_name(f) for f in MergeOptions.model_fields} - {"hyperparameters", "weave", *DATA_FIELDS}
    assert merge_keywords == fields  # the methods that use data read DATA_FIELDS (withdata.command)
    weave_keywords = (
        set(inspect.signature(weightweaving.weave).parameters) - PROGRAMMATIC - {"hyperparameters"}
    )
    assert weave_keywords == (fields - {"lam"}) | set(WeaveOptions.model_fields)


def test_help_shows_real_defaults_and_says_required():
    res = run_cli("merge", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "PydanticUndefined" not in text
    assert "--base BASE pre-trained checkpoint (file or folder) (required)" in text
    assert "--method METHOD merge method (see 'weightweaving methods') (default: task_arithmetic)" in text
    assert "--workers WORKERS threads (overlap reading with computing) (default: 1)" in text
    assert (
        "--pool-over {all,merged} all = task vectors plus merged; merged = merged only (default: all)" in text
    )
    methods = run_cli("methods")
    assert "PydanticUndefined" not in methods.stdout
    assert "--set base_hyperparameters={}" in methods.stdout


@pytest.fixture
def inputs(tmp_path):
    base, tuned = toy_models(3)
    b = save_safetensors(tmp_path / "b.safetensors", base)
    ms = [save_safetensors(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    return [str(b)], [str(m) for m in ms]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--method", "tie"],
            "unknown method 'tie'; valid methods: breadcrumbs, cart, dare, exemplar_projection, gta, iso_c, iso_cts, magmax, "
            "model_stock, pcb, slerp, svc, task_arithmetic, ties, tsv, weight_averaging, wudi; "
            "did you mean 'ties'?",
        ),
        (
            ["--method", "ties", "--set", "kk=0.1"],
            "method 'ties' has no hyperparameter 'kk' (valid: k, scope); did you mean 'k'?",
        ),
        (
            ["--weave", "--pool", "meen"],
            "unknown pool 'meen'; valid pools: mean, random, magmax, trimmed_mean, median, agreement, "
            "fitted_lambda, calibrated, nearest_mean, norm_filtered, spectral_filtered, spectral_blended, breadcrumbs, cart, dare, exemplar_projection, gta, iso_c, iso_cts, "
            "model_stock, pcb, "
            "slerp, svc, task_arithmetic, ties, tsv, weight_averaging, wudi; did you mean 'mean'?",
        ),
        (["--method", "slerp"], "method 'slerp' merges exactly 1 fine-tuned model, got 3"),
    ],
)
def test_mistakes_name_the_valid_choices_and_the_closest(tmp_path, inputs, args, message):
    base, models = inputs
    res = run_cli("merge", "--base", *base, "--models", *models, "--out", tmp_path / "out", *args)
    assert res.returncode == 2
    assert res.stderr == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_mistyped_yaml_option_suggests_the_closest(tmp_path, inputs):
    base, models = inputs
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base": base[0], "models": models, "out": "o", "methd": "ties"}))
    res = run_cli("merge", path)
    assert res.stderr == f"error: {path}: unknown option 'methd'; did you mean 'method'?\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "ties", "--lambda", "0.7"],
        ["--method", "ties", "--weave", "--search", "k=0.1,0.3", "--lambdas", "0.5,1", "--pool", "magmax"],
        [
            "--method",
            "dare",
            "--set",
            "p=0.3",
            "--seed",
            "4",
            "--weave",
            "--pool",
            "ties",
            "--pool-set",
            "k=0.5",
        ],
    ],
    ids=["merge", "weave-grid", "weave-method-pool"],
)
def test_the_provenance_file_reruns_to_the_same_bytes(tmp_path, inputs, args):
    base, models = inputs
    first = tmp_path / "first"
    assert (
        main(["merge", "--base", *base, "--models", *models, "--out", str(first), *args]) == 0
    )  # in process
    record = yaml.safe_load((first / "weightweaving_config.yaml").read_text())
    assert record["hyperparameters"]  # resolved, defaults filled in
    assert record["compute_dtype"] == "float32" and record["device"] == "cpu"
    assert {"weightweaving", "torch", "python"} <= set(record["versions"])
    if "weave" in record:
        assert record["weave"]["points"] and all(p["lam"] for p in record["weave"]["points"])
        if record["weave"]["pool"] == "ties":
            assert record["weave"]["pool_hyperparameters"] == {"k": 0.5, "scope": "global"}
    assert main(["merge", str(first / "weightweaving_config.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert (first / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()
    assert load_folder(first).keys() == load_folder(tmp_path / "again").keys()
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert record["base"] == str((tmp_path / "b.safetensors").resolve())  # absolute, as given
