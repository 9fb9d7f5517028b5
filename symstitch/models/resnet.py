"""CIFAR ResNets (He et al. 2016, §4.2) and the CIFAR ResNet-18.

Architecture (input 3×32×32):

    stem   = conv3×3 → BatchNorm → ReLU
    layerS = BasicBlock × n                 (first block of a stage may subsample by stride 2)
    classifier = global average pool → flatten → linear

BasicBlock, children registered in this order: ``conv1, bn1, act1, conv2, bn2, shortcut, act2``;

    out = act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))

* ``resnet20/32/44/56/110``: depth 6n+2, three stages of n blocks with 16-32-64 channels (strides 1, 2, 2),
  option-A shortcuts: parameter-free, ``x[:, :, ::2, ::2]`` and zero channels appended where the shape
  changes, identity elsewhere.
* ``resnet18``: the CIFAR ResNet-18: 3×3 stem with 64 channels, four stages of 2 blocks with 64-128-256-512
  channels (strides 1, 2, 2, 2), option-B shortcuts (1×1 conv + BatchNorm projection) where the shape changes.

Stitch points: ``stem.act`` and every block's ``act2`` (``layer1.0.act2``, …); inner points (see
``symstitch.models.base``): every block's ``act1``, with the block input as carry (ResNet-20: 10 + 9 = the
paper's 19 points); feature points: all of them. ``width`` multiplies every channel count (rounded, at least 1).
Convolutions have no bias and use Kaiming-normal initialisation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from symstitch.models.base import StagedNet, register
from symstitch.models.mcnn import scaled
from symstitch.network import Segment, Site, plain_site


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and append ``out_channels - in_channels`` zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra}"


def _shortcut(c_in: int, c_out: int, stride: int, option: str) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if option == "A":
        return ShortcutA(c_in, c_out, stride)
    return nn.Sequential(
        OrderedDict(conv=nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), bn=nn.BatchNorm2d(c_out))
    )


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; ``act2`` is applied after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride, option)
        self.act2 = nn.ReLU()

    def enter(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner point ``act1`` and the carry, the block input that the shortcut takes."""
        return self.act1(self.bn1(self.conv1(x))), x

    def leave(self, h: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        """The rest of the block from ``act1``'s output ``h``, the shortcut applied to ``carry``."""
        return self.act2(self.bn2(self.conv2(h)) + self.shortcut(carry))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leave(*self.enter(x))


class CifarResNet(StagedNet):
    """Stem, stages of BasicBlocks (stage j has ``blocks[j]`` blocks of ``widths[j]`` channels), linear head."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        option: str = "A",
        num_classes: int = 10,
    ):
        super().__init__()
        if option not in ("A", "B"):
            raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(stem_width),
                act=nn.ReLU(),
            )
        )
        stages, inner = [("stem.act", "stem")], []
        c_in = stem_width
        for j, (n, c_out) in enumerate(zip(blocks, widths), start=1):
            layer = []
            for b in range(n):
                stride = 2 if (b == 0 and j > 1) else 1
                layer.append(BasicBlock(c_in, c_out, stride, option))
                stages.append((f"layer{j}.{b}.act2", f"layer{j}.{b}"))
                inner.append((f"layer{j}.{b}.act1", f"layer{j}.{b}.act2"))
                c_in = c_out
            self.add_module(f"layer{j}", nn.Sequential(*layer))
        self.classifier = nn.Sequential(
            OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(c_in, num_classes))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.set_stages(stages, head="classifier", inner=inner)

    def symmetry_sites(self) -> dict[str, Site]:
        """Block-internal ``layerS.b.act1`` (conv1 → bn1 → act1 → conv2), and the residual stream ``stem.act``,
        ``layerS.b.act2``: g acts on the whole segment of the point (every block output of the stage, the
        next blocks' inputs), on the earlier segments joined to it by zero-padding shortcuts through its top-left
        blocks, and on the later ones as g ⊕ I; option-B shortcuts end a segment and absorb it (docs/method.md §1)."""
        stages = self.stages()
        sites = {}
        for point in self.inner_points:
            block = stages[self._inner[point]][1]
            sites[point] = plain_site(block.conv1, block.bn1, (), block.conv2)
        segments = self._stream_segments()
        for points, segment, start in segments:
            joined = [s for _, s, st in segments if st == start]  # the segments of this run, in order
            earlier = [s.size for s in joined if s.size < segment.size]
            blocks = tuple(b - a for a, b in zip([0] + earlier, earlier + [segment.size]))
            others = tuple(s for s in joined if s is not segment)
            for point in points:
                sites[point] = Site((segment,) + others, (), blocks)
        order = {point: i for i, point in enumerate(self.feature_points)}
        return dict(sorted(sites.items(), key=lambda item: order[item[0]]))

    def _stream_segments(self) -> list[tuple[list[str], Segment, int]]:
        """The residual stream cut into segments: ``([stitch points], Segment, run)`` in forward order; segments
        of one ``run`` are joined by zero-padding shortcuts (each is the previous one plus channels).

        The stream is the stem's output, then every block's output ``act2(bn2(conv2(·)) + shortcut(x))``. A block
        whose shortcut is the identity, or an option-A zero-padding shortcut, continues the segment of its input
        (the padding grows it: its first channels are the previous ones); a block with an option-B projection
        shortcut (1×1 conv + BatchNorm) starts a new segment, its shortcut being one more producer, and consumes
        the previous segment through that 1×1 conv as well as through its conv1.
        """
        stages = self.stages()  # stem, then every block
        runs: list[list[int]] = []
        for k, (_, module) in enumerate(stages):
            projects = k == 0 or isinstance(module.shortcut, nn.Sequential)
            if projects:
                runs.append([k])
            else:
                runs[-1].append(k)
        segments = []
        for run in runs:
            for k in run:
                point, module = stages[k]
                if k == 0:
                    producers = [(module.conv, module.bn)]
                else:
                    producers = [(module.conv2, module.bn2)]
                    if isinstance(module.shortcut, nn.Sequential):
                        producers.append((module.shortcut.conv, module.shortcut.bn))
                if k + 1 < len(stages):
                    nxt = stages[k + 1][1]
                    consumers = [nxt.conv1] + ([nxt.shortcut.conv] if isinstance(nxt.shortcut, nn.Sequential) else [])
                else:
                    consumers = [self.classifier.fc]  # after global average pooling and flatten: both linear
                size = producers[0][0].out_channels
                segments.append(([point], Segment(size, tuple(producers), tuple(consumers)), run[0]))
        # merge the stages of one run that have the same size into one segment per size
        merged: list[tuple[list[str], Segment, int]] = []
        for points, segment, start in segments:
            if merged and merged[-1][2] == start and merged[-1][1].size == segment.size:
                last_points, last, _ = merged.pop()
                segment = Segment(segment.size, last.producers + segment.producers, last.consumers + segment.consumers)
                points = last_points + points
            merged.append((points, segment, start))
        return merged


def _cifar_resnet(depth: int, num_classes: int, width: float) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    widths = [scaled(c, width) for c in (16, 32, 64)]
    return CifarResNet([n] * 3, widths, widths[0], "A", num_classes)


@register()
def resnet20(*, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-20 (n = 3), option-A shortcuts."""
    return _cifar_resnet(20, num_classes, width)


@register()
def resnet32(*, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-32 (n = 5), option-A shortcuts."""
    return _cifar_resnet(32, num_classes, width)


@register()
def resnet44(*, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-44 (n = 7), option-A shortcuts."""
    return _cifar_resnet(44, num_classes, width)


@register()
def resnet56(*, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-56 (n = 9), option-A shortcuts."""
    return _cifar_resnet(56, num_classes, width)


@register()
def resnet110(*, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-110 (n = 18), option-A shortcuts."""
    return _cifar_resnet(110, num_classes, width)


@register()
def resnet18(*, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-18: 64-128-256-512 channels, 2 blocks per stage, option-B shortcuts."""
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    return CifarResNet([2, 2, 2, 2], widths, widths[0], "B", num_classes)
