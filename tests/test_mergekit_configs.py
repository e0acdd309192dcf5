"""mergekit configs, unchanged: our output against mergekit 0.1.5's own, stored in tests/data/mergekit.

``scripts/make_mergekit_cases.py`` built the tiny Llama models, ran mergekit on each config and kept
its output. Deterministic methods must give the same bytes: the dialect runs mergekit's arithmetic
in mergekit's working dtype on task vectors held exactly in float64, so no tolerance is needed.
DARE's masks come from mergekit's global torch RNG, which a per-parameter seeded generator cannot
reproduce: those cases are checked statistically (share of changed entries, size of the change).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, load_folder, run_cli
from weightweaving.cli import main
from weightweaving.config import load_yaml, run_options, validate

DATA = ROOT / "tests" / "data" / "mergekit"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "mergekit.yaml").exists())
RANDOM = {"dare_ties", "dare_linear"}


def ours(case: str, out: Path) -> dict[str, torch.Tensor]:
    values = load_yaml(DATA / case / "mergekit.yaml")
    values["out"] = str(out)
    run_options(validate(values, case), progress=False)
    return load_folder(out)


def expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(DATA / case / "expected.safetensors"))


def test_the_cases_cover_every_method_both_tools_have():
    methods = {yaml.safe_load((DATA / c / "mergekit.yaml").read_text())["merge_method"] for c in CASES}
    assert methods == {
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "linear",
        "slerp",
        "model_stock",
    }
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 1_000_000


@pytest.mark.parametrize("case", [c for c in CASES if c not in RANDOM])
def test_same_bytes_as_mergekit(tmp_path, case):
    got, want = ours(case, tmp_path / "out"), expected(case)
    assert list(got) == list(want) or set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{case}: {name}"


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_dare_matches_mergekit_in_distribution(tmp_path, case):
    """Random masks differ draw by draw; the share of entries they change and the size of the change
    must agree (5000 entries: the share's standard error is under 0.01)."""
    base = load_file(str(DATA / "models" / "base" / "model.safetensors"))
    got, want = ours(case, tmp_path / "out"), expected(case)
    assert set(got) == set(want)

    def changed_share(merged: dict[str, torch.Tensor]) -> float:
        changed = sum(int((merged[k] != base[k]).sum()) for k in base)
        return changed / sum(v.numel() for v in base.values())

    def l1_change(merged: dict[str, torch.Tensor]) -> float:
        return sum(float((merged[k].double() - base[k].double()).abs().sum()) for k in base)

    assert abs(changed_share(got) - changed_share(want)) < 0.04
    assert l1_change(got) == pytest.approx(l1_change(want), rel=0.1)
    assert not all(torch.equal(got[k], base[k]) for k in base)


def test_cli_runs_a_mergekit_config_end_to_end(tmp_path):
    res = run_cli("merge", DATA / "ties" / "mergekit.yaml", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    got, want = load_folder(tmp_path / "out"), expected("ties")
    assert all(torch.equal(got[k], want[k]) for k in want)
    record = yaml.safe_load((tmp_path / "out" / "weightweaving_config.yaml").read_text())
    assert record["method"] == "gta" and record["hyperparameters"]["consensus"] == "sum"


def _config(tmp_path: Path, **changes: object) -> Path:
    config = yaml.safe_load((DATA / "ties" / "mergekit.yaml").read_text())
    config["base_model"] = str(DATA / "models" / "base")
    for entry in config["models"]:
        entry["model"] = str((DATA / "ties" / entry["model"]).resolve())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"merge_method": "passthrough"},
            "'merge_method': 'passthrough' is not supported; supported: breadcrumbs, "
            "breadcrumbs_ties, dare_linear, dare_ties, linear, model_stock, slerp, task_arithmetic, ties",
        ),
        (
            {"merge_method": "tie"},
            "'merge_method': 'tie' is not supported; supported: breadcrumbs, breadcrumbs_ties, "
            "dare_linear, dare_ties, linear, model_stock, slerp, task_arithmetic, ties; did you mean 'ties'?",
        ),
        (
            {"merge_method": "nuslerp"},
            "'merge_method': 'nuslerp' is not supported; supported: breadcrumbs, "
            "breadcrumbs_ties, dare_linear, dare_ties, linear, model_stock, slerp, task_arithmetic, ties; "
            "did you mean 'slerp'?",
        ),
        ({"slices": [{"sources": []}]}, "'slices' (layer slices) is not supported"),
        ({"tokenizer_source": "base"}, "'tokenizer_source' (tokenizer merging) is not supported"),
        ({"tokenizer": {"source": "union"}}, "'tokenizer' (tokenizer merging) is not supported"),
        (
            {"parameters": {"densty": 0.5}},
            "parameters: unknown parameter 'densty' (valid: density, int8_mask, "
            "lambda, normalize, rescale, weight); did you mean 'density'?",
        ),
        ({"dtyp": "float32"}, "unknown mergekit option 'dtyp'; did you mean 'dtype'?"),
        ({"dtype": "float8"}, "'dtype': 'float8' is not one of: float32, float64, bfloat16, float16"),
        ({"base_model": None}, "'base_model' is required for merge_method 'ties'"),
    ],
)
def test_unsupported_or_mistyped_mergekit_fields_are_one_line_errors(tmp_path, capsys, changes, message):
    path = _config(tmp_path, **changes)
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2  # the CLI, in process
    assert capsys.readouterr().err == f"error: {path}: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_hub_name_must_be_downloaded_first(tmp_path):
    config = {
        "merge_method": "slerp",
        "base_model": "meta-llama/Llama-3.2-1B@main",
        "models": [{"model": "meta-llama/Llama-3.2-1B@main"}, {"model": "org/other"}],
        "parameters": {"t": 0.5},
    }
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    res = run_cli("merge", path, "--out", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr == (
        f"error: {path}: 'models[0].model': 'meta-llama/Llama-3.2-1B@main' is not a local file or folder; "
        "download it first (weightweaving never downloads)\n"
    )


def test_name_at_revision_uses_the_local_folder(tmp_path):
    models = DATA.resolve() / "models"
    config = {
        "merge_method": "slerp",
        "base_model": f"{models / 'base'}@main",
        "models": [{"model": str(models / "base")}, {"model": f"{models / 'ft_a'}@v1.0"}],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    }
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    res = run_cli("merge", path, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    got, want = load_folder(tmp_path / "out"), expected("slerp")
    assert all(torch.equal(got[k], want[k]) for k in want)
