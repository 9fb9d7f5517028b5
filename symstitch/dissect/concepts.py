"""Concept data for network dissection (docs/method.md §6): images with labelled concepts, in one format that
Broden (:mod:`symstitch.dissect.broden`) and the embedded digits twin (:mod:`symstitch.dissect.twin`) both give.

A concept has a number (1…C; 0 means "no concept"), a name and one *primary category*: the category in which
it counts (Broden lists several for some labels; the one where it is most frequent is primary). A category is
either

- a *pixel* category (colour, object, part, material): each image holds label maps at the mask resolution, a
  pixel carrying zero, one or several concepts (Broden joins several masks of one category by ``;``), or
- an *image* category (scene, texture): the concept covers the whole image.

A concept's IoU counts only the images where its primary category is labelled at all (``labelled``).

A :class:`ConceptBatch` holds what the tally needs for a batch of images; a :class:`ConceptSource` serves them
in a fixed order and by index (the top images of a unit are fetched again to draw their masks).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

Tensor = torch.Tensor

#: NetDissect-Lite's category names, in Broden's order; a source may have any subset, or others
PIXEL_CATEGORIES = ("color", "object", "part", "material")
IMAGE_CATEGORIES = ("scene", "texture")


@dataclass(frozen=True)
class Concept:
    """A labelled concept: ``number`` (≥ 1), ``name`` and its primary ``category``."""

    number: int
    name: str
    category: str


@dataclass
class ConceptBatch:
    """Concept labels of a batch of B images.

    - ``images``: float (B, 3, H, W) on the 0…1 scale (the dissector normalises them as the network's data);
    - ``pixel``: long (B, K, h, w), concept numbers of the pixel categories at the mask size (h, w), K layers
      (0: no concept; a pixel with several concepts has one per layer);
    - ``image``: bool (B, C + 1), the image-level concepts present (column 0 unused);
    - ``labelled``: bool (B, number of categories), which categories each image has labels of;
    - ``index``: long (B,), the images' indices in their source.
    """

    images: Tensor
    pixel: Tensor
    image: Tensor
    labelled: Tensor
    index: Tensor

    def __post_init__(self) -> None:
        b = self.images.shape[0]
        shapes = {"pixel": self.pixel, "image": self.image, "labelled": self.labelled, "index": self.index}
        wrong = [name for name, t in shapes.items() if t.shape[0] != b]
        if self.images.dim() != 4 or self.pixel.dim() != 4 or wrong:
            raise ValueError(f"a concept batch needs images (B, 3, H, W) and pixel labels (B, K, h, w), and the "
                             f"same B everywhere; got images {tuple(self.images.shape)}, pixel "
                             f"{tuple(self.pixel.shape)}" + (f", a different B in {', '.join(wrong)}" if wrong else ""))

    def to(self, device: torch.device | str) -> "ConceptBatch":
        return ConceptBatch(*(t.to(device) for t in (self.images, self.pixel, self.image, self.labelled,
                                                      self.index)))


class ConceptSource(abc.ABC):
    """Images with concept labels, served in batches in a fixed order and by index."""

    #: what messages and reports call the source (``digits-twin``, ``broden:/data/broden1_224``)
    name: str = "concepts"
    #: the top quantile q of each unit's activations that makes its mask, unless a dissection sets one:
    #: NetDissect-Lite's 0.005, made for Broden's many small concepts
    default_q: float = 0.005

    @property
    @abc.abstractmethod
    def concepts(self) -> Sequence[Concept]:
        """Every concept, numbered 1…C in order (``concepts[i].number == i + 1``)."""

    @property
    @abc.abstractmethod
    def categories(self) -> Sequence[str]:
        """The categories, in the column order of :attr:`ConceptBatch.labelled`."""

    @property
    @abc.abstractmethod
    def image_categories(self) -> Sequence[str]:
        """The categories whose concepts cover whole images (the rest are pixel categories)."""

    @property
    @abc.abstractmethod
    def mask_size(self) -> tuple[int, int]:
        """(h, w) of the pixel labels."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of images."""

    @abc.abstractmethod
    def get(self, indices: Sequence[int]) -> ConceptBatch:
        """The images ``indices`` with their labels."""

    def batches(self, batch_size: int = 64, limit: Optional[int] = None) -> Iterator[ConceptBatch]:
        """Every image (the first ``limit`` ones when given), ``batch_size`` at a time, in order."""
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.get(range(start, min(start + batch_size, n)))

    # ------------------------------------------------------------------ derived tables
    def primary(self) -> Tensor:
        """long (C + 1,): the column of each concept's primary category in :attr:`categories` (−1 for 0)."""
        column = {c: i for i, c in enumerate(self.categories)}
        unknown = sorted({c.category for c in self.concepts} - set(column))
        if unknown:
            raise ValueError(f"{self.name}: concepts in categories {', '.join(unknown)} that the source does not "
                             f"list ({', '.join(self.categories)})")
        return torch.tensor([-1] + [column[c.category] for c in self.concepts], dtype=torch.long)

    def image_level(self) -> Tensor:
        """bool (C + 1,): which concepts are image-level (their category is an image category)."""
        image = set(self.image_categories)
        return torch.tensor([False] + [c.category in image for c in self.concepts])

    def check(self) -> None:
        """A clear ``ValueError`` where the concepts are not numbered 1…C."""
        numbers = [c.number for c in self.concepts]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"{self.name}: concepts must be numbered 1…C in order, got {numbers[:10]}…")
