"""The IoU tally of network dissection (docs/method.md §6), vectorised over images, units and concepts.

For unit u with binary masks M_u(x) (its upsampled activation above T_u) and concept c with masks L_c(x)::

    IoU(u, c) = Σ_x |M_u(x) ∧ L_c(x)| / Σ_x |M_u(x) ∨ L_c(x)|,

the sums over the images x where c's primary category is labelled. With |A ∨ B| = |A| + |B| − |A ∧ B| the tally
keeps three running sums, and no loop over images or units:

- ``intersection`` (U, C + 1): Σ_x |M_u(x) ∧ L_c(x)|. Pixel concepts: the positions where some unit fires
  are listed once per batch (``nonzero``), and one ``bincount`` over u · (C + 1) + c at those positions adds a
  whole batch per label layer (weighted by whether c's primary category is labelled in that image, as every sum
  here). Image-level concepts cover the image, so Σ_x |M_u(x)| · [c ∈ x]: one matrix
  product of the units' areas (B, U) with the images' concepts (B, C + 1).
- ``unit_area`` (U, categories): Σ_x |M_u(x)| over the images where each category is labelled: (B, U)ᵀ (B, cat).
- ``concept_area`` (C + 1,): Σ_x |L_c(x)|, a ``bincount`` of the label maps (h · w per image for image-level c).

Memory is flat in the number of images: the sums are (U, C + 1) whatever the data's size.
"""

from __future__ import annotations

import torch

from symstitch.dissect.concepts import ConceptBatch

Tensor = torch.Tensor


class IoUTally:
    """Running sums of the IoU of every (unit, concept) pair over batches of unit masks and concept labels."""

    def __init__(self, units: int, primary: Tensor, image_level: Tensor, categories: int):
        """``primary``: long (C + 1,), each concept's category column (:meth:`ConceptSource.primary`, −1 for
        column 0); ``image_level``: bool (C + 1,), which concepts cover whole images; ``categories``: how many."""
        self.units, self.size = units, primary.numel()
        self.primary, self.image_level = primary.cpu(), image_level.cpu()
        self.intersection = torch.zeros(units, self.size, dtype=torch.float64)
        self.unit_area = torch.zeros(units, categories, dtype=torch.float64)
        self.concept_area = torch.zeros(self.size, dtype=torch.float64)
        self.labelled_area = torch.zeros(categories, dtype=torch.float64)
        self.images = 0

    def update(self, masks: Tensor, batch: ConceptBatch) -> None:
        """``masks``: bool (B, U, h, w) at the concepts' mask size, for the batch's images."""
        b, u, h, w = masks.shape
        if u != self.units or (h, w) != tuple(batch.pixel.shape[-2:]):
            raise ValueError(f"unit masks {tuple(masks.shape)} do not fit {self.units} units and label maps of "
                             f"size {tuple(batch.pixel.shape[-2:])}")
        masks, pixel = masks.cpu(), batch.pixel.cpu().clone()
        for k in range(1, pixel.shape[1]):  # L_c(x) is a set: a concept in two layers of a pixel counts once
            pixel[:, k][(pixel[:, k : k + 1] == pixel[:, :k]).any(dim=1)] = 0
        labelled = batch.labelled.cpu()[:, : self.unit_area.shape[1]]
        area = masks.sum(dim=(2, 3)).double()  # (B, U)
        self.unit_area += area.T @ labelled.double()
        self.labelled_area += labelled.double().sum(dim=0) * (h * w)
        # a concept counts only in the images where its primary category is labelled: (B, C + 1)
        counts = labelled[:, self.primary.clamp(min=0)] & (self.primary >= 0)
        hits = masks.nonzero()  # (n, 4): image, unit, row, column where a unit fires
        for layer in pixel.unbind(dim=1):  # K label layers: one bincount each
            labels = layer[hits[:, 0], hits[:, 2], hits[:, 3]]
            weight = counts[hits[:, 0], labels].double()
            self.intersection += torch.bincount(hits[:, 1] * self.size + labels, weights=weight,
                                                minlength=self.units * self.size).view(self.units, self.size)
            inside = counts.gather(1, layer.flatten(1)).double()  # (B, h·w): whether each pixel's concept counts
            self.concept_area += torch.bincount(layer.flatten(), weights=inside.flatten(), minlength=self.size)
        image = (batch.image.cpu() & counts & self.image_level).double()  # image-level concepts cover the image
        self.intersection += area.T @ image
        self.concept_area += image.sum(dim=0) * (h * w)
        self.images += b

    def coverage(self) -> Tensor:
        """(C + 1,): the fraction of the labelled pixels each concept covers (0 for column 0 and absent ones)."""
        area = self.labelled_area[self.primary.clamp(min=0)]
        cover = torch.where(area > 0, self.concept_area / area.clamp(min=1), torch.zeros_like(area))
        cover[0] = 0.0
        return cover

    def compute(self) -> Tensor:
        """IoU (U, C + 1); column 0 (no concept) and pairs with an empty union are 0."""
        union = self.unit_area[:, self.primary.clamp(min=0)] + self.concept_area - self.intersection
        iou = torch.where(union > 0, self.intersection / union.clamp(min=1), torch.zeros_like(union))
        iou[:, 0] = 0.0
        return iou


def unit_masks(activations: Tensor, thresholds: Tensor, size: tuple[int, int]) -> Tensor:
    """M_u(x) = [upsample_bilinear(a_u(x), size) > T_u]: bool (B, U, h, w) from (B, U, fh, fw) activations."""
    a = activations.float()
    if tuple(a.shape[-2:]) != tuple(size):
        a = torch.nn.functional.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return a > thresholds.to(a.device, a.dtype).view(1, -1, 1, 1)
