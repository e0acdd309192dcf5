"""Checkpoints that do not fit together: refused naming file and parameter, or merged as asked."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.helpers import load_folder, save_hf_folder, save_safetensors, toy_models

from .util import assert_error, leftovers, run_cli_many, task_arithmetic

DIFFER = "the checkpoints differ in architecture (use --common-only to merge only the parameters they share)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("disagree")
    base, tuned = toy_models(2)
    b = save_safetensors(d / "base.safetensors", base)
    ft0 = save_safetensors(d / "ft0.safetensors", tuned[0])
    missing = save_safetensors(
        d / "missing.safetensors", {k: v for k, v in tuned[1].items() if k != "ln.weight"}
    )
    extra = save_safetensors(
        d / "extra.safetensors", {**tuned[1], "head.weight": torch.ones(3), "head.bias": torch.ones(1)}
    )
    shape = save_safetensors(d / "shape.safetensors", {**tuned[1], "ln.weight": torch.ones(9)})
    other_arch = save_safetensors(
        d / "other.safetensors", {f"encoder.layer.{i}.weight": torch.ones(4) for i in range(3)}
    )
    # mixed dtypes: fp32 base, fp16 and bf16 models; and a bf16 base with fp32 models
    ft_half = save_safetensors(
        d / "half.safetensors", {k: v.half() if v.is_floating_point() else v for k, v in tuned[0].items()}
    )
    ft_bf16 = save_safetensors(
        d / "bf16.safetensors", {k: v.bfloat16() if v.is_floating_point() else v for k, v in tuned[1].items()}
    )
    base_bf16 = save_safetensors(
        d / "base_bf16.safetensors",
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in base.items()},
    )
    # a sharded checkpoint whose index names a shard that is not there
    sharded = d / "sharded"
    save_hf_folder(sharded, {})
    (sharded / "model.safetensors").unlink()
    first = {k: v for i, (k, v) in enumerate(tuned[1].items()) if i % 2 == 0}
    second = {k: v for i, (k, v) in enumerate(tuned[1].items()) if i % 2 == 1}
    save_safetensors(sharded / "model-00001-of-00002.safetensors", first)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second
    }
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    cases = {
        "missing": [b, ft0, missing],
        "extra": [b, ft0, extra],
        "shape": [b, ft0, shape],
        "other_arch": [b, ft0, other_arch],
        "other_arch_common": [b, other_arch, "--common-only"],
        "sharded_missing_shard": [b, ft0, sharded],
        "common_only": [b, ft0, missing, extra, "--common-only", "--lambda", "0.5"],
        "mixed_dtypes": [b, ft_half, ft_bf16, "--lambda", "0.5"],
        "bf16_base": [
            base_bf16,
            ft0,
            tuned_file := save_safetensors(d / "ft1.safetensors", tuned[1]),
            "--lambda",
            "0.5",
        ],
    }
    argv = {
        name: [
            "merge",
            "--base",
            args[0],
            "--models",
            *[a for a in args[1:] if not str(a).startswith("--") and not _is_number(a)],
        ]
        + _flags(args)
        + ["--out", d / f"out_{name}"]
        for name, args in cases.items()
    }
    files = {
        "base": b,
        "missing": missing,
        "extra": extra,
        "shape": shape,
        "other": other_arch,
        "sharded": sharded,
    }
    tensors = {"base": base, "tuned": tuned, "tuned_file": tuned_file}
    return d, files, tensors, run_cli_many(argv)


def _is_number(value: object) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _flags(args: list) -> list:
    out = []
    for i, a in enumerate(args):
        if str(a).startswith("--"):
            out.append(a)
            if i + 1 < len(args) and _is_number(args[i + 1]):
                out.append(args[i + 1])
    return out


def test_missing_parameter(runs):
    d, files, _, res = runs
    assert_error(
        res["missing"],
        f"{files['missing']}: parameter 'ln.weight' is in the base but missing here; {DIFFER}",
        out=d / "out_missing",
    )


def test_extra_parameters(runs):
    d, files, _, res = runs
    assert_error(
        res["extra"],
        f"{files['extra']}: parameter 'head.bias' is not in the base (and 1 more); {DIFFER}",
        out=d / "out_extra",
    )


def test_shape_mismatch(runs):
    d, files, _, res = runs
    assert_error(
        res["shape"],
        f"{files['shape']}: parameter 'ln.weight' has shape (9,), expected (8,) as in the base",
        out=d / "out_shape",
    )


def test_different_architecture(runs):
    d, files, _, res = runs
    assert_error(
        res["other_arch"],
        f"{files['other']}: parameter 'position_ids' is in the base but missing here (and 4 more); {DIFFER}",
        out=d / "out_other_arch",
    )
    assert_error(
        res["other_arch_common"],
        f"{files['base']}: the checkpoints share no parameter, so there is nothing to merge",
        out=d / "out_other_arch_common",
    )


def test_sharded_index_names_missing_shard(runs):
    d, files, _, res = runs
    index = files["sharded"] / "model.safetensors.index.json"
    assert_error(
        res["sharded_missing_shard"],
        f"{index}: the index names shard 'model-00002-of-00002.safetensors', which is missing",
        out=d / "out_sharded_missing_shard",
    )


def test_common_only_merges_shared_and_says_what_was_left(runs):
    d, files, tensors, res = runs
    out = d / "out_common_only"
    assert res["common_only"].returncode == 0, res["common_only"].stderr
    assert "Traceback" not in res["common_only"].stderr
    warnings = [line for line in res["common_only"].stderr.splitlines() if line.startswith("WARNING: ")]
    assert warnings == [
        f"WARNING: {files['extra']}: left out 2 parameters the base lacks: 'head.bias', 'head.weight'",
        "WARNING: copied 1 parameters from the base unmerged because some models lack them: 'ln.weight'",
    ]
    base, tuned = tensors["base"], tensors["tuned"]
    got = load_folder(out)
    assert set(got) == set(base)  # the extra parameters are not in the output
    want = task_arithmetic(base, [tuned[0], tuned[1], tuned[1]], 0.5)  # missing and extra both hold tuned[1]
    want["ln.weight"] = base["ln.weight"]
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
    assert record["notes"] == [w.removeprefix("WARNING: ") for w in warnings]
    assert record["left_out"] == {
        f"not in the base, in {files['extra']}": ["head.bias", "head.weight"],
        "copied from the base, missing in a model": ["ln.weight"],
    }
    assert leftovers(d) == []


def test_mixed_dtypes_merge_in_the_base_dtype(runs):
    d, _, tensors, res = runs
    assert res["mixed_dtypes"].returncode == 0, res["mixed_dtypes"].stderr
    base, tuned = tensors["base"], tensors["tuned"]
    got = load_folder(d / "out_mixed_dtypes")
    rounded = [
        {k: v.half() if v.is_floating_point() else v for k, v in tuned[0].items()},
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in tuned[1].items()},
    ]
    want = task_arithmetic(base, rounded, 0.5)
    for k in want:
        assert got[k].dtype == base[k].dtype, k
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_bf16_base_gives_bf16_output(runs):
    d, _, tensors, res = runs
    assert res["bf16_base"].returncode == 0, res["bf16_base"].stderr
    base, tuned = tensors["base"], tensors["tuned"]
    base16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in base.items()}
    got = load_folder(d / "out_bf16_base")
    want = task_arithmetic(base16, tuned, 0.5)
    for k in want:
        assert got[k].dtype == base16[k].dtype, k
        assert torch.equal(got[k], want[k]), k
