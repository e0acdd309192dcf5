"""A small vision transformer whose parameter names and kinds mirror CLIP's image encoder.

Same module tree as OpenAI CLIP's ``VisionTransformer`` (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.{attn,ln_1,mlp.c_fc,mlp.c_proj,ln_2}``,
``ln_post``, ``proj``), so a state dict of this model merges exactly as a CLIP checkpoint would.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    patch_size: int = 7
    width: int = 96
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    embed_dim: int = 64


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        hidden = width * mlp_ratio
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, L, width)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP's image tower in miniature: images (B, 3, H, W) -> embeddings (B, embed_dim)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, config.layers, config.heads, config.mlp_ratio)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, config.embed_dim))

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images - 0.5)  # (B, w, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, w)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)


def build_model(config: ViTConfig, seed: int) -> VisionTransformer:
    """A freshly initialised encoder; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return VisionTransformer(config)


def state_dict_of(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's weights (what the merge API consumes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
