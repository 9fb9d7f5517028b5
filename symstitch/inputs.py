"""Network inputs from batches as users have them: one home for how every tool reads a loader.

A batch holds images, as a tensor, an ``(image, label)`` tuple or list, or a dict with ``image`` (or ``x``) and
``label`` (or ``y``). Float images are taken as the network's inputs, already normalised; uint8 images are
normalised per channel, ``(x / 255 − mean) / std`` (:class:`Normalization`, the DataModule's own), by the
normalisation a tool is given or, by default, by the one the loader's dataset carries (``dataset.normalization``:
the :class:`~symstitch.data.DataModule`'s datasets carry theirs, so that their uint8 batches are normalised as in
training). :func:`symstitch.metrics.similarity_matrix` reads images with :func:`batch_images`;
:class:`~symstitch.data.LoaderData` (stitching on loaders, :func:`symstitch.stitching.stitch`) reads
``(image, label)`` batches with :func:`labelled_batch`.

Torch only, so that the metrics import without Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

Tensor = torch.Tensor


def normalize_batch(
    x: torch.Tensor,
    mean: Union[Sequence[float], torch.Tensor],
    std: Union[Sequence[float], torch.Tensor],
    channels_last: bool = True,
) -> torch.Tensor:
    """Float32 ``(x / 255 − mean) / std`` per channel of a uint8 batch (B, C, H, W), optionally channels_last.

    Computed as ``x · a − b`` with per-channel constants laid out like the batch, so that a channels_last
    input (as :func:`~symstitch.data.augment_batch` writes it) is normalised without a layout change.
    """
    out = x.float()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    scale = torch.empty_like(out[:1]).copy_(1.0 / (255.0 * std))  # one image, laid out like the batch
    shift = torch.empty_like(out[:1]).copy_(mean / std)
    out.mul_(scale).sub_(shift)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / 255 − mean) / std`` of uint8 images (0..1 scale ``mean`` and ``std``): how the
    DataModule turns its uint8 batches into network inputs. Its datasets carry it (``dataset.normalization``),
    so that a tool given one of its loaders outside a Trainer (:func:`symstitch.metrics.similarity_matrix`,
    :func:`symstitch.stitching.stitch`) normalises the batches exactly as training did."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        return normalize_batch(x, self.mean, self.std, channels_last)


Normalize = Union[Normalization, Callable[[Tensor], Tensor], tuple[Sequence[float], Sequence[float]]]


def loader_normalization(loader: Any, normalize: Optional[Normalize] = None) -> Optional[Callable[[Tensor], Tensor]]:
    """How a loader's uint8 images become inputs: ``normalize`` (a :class:`Normalization`, any callable, or a
    (mean, std) pair on the 0..1 scale) when given, else the loader's dataset's own ``normalization`` (None when
    it has none: then only float batches are accepted), looked up through wrappers such as ``Subset``."""
    if normalize is None:
        dataset = getattr(loader, "dataset", None)
        for _ in range(8):  # through wrappers that keep the images (torch's Subset and the like)
            if dataset is None or hasattr(dataset, "normalization"):
                break
            dataset = getattr(dataset, "dataset", None)
        return getattr(dataset, "normalization", None)
    if callable(normalize):
        return normalize
    mean, std = normalize
    return Normalization(tuple(mean), tuple(std))


def network_input(x: Tensor, normalize: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
    """Images as network inputs: float images as they are, uint8 images through ``normalize`` (else an error
    that says how to give it)."""
    if x.is_floating_point():
        return x
    if normalize is None:
        raise ValueError(f"the dataloader yields {x.dtype} images, and it does not say how they are normalised: pass "
                         "normalize=dm.normalization (or (mean, std), 0..1 scale), or use dm.loader('test'), whose "
                         "batches are normalised already")
    return normalize(x)


def batch_images(batch: Any, normalize: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The images of a batch (a tensor, the first item of (x, y), or a dict's ``image``/``x``) as network inputs
    (:func:`network_input`)."""
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    elif isinstance(batch, dict) and isinstance(batch.get("image", batch.get("x")), Tensor):
        x = batch.get("image", batch.get("x"))
    else:
        raise TypeError(f"dataloader batches must be tensors, (x, y) tuples or dicts with 'image'; got "
                        f"{describe(batch)}")
    return network_input(x, normalize)


def labelled_batch(batch: Any, normalize: Optional[Callable[[Tensor], Tensor]] = None,
                   where: str = "the dataloader") -> tuple[Tensor, Tensor]:
    """``(images as network inputs, labels)`` of an (image, label) batch — a pair, or a dict with ``image``
    (``x``) and ``label`` (``y``) — with labels (N,) integer class indices, one per image; anything else is a
    TypeError saying what ``where`` yielded."""
    if isinstance(batch, dict):
        x, y = batch.get("image", batch.get("x")), batch.get("label", batch.get("y"))
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        x = y = None
    if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() >= 1 and y.dim() == 1
            and not y.is_floating_point() and not y.is_complex() and len(x) == len(y)):
        raise TypeError(f"{where} must yield (image, label) batches — images (N, C, H, W) and integer class "
                        f"indices (N,), as a pair or a dict with 'image' and 'label'; got {describe(batch)}")
    return network_input(x, normalize), y


def describe(value: Any) -> str:
    """A short description of a batch for error messages: its types and tensor shapes."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value[:4]) + (", …" if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


__all__ = [
    "Normalization",
    "batch_images",
    "describe",
    "labelled_batch",
    "loader_normalization",
    "network_input",
    "normalize_batch",
]
