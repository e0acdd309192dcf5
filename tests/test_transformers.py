"""A merged folder loads back with ``transformers`` ``from_pretrained`` (a tiny CLIP vision model built here)."""

from __future__ import annotations

import torch

import weightweaving
from tests.helpers import run_cli

transformers = __import__("transformers")


def _tiny_clip(seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return transformers.CLIPVisionModel(config)


def test_merged_clip_folder_loads_with_from_pretrained(tmp_path):
    base_model = _tiny_clip(0)
    base_model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
    tuned = []
    for i in range(3):
        torch.manual_seed(10 + i)
        sd = {
            k: (v + 1e-2 * torch.randn_like(v) if v.is_floating_point() else v.clone())
            for k, v in base_sd.items()
        }
        model = _tiny_clip(0)
        model.load_state_dict(sd)
        model.save_pretrained(tmp_path / f"ft{i}", safe_serialization=True)
        tuned.append(sd)
    out = tmp_path / "merged"
    res = run_cli(
        "merge",
        "--base",
        tmp_path / "pre",
        "--models",
        *[tmp_path / f"ft{i}" for i in range(3)],
        "--method",
        "ties",
        "--set",
        "k=0.3",
        "--weave",
        "--lambdas",
        "0.1:1.0:0.1",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").exists()
    loaded = transformers.CLIPVisionModel.from_pretrained(out)
    want = weightweaving.weave(base_sd, tuned, "ties", lambdas="0.1:1.0:0.1", k=0.3)
    got = loaded.state_dict()
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    pixel = torch.randn(1, 3, 32, 32)
    assert loaded(pixel_values=pixel).pooler_output.shape == (1, 32)
