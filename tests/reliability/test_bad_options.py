"""Bad options and configs: one line that names the option, exit 2, nothing written."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli

from .util import assert_error, leftovers, run_cli_many, write_models

# name -> (extra arguments, expected message after "error: ")
FLAG_CASES = {
    "unknown_method": (["--method", "nope"], None),  # lists the registry, checked below
    "unknown_hyperparameter": (
        ["--set", "bogus=1"],
        "method 'task_arithmetic' has no hyperparameter 'bogus' (valid: weights)",
    ),
    "negative_lambda": (
        ["--method", "ties", "--lambda", "-0.5"],
        "--lambda -0.5 is out of range for 'ties': must be >= 0.0",
    ),
    "nan_lambda": (["--lambda", "nan"], "--lambda nan is not a finite number"),
    "lambda_not_a_number": (
        ["--lambda", "abc"],
        "argument --lambda: expected a number or auto:<rule>, got 'abc' (see 'weightweaving merge --help')",
    ),
    "ties_k_zero": (
        ["--method", "ties", "--set", "k=0"],
        "method 'ties': hyperparameter 'k'=0: Input should be greater than 0",
    ),
    "ties_k_too_big": (
        ["--method", "ties", "--set", "k=150"],
        "method 'ties': hyperparameter 'k'=150: Input should be less than or equal to 100",
    ),
    "density_too_big": (
        ["--method", "breadcrumbs", "--set", "density=1.5"],
        "method 'breadcrumbs': hyperparameter 'density'=1.5: Input should be less than or equal to 1",
    ),
    "density_zero": (
        ["--method", "breadcrumbs", "--set", "density=0"],
        "method 'breadcrumbs': hyperparameter 'density'=0: Input should be greater than 0",
    ),
    "empty_lambda_grid": (["--weave", "--lambdas", "1:0.5"], "λ grid 1.0:0.5:0.1 is empty (stop < start)"),
    "empty_lambda_list": (["--weave", "--lambdas", ","], "the λ search space is empty"),
    "empty_search": (
        ["--method", "ties", "--weave", "--search", "k="],
        "--search k: the list of values is empty",
    ),
    "negative_lambda_in_space": (
        ["--method", "ties", "--weave", "--lambdas=-0.5,0.5"],
        "--lambda -0.5 is out of range for 'ties': must be >= 0.0",
    ),
    "set_reserved_seed": (
        ["--set", "seed=3"],
        "--set seed: 'seed' is an option of its own (--seed), not a hyperparameter",
    ),
    "set_reserved_lambda": (
        ["--set", "lambda=3"],
        "--set lambda: 'lambda' is an option of its own (--lambda), not a hyperparameter",
    ),
    "set_reserved_workers": (
        ["--set", "workers=2"],
        "--set workers: 'workers' is an option of its own (--workers), not a hyperparameter",
    ),
    "set_not_assignment": (["--set", "k"], "--set 'k' must look like NAME=VALUE"),
    "workers_zero": (
        ["--workers", "0"],
        "command line: option 'workers': Input should be greater than or equal to 1 (got 0)",
    ),
    "bad_dtype": (["--dtype", "int4"], None),  # lists the dtypes, checked below
}

# name -> (YAML text, expected message after "error: <config>: " or None for a prefix check)
YAML_CASES = {
    "syntax_error": (
        "base: [unclosed\nmodels: x\n",
        "not valid YAML at line 2: expected ',' or ']', but got ':'",
    ),
    "unknown_key": (
        "{base: b, models: [m], out: o, lamda: 0.3}\n",
        "unknown option 'lamda'; did you mean 'lambda'?",
    ),
    "wrong_type": ("{base: b, models: [m], out: o, seed: abc}\n", None),
    "not_a_mapping": ("- just\n- a list\n", "the config must be a mapping of options"),
    "empty": ("", "the config is empty"),
    "reserved_hyperparameter": ("{base: b, models: [m], out: o, hyperparameters: {seed: 1}}\n", None),
    "empty_points": ("{base: b, models: [m], out: o, weave: {points: []}}\n", None),
    "missing_models": ("{base: b, out: o}\n", "option 'models' is required"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("options")
    b, ms, *_ = write_models(d)
    cases = {
        name: ["merge", "--base", b, "--models", *ms, "--out", d / f"out_{name}", *args]
        for name, (args, _) in FLAG_CASES.items()
    }
    configs = {}
    for name, (text, _) in YAML_CASES.items():
        text = (
            text.replace("base: b", f"base: {b.name}")
            .replace("[m]", f"[{ms[0].name}]")
            .replace("out: o", f"out: out_{name}")
        )
        configs[name] = d / f"{name}.yaml"
        configs[name].write_text(text)
        cases[f"yaml_{name}"] = ["merge", configs[name]]
    return d, configs, run_cli_many(cases)


@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_bad_flag(runs, name):
    d, _, res = runs
    message = FLAG_CASES[name][1]
    if name == "unknown_method":
        assert_error(res[name], "unknown method 'nope'; valid methods: ", out=d / f"out_{name}", prefix=True)
        assert "task_arithmetic" in res[name].stderr and "ties" in res[name].stderr
    elif name == "bad_dtype":
        assert_error(
            res[name], "--dtype 'int4' is not one of: bf16, bfloat16, ", out=d / f"out_{name}", prefix=True
        )
    else:
        assert_error(res[name], message, out=d / f"out_{name}")
    assert leftovers(d) == []


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_bad_yaml(runs, name):
    d, configs, res = runs
    message = YAML_CASES[name][1]
    result = res[f"yaml_{name}"]
    out = d / f"out_{name}"
    config = configs[name]
    if name == "wrong_type":
        assert_error(
            result,
            f"{config}: option 'seed': Input should be a valid integer, unable to parse string as an integer (got 'abc')",
            out=out,
        )
    elif name == "reserved_hyperparameter":
        assert_error(
            result,
            f"{config}: hyperparameter 'seed' is an option of its own (--seed), not a hyperparameter",
            out=out,
        )
    elif name == "empty_points":
        assert_error(result, "the search space is empty (no points)", out=out)
    else:
        assert_error(result, f"{config}: {message}", out=out)


def test_yaml_is_loaded_safely(tmp_path):
    """A YAML tag that would construct a Python object is refused, not run."""
    marker = tmp_path / "RAN"
    config = tmp_path / "evil.yaml"
    config.write_text(f"base: !!python/object/apply:os.system ['touch {marker}']\nmodels: [a]\nout: o\n")
    res = run_cli("merge", config)
    assert_error(res, f"{config}: not valid YAML at line 1: ", prefix=True)
    assert not marker.exists()
