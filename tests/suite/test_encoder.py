"""The shipped pre-trained encoder: its file, its recorded recipe, and the code that makes and loads it."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from weightweaving.errors import WeightWeavingError
from weightweaving.suite import data, profiles
from weightweaving.suite.encoder import (
    asset_path,
    load_encoder,
    pretrain_encoder,
    save_encoder,
    stored_recipe,
)
from weightweaving.suite.model import ViTConfig, build_model, state_dict_of

MICRO_VIT = ViTConfig(width=32, layers=1, heads=2, mlp_ratio=2, embed_dim=16)
MICRO_SPEC = profiles.EncoderRecipe(
    file="micro.safetensors",
    vit=MICRO_VIT,
    sizes=data.Sizes(train=20, test=20, pretrain=40),
    tasks=("fashion", "shapes"),
    epochs=1,
    lr=1e-3,
    batch=16,
    contrastive=1.0,
    seed=3,
)


def test_shipped_encoder_fits_the_profiles_and_records_its_recipe() -> None:
    spec = profiles.SHIPPED_ENCODER
    path = asset_path(spec)
    assert path.stat().st_size < 2_000_000  # float16: about 0.9 MB
    state, digest = load_encoder(path, spec.vit)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert set(state) == set(state_dict_of(build_model(spec.vit, 0)))
    # the header says how it was made, and that is the recipe the code ships
    assert stored_recipe(path) == json.loads(json.dumps(dataclasses.asdict(spec)))
    for name in ("full", "quick"):
        recipe = profiles.PROFILES[name]
        assert recipe.encoder == spec and recipe.vit == spec.vit
    # it is a trained encoder, not an initialisation: weights moved far from any fresh one
    fresh = state_dict_of(build_model(spec.vit, spec.seed))
    moved = sum((state[k] - fresh[k]).norm() ** 2 for k in state) ** 0.5
    assert moved > 0.5 * sum(fresh[k].norm() ** 2 for k in fresh) ** 0.5


def test_pretrain_save_load_roundtrip_is_deterministic(tmp_path: Path) -> None:
    state = pretrain_encoder(MICRO_SPEC)
    again = pretrain_encoder(MICRO_SPEC)
    assert all(torch.equal(state[k], again[k]) for k in state)
    digest = save_encoder(state, MICRO_SPEC, tmp_path / "enc.safetensors")
    assert save_encoder(again, MICRO_SPEC, tmp_path / "again.safetensors") == digest
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob("*.tmp*"))
    loaded, loaded_digest = load_encoder(tmp_path / "enc.safetensors", MICRO_VIT)
    assert loaded_digest == digest
    for name, value in state.items():  # stored as float16, returned as float32
        assert torch.equal(loaded[name], value.half().float())
    assert stored_recipe(tmp_path / "enc.safetensors")["seed"] == 3


def test_encoder_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightWeavingError, match="nope.safetensors: cannot read"):
        load_encoder(missing, MICRO_VIT)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightWeavingError, match="junk.safetensors: not a readable safetensors"):
        load_encoder(junk, MICRO_VIT)
    other = tmp_path / "other.safetensors"
    save_encoder(state_dict_of(build_model(MICRO_VIT, 0)), MICRO_SPEC, other)
    wider = dataclasses.replace(MICRO_VIT, width=48)
    with pytest.raises(WeightWeavingError, match=r"other.safetensors: tensor '.*' has shape"):
        load_encoder(other, wider)


def test_remake_script_writes_the_recipe_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_encoder.py"
    spec_loader = importlib.util.spec_from_file_location("pretrain_encoder", script)
    assert spec_loader is not None and spec_loader.loader is not None
    module = importlib.util.module_from_spec(spec_loader)
    spec_loader.loader.exec_module(module)
    monkeypatch.setattr(module, "SHIPPED_ENCODER", MICRO_SPEC)
    out = tmp_path / "remade.safetensors"
    assert module.main(["--out", str(out)]) == 0
    assert stored_recipe(out)["file"] == "micro.safetensors"
    load_encoder(out, MICRO_VIT)


def test_a_shipped_encoder_is_fine_tuned_per_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every seed starts from the same encoder file, yet fine-tunes its own data: no cache sharing."""
    from weightweaving.suite import zoo as zoo_module
    from weightweaving.suite.cache import CheckpointCache

    path = tmp_path / MICRO_SPEC.file
    save_encoder(pretrain_encoder(MICRO_SPEC), MICRO_SPEC, path)
    monkeypatch.setattr(zoo_module, "asset_path", lambda spec: tmp_path / spec.file)
    recipe = dataclasses.replace(profiles.PROFILES["micro"], encoder=MICRO_SPEC)
    cache = CheckpointCache(tmp_path / "cache")
    first = zoo_module.build_zoo(recipe, 0, cache, progress=False)
    misses = cache.misses
    second = zoo_module.build_zoo(recipe, 1, cache, progress=False)
    assert cache.misses == 2 * misses and first.encoder_sha256 == second.encoder_sha256
    assert all(torch.equal(first.pretrained[k], second.pretrained[k]) for k in first.pretrained)
    for name in first.finetuned:
        assert not torch.equal(first.finetuned[name]["proj"], second.finetuned[name]["proj"])
    again = zoo_module.build_zoo(recipe, 1, cache, progress=False)
    assert cache.misses == 2 * misses  # the second seed's checkpoints are now cached
    assert all(torch.equal(again.finetuned[n]["proj"], second.finetuned[n]["proj"]) for n in again.finetuned)
