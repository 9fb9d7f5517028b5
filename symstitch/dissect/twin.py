"""The embedded concept twin: Broden-style concepts drawn on the bundled digits, with no download.

Every image and label is a deterministic function of the digit image and its index i, so the ground truth is
exact (docs/method.md §6 says what the twin can and cannot show):

==========  =====================================================================================
category    concepts
==========  =====================================================================================
color       the strokes' tint: ``grey``, ``red``, ``green``, ``blue``, ``yellow``, ``cyan``, ``magenta``,
            ``orange`` (i mod 8)
object      ``digit 0 strokes`` … ``digit 9 strokes``: the digit's stroke mask (grey level > 1/2)
part        ``upper stroke``, ``lower stroke``: the stroke mask in the top and bottom half
scene       ``digit 0`` … ``digit 9``: the class, covering the whole image
texture     ``stripes``, ``checks``, ``dots``: a faint pattern on the background (⌊i / 8⌋ mod 4; 0: none)
==========  =====================================================================================

The images are the digits dataset of :mod:`symstitch.data` (32×32 RGB, the DataModule's ``digits``), tinted and
textured as above; the masks are at the image's resolution. Every category is labelled in every image.

Its concepts are larger than most of Broden's: a unit's mask covers about a fraction q of the pixels, so its IoU
with a concept covering a fraction c of them is at most min(q, c) / max(q, c). The strokes of all digits cover
about a fifth of the pixels, so at NetDissect-Lite's q = 0.005 they could never reach IoU 0.04; hence one object
per digit class and eight tints (coverage about 0.02 each), and the twin's configs use q = 0.02, where every
concept can be reached (:meth:`symstitch.dissect.api.Dissection.ceilings` reports it per concept).
"""

from __future__ import annotations

from typing import Sequence

import torch

from symstitch.data import DATASETS
from symstitch.dissect.concepts import Concept, ConceptBatch, ConceptSource

Tensor = torch.Tensor

#: tint name → RGB multiplier of the strokes
TINTS = {"grey": (1.0, 1.0, 1.0), "red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.15, 0.15, 1.0),
         "yellow": (1.0, 1.0, 0.15), "cyan": (0.15, 1.0, 1.0), "magenta": (1.0, 0.15, 1.0), "orange": (1.0, 0.55, 0.1)}
TEXTURES = ("stripes", "checks", "dots")
#: grey level (0…1) of the texture drawn on the background
TEXTURE_LEVEL = 0.3
STROKE_LEVEL = 0.5
SPLITS = ("train", "test", "all")


def _texture(kind: str, size: int) -> Tensor:
    """bool (size, size): where a texture is drawn."""
    r = torch.arange(size).view(-1, 1).expand(size, size)
    c = torch.arange(size).view(1, -1).expand(size, size)
    if kind == "stripes":
        return r % 4 == 0
    if kind == "checks":
        return (r // 4 + c // 4) % 2 == 0
    return (r % 4 == 1) & (c % 4 == 1)  # dots


class DigitsTwin(ConceptSource):
    """The digits concept twin (see the module). ``split``: the digits' ``train`` (1437), ``test`` (360) or
    ``all`` images, in that order."""

    #: the twin's concepts cover 2–25 % of the pixels: at q = 0.02 every one of them can reach IoU 0.04
    default_q = 0.02

    def __init__(self, split: str = "all"):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of the digits twin; valid: {', '.join(SPLITS)}")
        data = DATASETS.build("digits")
        x = {"train": [data.train_x], "test": [data.test_x], "all": [data.train_x, data.test_x]}[split]
        y = {"train": [data.train_y], "test": [data.test_y], "all": [data.train_y, data.test_y]}[split]
        self.grey = torch.cat(x)[:, 0].float() / 255.0  # (N, 32, 32)
        self.classes = torch.cat(y)
        self.name = f"digits-twin:{split}"
        names = [("color", t) for t in TINTS] + [("object", f"digit {d} strokes") for d in range(10)]
        names += [("part", "upper stroke"), ("part", "lower stroke")]
        names += [("scene", f"digit {d}") for d in range(10)] + [("texture", t) for t in TEXTURES]
        self._concepts = [Concept(i + 1, name, category) for i, (category, name) in enumerate(names)]
        self._number = {c.name: c.number for c in self._concepts}
        size = self.grey.shape[-1]
        self._patterns = torch.stack([_texture(t, size) for t in TEXTURES])

    @property
    def concepts(self) -> Sequence[Concept]:
        return self._concepts

    @property
    def categories(self) -> Sequence[str]:
        return ("color", "object", "part", "scene", "texture")

    @property
    def image_categories(self) -> Sequence[str]:
        return ("scene", "texture")

    @property
    def mask_size(self) -> tuple[int, int]:
        return tuple(self.grey.shape[-2:])

    def __len__(self) -> int:
        return self.grey.shape[0]

    def tint(self, i: Tensor) -> Tensor:
        """The tint index (into :data:`TINTS`) of images ``i``."""
        return i % len(TINTS)

    def texture(self, i: Tensor) -> Tensor:
        """The texture of images ``i``: 0 none, t + 1 for ``TEXTURES[t]``."""
        return (i // len(TINTS)) % (len(TEXTURES) + 1)

    def get(self, indices: Sequence[int]) -> ConceptBatch:
        i = torch.as_tensor(list(indices), dtype=torch.long)
        if i.numel() and (i.min() < 0 or i.max() >= len(self)):
            raise IndexError(f"image index out of range 0…{len(self) - 1}")
        grey = self.grey[i]  # (B, h, w)
        stroke = grey > STROKE_LEVEL
        tint = torch.tensor(list(TINTS.values()))[self.tint(i)]  # (B, 3)
        texture = self.texture(i)
        pattern = torch.cat([torch.zeros_like(self._patterns[:1]), self._patterns])[texture]  # (B, h, w)
        background = torch.where(pattern & ~stroke, torch.tensor(TEXTURE_LEVEL), torch.tensor(0.0))
        images = torch.maximum(grey.unsqueeze(1) * tint.view(-1, 3, 1, 1), background.unsqueeze(1))

        n = self._number
        b, h, w = grey.shape
        color = torch.where(stroke, n["grey"] + self.tint(i).view(-1, 1, 1), 0)
        obj = torch.where(stroke, n["digit 0 strokes"] + self.classes[i].view(-1, 1, 1), 0)
        upper = torch.arange(h).view(1, -1, 1) < h // 2
        part = torch.where(stroke, torch.where(upper, n["upper stroke"], n["lower stroke"]), 0)
        pixel = torch.stack([color, obj, part], dim=1).long()

        image = torch.zeros(b, len(self._concepts) + 1, dtype=torch.bool)
        rows = torch.arange(b)
        image[rows, n["digit 0"] + self.classes[i]] = True
        has = texture > 0
        image[rows[has], n[TEXTURES[0]] + texture[has] - 1] = True
        labelled = torch.ones(b, len(self.categories), dtype=torch.bool)
        return ConceptBatch(images.clamp(0, 1), pixel, image, labelled, i)
