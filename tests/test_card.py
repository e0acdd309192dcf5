"""Every output folder carries a Hugging Face model card that reproduces it."""

from __future__ import annotations

import yaml

import weightweaving
from tests.helpers import save_hf_folder, toy_models


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_card_has_front_matter_method_references_models_and_the_config(tmp_path):
    base, tuned = toy_models(2)
    save_hf_folder(tmp_path / "base", base)
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\nthe base's card\n")
    for i, sd in enumerate(tuned):
        save_hf_folder(tmp_path / f"ft{i}", sd)
    out = weightweaving.merge(
        tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], "ties", 0.8, k=0.3, out=tmp_path / "out"
    )
    front, body = _front_matter((out / "README.md").read_text())
    assert front == {
        "base_model": str(tmp_path / "base"),
        "library_name": "transformers",
        "tags": ["merge", "weightweaving"],
    }
    assert "the base's card" not in body
    assert "- `ties` — Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708" in body
    assert "https://github.com/prateeky2806/ties-merging" in body
    for i in range(2):
        assert f"- `{(tmp_path / f'ft{i}').resolve()}`" in body  # the folder, as given
    config = (out / "weightweaving_config.yaml").read_text()
    assert f"```yaml\n{config.rstrip()}\n```" in body


def test_woven_card_cites_weight_weaving(tmp_path):
    base, tuned = toy_models(2)
    out = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=[0.5, 1.0], out=tmp_path / "out")
    front, body = _front_matter((out / "README.md").read_text())
    assert front["base_model"] == "pretrained" and "library_name" not in front  # a state dict: no config
    assert "woven with Weight Weaving (pool `mean` over `all`)" in body and "arXiv:2510.13921" in body
