"""Plain convolutional networks of the paper: mCNN and cwCNN.

Architecture (input 3×32×32), four layers k = 1..4 with channel counts ``widths``:

    layer1 = conv3×3 → [BatchNorm] → act                 32×32
    layer2 = maxpool2×2 → conv3×3 → [BatchNorm] → act    16×16
    layer3 = maxpool2×2 → conv3×3 → [BatchNorm] → act     8×8
    layer4 = maxpool2×2 → conv3×3 → [BatchNorm] → act     4×4
    classifier = maxpool2×2 → global average pool → flatten → linear

The max-pool that follows layer k is the first module of layer k+1, so each stage ends with its activation
module and the stitch points ``layer1.act`` … ``layer4.act`` are also the feature points.

* ``mcnn``:         widths 64-128-256-512, BatchNorm, ReLU
* ``mcnn_nobn``:    the same without BatchNorm (convolutions with bias)
* ``mcnn_sigmoid``: ``mcnn`` with Sigmoid activations
* ``mcnn_gelu``, ``mcnn_tanh``: ``mcnn`` with GELU, tanh activations (other intertwiner groups, docs/method.md §1)
* ``cwcnn``:        constant width 512, BatchNorm, ReLU
* ``cwcnn_nobn``:   ``cwcnn`` without BatchNorm

``width`` multiplies every channel count (rounded, at least 1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from symstitch.models.base import StagedNet, register
from symstitch.network import Site, plain_site

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "tanh": nn.Tanh}


def scaled(channels: int, width: float) -> int:
    """``channels × width`` rounded to an integer, at least 1."""
    return max(1, int(round(channels * width)))


class MCNN(StagedNet):
    """Four 3×3 conv layers with max-pooling in between, global pooling and a linear head (see module doc)."""

    def __init__(self, widths: Sequence[int], activation: str, batch_norm: bool, num_classes: int = 10):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
        self.activation = activation
        c_in = 3
        for k, c_out in enumerate(widths, start=1):
            parts: list[tuple[str, nn.Module]] = []
            if k > 1:
                parts.append(("pool", nn.MaxPool2d(2)))
            parts.append(("conv", nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)))
            if batch_norm:
                parts.append(("bn", nn.BatchNorm2d(c_out)))
            parts.append(("act", _ACTIVATIONS[activation]()))
            self.add_module(f"layer{k}", nn.Sequential(OrderedDict(parts)))
            c_in = c_out
        self.classifier = nn.Sequential(
            OrderedDict(
                pool=nn.MaxPool2d(2),
                gap=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                fc=nn.Linear(c_in, num_classes),
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.set_stages([(f"layer{k}.act", f"layer{k}") for k in range(1, len(widths) + 1)], head="classifier")

    def symmetry_sites(self) -> dict[str, Site]:
        """``layer{k}.act`` → next is ``layer{k+1}``: max-pool, conv; after the last: the classifier's
        max-pool, global average pool, flatten, Linear ``fc`` (docs/method.md §1)."""
        layers = [self.get_submodule(point.rsplit(".", 1)[0]) for point in self.stitch_points]
        head = self.classifier
        following = [((nxt.pool,), nxt.conv) for nxt in layers[1:]]
        following.append(((head.pool, head.gap, head.flatten), head.fc))
        return {
            point: plain_site(layer.conv, getattr(layer, "bn", None), between, next_layer)
            for point, layer, (between, next_layer) in zip(self.stitch_points, layers, following)
        }


def _widths(base: Sequence[int], width: float) -> list[int]:
    return [scaled(c, width) for c in base]


@register()
def mcnn(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """mCNN: 64-128-256-512 channels, BatchNorm, ReLU."""
    return MCNN(_widths((64, 128, 256, 512), width), "relu", True, num_classes)


@register()
def mcnn_nobn(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """mCNN without BatchNorm."""
    return MCNN(_widths((64, 128, 256, 512), width), "relu", False, num_classes)


@register()
def mcnn_sigmoid(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """mCNN with Sigmoid activations (and BatchNorm)."""
    return MCNN(_widths((64, 128, 256, 512), width), "sigmoid", True, num_classes)


@register()
def mcnn_gelu(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """mCNN with GELU activations (and BatchNorm): its intertwiner group is the permutations."""
    return MCNN(_widths((64, 128, 256, 512), width), "gelu", True, num_classes)


@register()
def mcnn_tanh(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """mCNN with tanh activations (and BatchNorm): its intertwiner group is the signed permutations."""
    return MCNN(_widths((64, 128, 256, 512), width), "tanh", True, num_classes)


@register()
def cwcnn(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """Constant-width CNN: 4 × 512 channels, BatchNorm, ReLU."""
    return MCNN(_widths((512,) * 4, width), "relu", True, num_classes)


@register()
def cwcnn_nobn(*, num_classes: int = 10, width: float = 1.0) -> MCNN:
    """Constant-width CNN without BatchNorm."""
    return MCNN(_widths((512,) * 4, width), "relu", False, num_classes)
