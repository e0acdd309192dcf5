"""Loading CLIP folders, vision-only folders and open_clip state dicts; merging only the vision tower."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.models.tiny_clip import transformers
from weightweaving.cli import main
from weightweaving.errors import CheckpointError
from weightweaving.models.clip import load_clip, open_clip_to_hf
from weightweaving.models.heads import pooled


def _vision_folder(base_dir, out, noise: float, seed: int, shape_change: bool = False):
    base = transformers.CLIPModel.from_pretrained(str(base_dir))
    config = base.config.vision_config
    if shape_change:
        config.intermediate_size = 48
    vision = transformers.CLIPVisionModel(config)
    state = {k: v for k, v in base.state_dict().items() if k.startswith("vision_model.")}
    torch.manual_seed(seed)
    if not shape_change:
        vision.load_state_dict({k: v + noise * torch.randn_like(v) for k, v in state.items()}, strict=False)
    vision.save_pretrained(str(out))
    return vision


def test_vision_folder_takes_the_text_side_from_the_base(clip_dir, tmp_path):
    vision = _vision_folder(clip_dir, tmp_path / "ft", 0.05, 1)
    clip = load_clip(tmp_path / "ft", base=clip_dir)
    base = transformers.CLIPModel.from_pretrained(str(clip_dir))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = base.visual_projection(vision(pixel_values=pixels).pooler_output)
        got = pooled(clip.model.get_image_features(pixel_values=pixels))
    assert torch.allclose(got, want, atol=1e-6)
    assert all(k.startswith("vision_model.") for k in clip.replaced) and clip.replaced
    text = {k: v for k, v in base.state_dict().items() if k.startswith("text_model.")}
    assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in text.items())


def test_vision_folder_of_other_shapes_is_refused(clip_dir, tmp_path):
    _vision_folder(clip_dir, tmp_path / "wide", 0.0, 1, shape_change=True)
    with pytest.raises(CheckpointError) as info:
        load_clip(tmp_path / "wide", base=clip_dir)
    assert str(info.value) == (
        f"{tmp_path / 'wide' / 'model.safetensors'}: parameter 'vision_model.encoder.layers.0.mlp.fc1.bias' "
        "has shape (48,), expected (64,) as in the base"
    )
    with pytest.raises(CheckpointError, match="is not a full CLIPModel folder"):
        load_clip(tmp_path / "wide")


class _OpenClipBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock, written with torch's own MultiheadAttention (in_proj_weight)."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, hidden))
        self.mlp.add_module("c_proj", torch.nn.Linear(hidden, width))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # quick_gelu, as OpenAI's ViT-B/32


class _OpenClipVisual(torch.nn.Module):
    def __init__(self, width=32, layers=2, heads=2, hidden=64, patch=8, size=32, embed=16) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = torch.nn.LayerNorm(width)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(
            _OpenClipBlock(width, heads, hidden) for _ in range(layers)
        )
        self.ln_post = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.randn(width, embed) / math.sqrt(width))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


def test_open_clip_state_dict_gives_the_same_image_features(clip_dir, tmp_path):
    torch.manual_seed(3)
    visual = _OpenClipVisual()
    for p in visual.parameters():  # LayerNorms away from (1, 0), so a swapped mapping shows
        torch.nn.init.normal_(p, std=0.3) if p.dim() == 1 else None
    state = {f"model.visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()}
    save_file(state, str(tmp_path / "image_encoder.safetensors"))
    clip = load_clip(tmp_path / "image_encoder.safetensors", base=clip_dir)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = pooled(clip.model.get_image_features(pixel_values=pixels))
        want = visual(pixels)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_open_clip_name_without_counterpart_is_refused():
    with pytest.raises(CheckpointError) as info:
        open_clip_to_hf(
            {"visual.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)}
        )
    assert str(info.value) == (
        "<state dict>: parameter 'visual.attnpool.c_proj.weight' has no counterpart in a Hugging Face "
        "CLIP ViT (a ResNet CLIP is not supported)"
    )


def test_merging_clip_folders_merges_the_vision_tower_only(clip_dir, tmp_path, capsys):
    tuned = []
    for i in range(2):
        model = transformers.CLIPModel.from_pretrained(str(clip_dir))
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(str(tmp_path / f"ft{i}"))
        tuned.append(model.state_dict())
    out = tmp_path / "merged"
    code = main(
        [
            "merge",
            "--base",
            str(clip_dir),
            "--models",
            str(tmp_path / "ft0"),
            str(tmp_path / "ft1"),
            "--method",
            "task_arithmetic",
            "--lambda",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    merged = transformers.CLIPModel.from_pretrained(str(out)).state_dict()
    base = transformers.CLIPModel.from_pretrained(str(clip_dir)).state_dict()
    for name, value in base.items():
        if name.startswith(("vision_model.", "visual_projection.")):
            want = value + 0.5 * sum(t[name] - value for t in tuned)
            assert torch.allclose(merged[name], want, atol=1e-6), name
        else:
            assert torch.equal(merged[name], value), name
    record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
    assert record["include"] == [r"^vision_model\.", r"^visual_projection\."]
    assert "text_model.embeddings.token_embedding.weight" in record["clip"]["kept_from_base"]
    assert "logit_scale" in record["clip"]["kept_from_base"]
    assert not any(n.startswith("vision_model.") for n in record["clip"]["kept_from_base"])
    printed = capsys.readouterr().out.splitlines()
    kept = len(record["clip"]["kept_from_base"])
    assert printed[1].startswith(
        f"CLIP: merged {record['clip']['merged_count']} parameters of the image encoder"
    )
    assert f"kept {kept} from the base" in printed[1]
