"""A small vision transformer whose parameter names and kinds mirror CLIP's image encoder.

Same module tree as OpenAI CLIP's ``VisionTransformer`` (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.{attn,ln_1,mlp.c_fc,mlp.c_proj,ln_2}``,
``ln_post``, ``proj``), so a state dict of this model merges exactly as a CLIP checkpoint would.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

    def forward(self, x: Tensor, first_only: bool = False) -> Tensor:  # x: (B, L, width)
        """``first_only``: the output's first token only, (B, 1, width): every token is attended to,
        but only the first one's query, attention output and MLP are computed."""
        h = self.ln_1(x)
        if first_only:
            x = x[:, :1] + self.attn(h[:, :1], h, h, need_weights=False)[0]
        else:
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

    def forward(self, images: Tensor, class_token_only: bool = False) -> Tensor:
        """Embeddings (B, embed_dim). ``class_token_only``: the last block computes the class token's
        row only (the only one the output reads): the same function and gradients, a fifth less work;
        off by default so that hooks on the last block see every token, as in CLIP."""
        x = self.conv1(images - 0.5)  # (B, w, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, w)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        blocks = list(self.transformer.resblocks)
        if class_token_only and blocks:
            for block in blocks[:-1]:
                x = block(x)
            x = blocks[-1](x, first_only=True)
        else:
            x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)


@torch.inference_mode()
def encode(config: ViTConfig, state: dict[str, Tensor], images: Tensor) -> Tensor:
    """:func:`functional_forward` for inference only (no autograd record): about a third cheaper
    than the module's forward, the same function up to float rounding."""
    return functional_forward(config, state, images)


def functional_forward(config: ViTConfig, state: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """``VisionTransformer(config)`` with weights ``state`` (every entry of its state dict) applied to
    ``images``, differentiable in ``state``: the module's forward with ``class_token_only=True``
    written out (equal up to float rounding; a training step forward and back takes 0.86x the
    module's time, where ``nn.MultiheadAttention`` reshapes and copies).

    The last block computes only the class token's row (the only one the output reads): its keys and
    values for every token, its query, attention output and MLP for one. Attention is
    ``scaled_dot_product_attention`` on the packed projection, as ``nn.MultiheadAttention`` computes it.
    """
    w, heads = config.width, config.heads
    x = F.conv2d(images - 0.5, state["conv1.weight"], stride=config.patch_size).flatten(2).transpose(1, 2)
    cls = state["class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["positional_embedding"]
    x = F.layer_norm(x, (w,), state["ln_pre.weight"], state["ln_pre.bias"])
    for layer in range(config.layers):
        p = f"transformer.resblocks.{layer}."
        last = layer == config.layers - 1
        h = F.layer_norm(x, (w,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        packed, bias = state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"]
        if last:  # the class token's query only
            q = F.linear(h[:, :1], packed[:w], bias[:w])
            k, v = F.linear(h, packed[w:], bias[w:]).split(w, dim=-1)
            x = x[:, :1]
        else:
            q, k, v = F.linear(h, packed, bias).split(w, dim=-1)
        batch, rows = q.shape[0], q.shape[1]
        attended = F.scaled_dot_product_attention(
            q.reshape(batch, rows, heads, -1).transpose(1, 2),
            k.reshape(batch, k.shape[1], heads, -1).transpose(1, 2),
            v.reshape(batch, v.shape[1], heads, -1).transpose(1, 2),
        )
        attended = attended.transpose(1, 2).reshape(batch, rows, w)
        x = x + F.linear(attended, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (w,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return F.layer_norm(x[:, 0], (w,), state["ln_post.weight"], state["ln_post.bias"]) @ state["proj"]


def build_model(config: ViTConfig, seed: int) -> VisionTransformer:
    """A freshly initialised encoder; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return VisionTransformer(config)


def state_dict_of(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's weights (what the merge API consumes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
