"""A small Compact Convolutional Transformer (Hassani et al. 2021, CCT-7/3x1 style, fewer layers).

Architecture (input 3×32×32, defaults at ``width = 1``; tokens are (N, L, C)):

    tokenizer = 2 × [conv3×3 (no bias) → ReLU → maxpool3×3 stride 2 padding 1]
                channels 3→64→128, spatial 32→16→8
                → flatten to L = 64 tokens of C = 128 → + learnable positional embedding
    blocks.i  = pre-norm transformer encoder layer, i = 0, 1:
                x = x + attn(norm1(x));  x = x + mlp(norm2(x))
                attn: 2 heads, ``scaled_dot_product_attention``
                mlp: linear C→2C → GELU (``act``) → linear 2C→C
    classifier = LayerNorm → sequence pooling (softmax over L of a linear score, weighted token sum) → linear

Stitch points: ``tokenizer``, ``blocks.0``, ``blocks.1`` (stitching acts on the embedding dimension C);
feature points: ``tokenizer.layers.{0,1}.act`` (ReLU) and ``blocks.{i}.mlp.act`` (GELU). No dropout.
``width`` multiplies the channel counts; C is rounded to a multiple of the number of heads.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from symstitch.models.base import StagedNet, register
from symstitch.models.mcnn import scaled


class Tokenizer(nn.Module):
    """Convolutional tokenizer: conv-ReLU-maxpool layers, flattened to tokens, plus positional embedding."""

    def __init__(self, channels: list[int], num_tokens: int):
        super().__init__()
        layers = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers.append(
                nn.Sequential(
                    OrderedDict(
                        conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                        act=nn.ReLU(),
                        pool=nn.MaxPool2d(3, stride=2, padding=1),
                    )
                )
            )
        self.layers = nn.Sequential(*layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, channels[-1]))
        nn.init.trunc_normal_(self.pos_embed, std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, L, C)
        return x + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention over (N, L, C) tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, L, C / heads)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SeqPoolHead(nn.Module):
    """Final LayerNorm, sequence pooling (attention weights over the L tokens) and the classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        weights = self.score(x).softmax(dim=1)  # (N, L, 1)
        return self.fc((weights * x).sum(dim=1))


class CCT(StagedNet):
    """Compact Convolutional Transformer: tokenizer, ``blocks`` (ModuleList), sequence-pooling head."""

    activation = "gelu"

    def __init__(
        self,
        num_classes: int = 10,
        embed_dim: int = 128,
        conv_channels: int = 64,
        num_conv_layers: int = 2,
        num_layers: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        img_size: int = 32,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        channels = [3] + [conv_channels] * (num_conv_layers - 1) + [embed_dim]
        side = img_size
        for _ in range(num_conv_layers):
            side = (side - 1) // 2 + 1  # maxpool 3×3, stride 2, padding 1
        self.tokenizer = Tokenizer(channels, side * side)
        self.blocks = nn.ModuleList(EncoderBlock(embed_dim, num_heads, mlp_ratio) for _ in range(num_layers))
        self.classifier = SeqPoolHead(embed_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        stages = [("tokenizer", "tokenizer")] + [(f"blocks.{i}", f"blocks.{i}") for i in range(num_layers)]
        self.set_stages(stages, head="classifier")


@register()
def cct(
    *,
    num_classes: int = 10,
    width: float = 1.0,
    num_layers: int = 2,
    num_heads: int = 2,
    mlp_ratio: float = 2.0,
) -> CCT:
    """Small CCT: embedding 128×width (a multiple of ``num_heads``), tokenizer 3→64×width→embedding."""
    embed_dim = num_heads * scaled(128 // num_heads, width)
    return CCT(
        num_classes=num_classes,
        embed_dim=embed_dim,
        conv_channels=scaled(64, width),
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )
