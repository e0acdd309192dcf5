"""Data-free λ estimators (weaving/estimators.py) on small models whose answer is known in closed form."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.weaving.estimators import metagpt_weights, nan_weights, parse_auto


def _models():
    """Task vectors with squared norms 1, 4 and 9 over the two merged parameters (2·e_t-like)."""
    base = {"a.weight": torch.zeros(2, 2), "b.bias": torch.zeros(3), "ids": torch.arange(3)}
    deltas = [
        ({"a.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b.bias": torch.zeros(3)}),
        ({"a.weight": torch.zeros(2, 2), "b.bias": torch.tensor([0.0, 2.0, 0.0])}),
        ({"a.weight": torch.tensor([[0.0, 0.0], [0.0, 3.0]]), "b.bias": torch.zeros(3)}),
    ]
    tasks = [{**d, "ids": torch.arange(3)} for d in deltas]
    return base, tasks


def test_rules_in_closed_form():
    norms_sq = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(metagpt_weights(norms_sq), norms_sq / 14)
    inverse = torch.tensor([1.0, 1 / 2, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(nan_weights(norms_sq), inverse / inverse.sum())
    zero = torch.tensor([0.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(nan_weights(zero), torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        metagpt_weights(torch.zeros(2, dtype=torch.float64)), torch.full((2,), 0.5).double()
    )


def test_lambda_auto_gives_task_arithmetic_its_weights():
    base, tasks = _models()
    for rule, weights in (("metagpt", [1 / 14, 4 / 14, 9 / 14]), ("nan", [6 / 11, 3 / 11, 2 / 11])):
        got = weightweaving.merge(base, tasks, "task_arithmetic", lam=f"auto:{rule}")
        want = weightweaving.merge(base, tasks, "task_arithmetic", lam=1.0, weights=weights)
        for key in base:
            torch.testing.assert_close(got[key], want[key])
    assert torch.equal(got["ids"], base["ids"])


def test_lambda_auto_over_other_methods_scales_each_task_vector():
    """Without per-task weights the estimate scales Δ_t by T·λ_t, at the method's default λ."""
    base, tasks = _models()
    got = weightweaving.merge(base, tasks, "magmax", lam="auto:metagpt")
    scaled = [
        {k: base[k] + 3 * w * (v - base[k]) if k != "ids" else v for k, v in t.items()}
        for t, w in zip(tasks, [1 / 14, 4 / 14, 9 / 14], strict=True)
    ]
    want = weightweaving.merge(base, scaled, "magmax")
    for key in base:
        torch.testing.assert_close(got[key], want[key])
    again = weightweaving.merge(base, tasks, "magmax", task_weights="auto:metagpt")
    for key in base:
        assert torch.equal(again[key], got[key])


def test_norms_cover_only_merged_parameters():
    base, tasks = _models()
    got = weightweaving.merge(base, tasks, "task_arithmetic", lam="auto:metagpt", exclude=["^b\\."])
    # without b.bias the squared norms are 1, 0, 9
    torch.testing.assert_close(got["a.weight"], torch.tensor([[0.1, 0.0], [0.0, 0.9 * 3]]))


def test_explicit_task_weights_and_errors():
    base, tasks = _models()
    got = weightweaving.merge(base, tasks, "task_arithmetic", task_weights=[1.0, 0.0, 2.0])
    torch.testing.assert_close(got["a.weight"], torch.tensor([[1.0, 0.0], [0.0, 6.0]]))
    with pytest.raises(OptionError, match="unknown λ estimator 'nope'"):
        parse_auto("auto:nope")
    with pytest.raises(OptionError, match="neither a number nor auto"):
        weightweaving.merge(base, tasks, "task_arithmetic", lam="often")
    with pytest.raises(OptionError, match="do not give them too"):
        weightweaving.merge(base, tasks, "task_arithmetic", lam="auto:nan", weights=[1, 1, 1])
    with pytest.raises(OptionError, match="2 values but there are 3"):
        weightweaving.merge(base, tasks, "task_arithmetic", task_weights=[1.0, 2.0])


def test_weave_with_task_weights():
    base, tasks = _models()
    woven = weightweaving.weave(base, tasks, "task_arithmetic", lambdas=[1.0], task_weights=[1.0, 1.0, 0.0])
    # members: Δ1, Δ2, 0, Δ1 + Δ2 -> mean
    torch.testing.assert_close(woven["a.weight"], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_cli_lambda_auto(tmp_path):
    base, tasks = _models()
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, task in enumerate(tasks):
        paths.append(str(tmp_path / f"t{i}.safetensors"))
        save_file(task, paths[-1])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "weightweaving", "merge", "--base", str(tmp_path / "base.safetensors")]
    cmd += ["--models", *paths, "--lambda", "auto:metagpt", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    merged = load_file(str(out / "model.safetensors"))
    want = weightweaving.merge(base, tasks, "task_arithmetic", lam="auto:metagpt")
    torch.testing.assert_close(merged["a.weight"], want["a.weight"])
    assert "estimated_weights" in (out / "weightweaving_config.yaml").read_text()
    bad = subprocess.run(
        [*cmd[:-2], "--lambda", "auto:nope", "--out", str(tmp_path / "o2")], capture_output=True, text=True
    )
    assert (
        bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "o2").exists()
