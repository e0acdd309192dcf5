"""Unusual values: NaN/Inf refused (or merged with --allow-nonfinite), zero task vectors, one model, a file twice."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_folder, save_safetensors, toy_models

from .util import assert_error, run_cli_many, task_arithmetic

NAME = "blocks.0.attn.in_proj.weight"
NONFINITE = "contains NaN or Inf values (pass --allow-nonfinite to merge anyway)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("values")
    base, tuned = toy_models(2)
    b = save_safetensors(d / "base.safetensors", base)
    ft0 = save_safetensors(d / "ft0.safetensors", tuned[0])
    ft1 = save_safetensors(d / "ft1.safetensors", tuned[1])
    with_nan = {**tuned[1], NAME: tuned[1][NAME].clone()}
    with_nan[NAME][3, 2] = float("nan")
    nan = save_safetensors(d / "nan.safetensors", with_nan)
    inf_base = {**base, "ln.weight": base["ln.weight"].clone()}
    inf_base["ln.weight"][0] = float("inf")
    b_inf = save_safetensors(d / "base_inf.safetensors", inf_base)
    huge_base = save_safetensors(d / "huge_base.safetensors", {"w": torch.full((4,), 3e38)})
    huge_ft = save_safetensors(d / "huge_ft.safetensors", {"w": torch.full((4,), -3e38)})
    same = save_safetensors(d / "same.safetensors", base)  # fine-tuned == base: all-zero task vectors
    merge = ["merge", "--base", b, "--models"]
    cases = {
        "nan": [*merge, ft0, nan],
        "inf_base": ["merge", "--base", b_inf, "--models", ft0, ft1],
        "overflow": ["merge", "--base", huge_base, "--models", huge_ft],
        "allow_nan": [*merge, ft0, nan, "--allow-nonfinite", "--lambda", "0.5"],
        "single": [*merge, ft0],
        "single_ties": [*merge, ft0, "--method", "ties"],
        "single_tsv": [*merge, ft0, "--method", "tsv"],
        "single_iso_c": [*merge, ft0, "--method", "iso_c"],
        "twice": [*merge, ft0, ft0, "--lambda", "0.5"],
        "twice_average": [*merge, ft0, ft0, "--method", "weight_averaging"],
    }
    for method in ("task_arithmetic", "ties", "magmax", "weight_averaging"):
        cases[f"zero_{method}"] = [*merge, same, same, "--method", method]
    for name, argv in cases.items():
        argv += ["--out", d / f"out_{name}"]
    files = {"nan": nan, "base_inf": b_inf, "huge_ft": huge_ft}
    return d, files, base, tuned, run_cli_many(cases)


def test_nan_refused_naming_file_and_parameter(runs):
    d, files, *_, res = runs
    assert_error(res["nan"], f"{files['nan']}: parameter '{NAME}' {NONFINITE}", out=d / "out_nan")


def test_inf_in_base_refused(runs):
    d, files, *_, res = runs
    assert_error(
        res["inf_base"], f"{files['base_inf']}: parameter 'ln.weight' {NONFINITE}", out=d / "out_inf_base"
    )


def test_task_vector_overflow_refused(runs):
    d, files, *_, res = runs
    assert_error(
        res["overflow"],
        f"{files['huge_ft']}: parameter 'w' differs from the base by more than torch.float32 can hold "
        "(try --compute-dtype float64)",
        out=d / "out_overflow",
    )


def test_allow_nonfinite_merges(runs):
    d, _, base, tuned, res = runs
    assert res["allow_nan"].returncode == 0, res["allow_nan"].stderr
    got = load_folder(d / "out_allow_nan")
    poisoned = {**tuned[1], NAME: tuned[1][NAME].clone()}
    poisoned[NAME][3, 2] = float("nan")
    want = task_arithmetic(base, [tuned[0], poisoned], 0.5)
    for k in want:
        assert torch.equal(got[k], want[k]) or torch.allclose(got[k], want[k], equal_nan=True), k
    assert torch.isnan(got[NAME][3, 2]) and int(torch.isnan(got[NAME]).sum()) == 1


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magmax", "weight_averaging"])
def test_all_zero_task_vectors_give_the_base(runs, method):
    d, _, base, _, res = runs
    assert res[f"zero_{method}"].returncode == 0, res[f"zero_{method}"].stderr
    got = load_folder(d / f"out_zero_{method}")
    for k in base:
        assert torch.equal(got[k], base[k]), k


def test_single_finetuned_model(runs):
    d, _, base, tuned, res = runs
    assert res["single"].returncode == 0, res["single"].stderr
    got = load_folder(d / "out_single")
    for k in base:
        assert torch.allclose(got[k], tuned[0][k], atol=1e-6), (
            k
        )  # task arithmetic at λ = 1 gives the model back
    for method in ("ties", "tsv", "iso_c"):
        assert res[f"single_{method}"].returncode == 0, res[f"single_{method}"].stderr
        merged = load_folder(d / f"out_single_{method}")
        assert all(bool(torch.isfinite(v.float()).all()) for v in merged.values()), method


def test_same_file_twice_counts_twice(runs):
    """The same file twice is merged as asked: two (identical) task vectors."""
    d, _, base, tuned, res = runs
    assert res["twice"].returncode == 0, res["twice"].stderr
    got = load_folder(d / "out_twice")
    want = task_arithmetic(base, [tuned[0], tuned[0]], 0.5)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    averaged = load_folder(d / "out_twice_average")
    for k in base:
        assert torch.allclose(averaged[k], tuned[0][k], atol=1e-6), k


@pytest.mark.parametrize("weights", [None, [1.0, 0.5], [1.0, 0.0]])
def test_nan_refused_whatever_the_task_arithmetic_weights(weights):
    """Task Arithmetic checks the merged task vector instead of the task vectors when every weight
    is nonzero; a zero weight would hide a NaN there, so then the task vectors are checked."""
    from weightweaving import api
    from weightweaving.errors import CheckpointError
    from weightweaving.methods.registry import get_method

    base, tuned = toy_models(2)
    poisoned = {**tuned[1], NAME: tuned[1][NAME].clone()}
    poisoned[NAME][3, 2] = float("nan")
    method = get_method("task_arithmetic")
    params = method.params(weights=weights)
    assert method.propagates_nonfinite(params) is (weights is None or 0.0 not in weights)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        api.merge(base, [tuned[0], poisoned], "task_arithmetic", weights=weights, progress=False)
    merged = api.merge(base, tuned, "task_arithmetic", weights=weights, progress=False)
    assert isinstance(merged, dict) and all(bool(torch.isfinite(v).all()) for v in merged.values())


def test_a_later_pass_trusts_the_first_full_pass_check(monkeypatch):
    """TIES reads the task vectors twice (its thresholds' pass, then the merge): the first full pass
    looks for NaN/Inf, the merge pass does not look again, and a NaN is still refused."""
    from weightweaving import api
    from weightweaving.engine import execute
    from weightweaving.errors import CheckpointError

    checks: list[bool] = []
    read = execute.Runner._read

    def spy(self, unit, rows, reuse, check=True):
        checks.append(check)
        return read(self, unit, rows, reuse, check)

    monkeypatch.setattr(execute.Runner, "_read", spy)
    base, tuned = toy_models(3)
    api.merge(base, tuned, "ties", k=0.3, progress=False)
    units = sum(v.is_floating_point() for v in base.values())  # the merged ones
    assert len(checks) > 2 * units  # (a small model's sample stage reads whole units too)
    assert all(checks[:-units]) and not any(checks[-units:])
    poisoned = {**tuned[2], NAME: tuned[2][NAME].clone()}
    poisoned[NAME][0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        api.merge(base, [tuned[0], tuned[1], poisoned], "ties", k=0.3, progress=False)
