"""Image datasets held in memory as uint8, with batched augmentation on the device.

Every dataset is a 32×32 RGB classification set that fits in memory (CIFAR-10: 150 MB as uint8), so the
whole split lives in one uint8 tensor and a batch is a single indexing operation: the torch ``Dataset``
implements ``__getitems__`` (the DataLoader hands it all of a batch's indices at once), which returns the
batch's samples held as two stacked tensors (:class:`SampleBatch`), and the collate function takes them whole;
torch's default collate and ``Subset`` read the same object sample by sample. Augmentation (random translation, horizontal flip, cutout) and
normalisation then run on the device, on the whole batch at once, with independent random parameters per
sample (:func:`augment_batch`, :func:`normalize_batch`).

Loaders a user already has (any (image, label) batches, float or uint8) become a DataModule with
:class:`LoaderData`; how their images become inputs is :mod:`symstitch.inputs`.

Datasets are chosen by name from :data:`DATASETS`:

    >>> dm = DataModule(dataset="digits", batch_size=64)
    >>> dm.num_classes
    10
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.datasets import CIFAR10, CIFAR100

from symstitch.inputs import Normalization, Normalize, labelled_batch, loader_normalization, normalize_batch
from symstitch.registry import Registry

__all__ = [
    "DATASETS",
    "DataModule",
    "DatasetChecksumError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageData",
    "LoaderData",
    "Normalization",
    "TensorImageDataset",
    "augment_batch",
    "batch_loader",
    "channel_stats",
    "dataset_info",
    "SampleBatch",
    "collate_batch",
    "normalize_batch",
]


# ----------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class ImageData:
    """A whole image-classification dataset in memory.

    ``train_x``/``test_x`` are contiguous uint8 tensors of shape (N, 3, 32, 32), ``train_y``/``test_y`` int64
    class indices. ``mean``/``std`` are per-channel statistics of the training images on the 0..1 scale.
    ``flip`` says whether horizontal flips are a sensible default augmentation for this data.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    classes: list[str]


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it."""

    num_classes: int
    flip: bool


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not on disk and could not be downloaded."""


class DatasetChecksumError(RuntimeError):
    """The dataset's files are on disk but their MD5 checksums do not match the published ones."""


DATASETS: Registry[ImageData] = Registry("dataset")
#: (H, W) of every dataset's images
IMAGE_SIZE = (32, 32)
_INFO: dict[str, DatasetInfo] = {}


def _dataset(name: str, num_classes: int, flip: bool) -> Callable[[Callable[..., ImageData]], Callable[..., ImageData]]:
    """Register a loader ``(root, download, verify_checksums) -> ImageData`` together with its :class:`DatasetInfo`."""

    def decorator(loader: Callable[..., ImageData]) -> Callable[..., ImageData]:
        DATASETS.register(name)(loader)
        _INFO[name] = DatasetInfo(num_classes=num_classes, flip=flip)
        return loader

    return decorator


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes and default flip of dataset ``name``, without loading it (unknown names raise KeyError)."""
    DATASETS.get(name)
    return _INFO[name]


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and standard deviation (0..1 scale) of uint8 images (N, C, H, W).

    Computed from a 256-bin histogram per channel, so it needs no float copy of the data.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def _image_data(train_x, train_y, test_x, test_y, num_classes, flip, classes) -> ImageData:
    """Assemble an :class:`ImageData`, normalising layouts and computing the training statistics."""
    train_x, test_x = train_x.contiguous(), test_x.contiguous()
    mean, std = channel_stats(train_x)
    return ImageData(
        train_x=train_x,
        train_y=torch.as_tensor(train_y, dtype=torch.int64),
        test_x=test_x,
        test_y=torch.as_tensor(test_y, dtype=torch.int64),
        num_classes=num_classes,
        mean=mean,
        std=std,
        flip=flip,
        classes=list(classes),
    )


def _without_md5(cls: type) -> type:
    """A subclass of a torchvision CIFAR class whose integrity check only tests that the files exist.

    torchvision checks integrity in two places: ``_check_integrity`` (the data files), overridden here, and
    ``_load_meta`` (the meta file), which calls ``check_integrity(path, md5)``; that tests existence only
    when the MD5 is None, so the subclass sets the meta file's MD5 to None. All loading code stays
    torchvision's own.
    """

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

    return type(
        f"{cls.__name__}NoChecksum",
        (cls,),
        {"meta": {**cls.meta, "md5": None}, "_check_integrity": _check_integrity},
    )


def _cifar_files(cls: type) -> list[str]:
    """Names of the files a torchvision CIFAR class reads from its folder."""
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _load_cifar(cls: type, title: str, root: Path, download: bool, verify_checksums: bool) -> ImageData:
    """Load a CIFAR dataset through torchvision, turning its errors into one clear message."""
    folder = Path(root).expanduser().resolve() / cls.base_folder
    how = (
        "Download it with `--data.download true` (CLI) or `download=True` (Python), "
        f"or point `--data.root` at a folder that already holds {cls.base_folder}/."
    )
    loader_cls = cls if verify_checksums else _without_md5(cls)
    try:
        train = loader_cls(str(folder.parent), train=True, download=download)
        test = loader_cls(str(folder.parent), train=False, download=False)
    except RuntimeError as err:
        if all((folder / f).is_file() for f in _cifar_files(cls)):
            raise DatasetChecksumError(
                f"{title} files in {folder} fail torchvision's MD5 checksum check ({err}). Delete the folder "
                "and download again, or skip the check with `--data.verify_checksums false` (CLI) or "
                "`verify_checksums=False` (Python)."
            ) from None
        raise DatasetNotFoundError(f"{title} not found in {folder}. {how}") from None
    except OSError as err:  # includes urllib's URLError when there is no network
        raise DatasetNotFoundError(
            f"{title} not found in {folder} and the download failed ({err}). Check the network, or fetch "
            f"{cls.url} by hand and unpack it in {folder.parent}, or point `--data.root` at a folder that "
            f"already holds {cls.base_folder}/."
        ) from None

    def images(ds: Any) -> torch.Tensor:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()

    return _image_data(
        images(train), train.targets, images(test), test.targets, len(train.classes), True, train.classes
    )


@_dataset("cifar10", num_classes=10, flip=True)
def cifar10(root: Path, download: bool = False, verify_checksums: bool = True) -> ImageData:
    """CIFAR-10 (50,000 train / 10,000 test) from ``root/cifar-10-batches-py``."""
    return _load_cifar(CIFAR10, "CIFAR-10", root, download, verify_checksums)


@_dataset("cifar100", num_classes=100, flip=True)
def cifar100(root: Path, download: bool = False, verify_checksums: bool = True) -> ImageData:
    """CIFAR-100 with the 100 fine labels (50,000 train / 10,000 test) from ``root/cifar-100-python``."""
    return _load_cifar(CIFAR100, "CIFAR-100", root, download, verify_checksums)


DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@_dataset("digits", num_classes=10, flip=False)
def digits(root: Path = Path("data"), download: bool = False, verify_checksums: bool = True) -> ImageData:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images), as 32×32 RGB uint8.

    Values 0..16 are scaled to 0..255, upsampled bilinearly to 32×32 and copied to three channels. The
    1437/360 train/test split is stratified by class and fixed (seed 0), whatever the global random state.
    ``root``, ``download`` and ``verify_checksums`` are ignored: the data ships with scikit-learn.
    """
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=DIGITS_TEST_SIZE, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return _image_data(
        x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, False, [str(d) for d in range(10)]
    )


# ----------------------------------------------------------------------------------------------------------
# Batched loading


class SampleBatch(Sequence):
    """The samples of a batch, held as its two stacked tensors ``x`` and ``y``.

    To torch's default collate, ``Subset`` and any code that reads samples, it is the sequence of
    ``(image, label)`` pairs that torch's ``__getitems__`` contract asks for; :func:`collate_batch` takes the
    two tensors whole, so a batch costs one indexing operation.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SampleBatch(self.x[index], self.y[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of a batch of {len(self)}")
        return self.x[index], self.y[index]


class TensorImageDataset(Dataset):
    """Map-style dataset over in-memory tensors whose batches are fetched by one indexing operation.

    ``__getitems__`` receives every index of a batch (torch's DataLoader calls it when it exists) and returns
    its samples as a :class:`SampleBatch`: one ``index_select`` per tensor, read whole by :func:`collate_batch`
    (as :func:`batch_loader` does), sample by sample by torch's default collate, ``Subset`` and any other
    loader. ``__getitem__`` serves single samples. ``normalization``: how uint8 images become inputs (set by the
    DataModule), None otherwise.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, normalization: Optional[Normalization] = None):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y = x, y
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return SampleBatch(self.x.index_select(0, idx), self.y.index_select(0, idx))


def collate_batch(batch: Any) -> Any:
    """``(x, y)`` of a :class:`SampleBatch` as it is (no copy); any other list of samples by torch's default
    collate."""
    if isinstance(batch, SampleBatch):
        return batch.x, batch.y
    return default_collate(batch)


def batch_loader(
    dataset: TensorImageDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Optional[Sampler] = None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over a :class:`TensorImageDataset` that builds each batch with one ``__getitems__`` call
    (:func:`collate_batch`).

    It is an ordinary map-style loader (sampler + batch size), so Lightning can swap in a
    ``DistributedSampler`` under DDP.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_batch,
        persistent_workers=num_workers > 0,
    )


# ----------------------------------------------------------------------------------------------------------
# Batched augmentation and normalisation


def _randint(high: int, size: int, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``size`` uniform integers in [0, high), drawn on the generator's device and moved to ``x``'s."""
    device = generator.device if generator is not None else x.device
    return torch.randint(0, high, (size,), generator=generator, device=device).to(x.device)


def augment_batch(
    x: torch.Tensor,
    *,
    padding: int = 0,
    flip: bool = False,
    cutout: int = 0,
    channels_last: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random translation, horizontal flip and cutout of a batch (B, C, H, W), independently per sample.

    - translation: zero-pad by ``padding`` on every side and crop H×W at a random offset per sample, i.e.
      shift by (dy, dx) ∈ [-padding, padding]² with zero fill;
    - flip: mirror each sample left-right with probability ½ (after the crop);
    - cutout: zero a ``cutout``×``cutout`` square lying wholly inside the image, at a random place per sample.

    All three are one ``gather`` from the zero-padded batch with a per-pixel source index (cut-out pixels
    read a zero of the padding), written straight into the requested memory format (``channels_last``).
    All random draws are vectorised; ``generator`` fixes them. Works for any dtype on any device. With
    padding 0, flip off and cutout 0 the input is returned unchanged (only its memory format is set).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if padding < 0 or cutout < 0:
        raise ValueError("padding and cutout must be non-negative")
    if cutout > min(h, w):
        raise ValueError(f"cutout {cutout} is larger than the {h}×{w} image")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if padding == 0 and not flip and cutout == 0:
        return x.contiguous(memory_format=fmt)

    pad = max(padding, 1 if cutout else 0)  # cut-out pixels point at the zero corner of the padding
    hp, wp = h + 2 * pad, w + 2 * pad
    source = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, hp * wp)
    rows = (torch.arange(h, device=x.device) + pad).expand(b, h)
    cols = (torch.arange(w, device=x.device) + pad).expand(b, w)
    if padding > 0:
        rows = rows + (_randint(2 * padding + 1, b, x, generator) - padding)[:, None]
        cols = cols + (_randint(2 * padding + 1, b, x, generator) - padding)[:, None]
    if flip:
        mirror = _randint(2, b, x, generator).bool()
        cols = torch.where(mirror[:, None], cols.flip(-1), cols)
    index = rows[:, :, None] * wp + cols[:, None, :]  # (B, H, W) flat source pixel
    if cutout > 0:
        top = _randint(h - cutout + 1, b, x, generator)[:, None]
        left = _randint(w - cutout + 1, b, x, generator)[:, None]
        ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (ys >= top) & (ys < top + cutout)  # (B, H)
        in_cols = (xs >= left) & (xs < left + cutout)  # (B, W)
        index = index * ~(in_rows[:, :, None] & in_cols[:, None, :])  # flat pixel 0 is padding: zero
    out = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    torch.gather(source, 2, index.reshape(b, 1, h * w).expand(b, c, h * w), out=out.view(b, c, h * w))
    return out


# ----------------------------------------------------------------------------------------------------------
# LightningDataModule


class DataModule(pl.LightningDataModule):
    """In-memory 32×32 image classification data with batched, on-device augmentation.

    Loaders yield uint8 batches ``(x (B, 3, 32, 32), y int64)``; :meth:`on_after_batch_transfer` augments
    training batches on the device and normalises every batch to float32. Outside a Trainer,
    :meth:`loader` gives normalised float batches (``dm.loader("test")``), and the datasets carry their
    :class:`Normalization` (``dm.normalization``), which :func:`symstitch.metrics.similarity_matrix` applies to
    uint8 batches of these loaders by itself.

    Args:
        dataset: registered dataset name (see ``DATASETS.available()``): ``cifar10``, ``cifar100``, ``digits``.
        root: folder holding (or receiving) the dataset files.
        download: download the dataset into ``root`` if it is missing.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size.
        val_split: fraction of the training set held out for validation (seeded split); 0 validates on the
            test split.
        split_seed: seed of the validation split.
        crop_padding: random translation by up to this many pixels (zero padding + random crop); 0 disables.
        flip: random horizontal flips; None uses the dataset's default (on for CIFAR, off for digits).
        cutout: side of a zeroed square at a random place in each training image; 0 disables.
        channels_last: hand the model channels_last float batches.
        verify_checksums: check the MD5 of the CIFAR files (skipping it only checks that they exist).
        num_workers: DataLoader worker processes (0 is fastest for in-memory data on few cores).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        val_split: float = 0.0,
        split_seed: int = 0,
        crop_padding: int = 4,
        flip: Optional[bool] = None,
        cutout: int = 0,
        channels_last: bool = True,
        verify_checksums: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        info = dataset_info(dataset)
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split is a fraction in [0, 1), got {val_split}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = Path(root)
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_split = val_split
        self.split_seed = split_seed
        self.crop_padding = crop_padding
        self.flip = info.flip if flip is None else flip
        self.cutout = cutout
        self.channels_last = channels_last
        self.verify_checksums = verify_checksums
        self.num_workers = num_workers
        self.data: Optional[ImageData] = None
        self.train_set: Optional[TensorImageDataset] = None
        self.val_set: Optional[TensorImageDataset] = None
        self.test_set: Optional[TensorImageDataset] = None

    @property
    def num_classes(self) -> int:
        """Number of classes (known before :meth:`setup`)."""
        return dataset_info(self.dataset).num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training images, 0..1 scale (loads the data if needed)."""
        return self._load().mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the training images, 0..1 scale (loads the data if needed)."""
        return self._load().std

    @property
    def normalization(self) -> Normalization:
        """How uint8 images become network inputs: per-channel mean and std of the training images."""
        return Normalization(tuple(self.mean), tuple(self.std))

    def loader(self, split: str = "test", batch_size: Optional[int] = None) -> DataLoader:
        """Normalised float32 batches ``(x, y)`` of ``split`` (``train``, ``val`` or ``test``; un-augmented,
        unshuffled) for use outside a Trainer: what a network trained by this DataModule expects as input."""
        self.setup()
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        if split not in sets:
            raise ValueError(f"split is one of {', '.join(sets)}; got {split!r}")
        dataset = sets[split]
        x = normalize_batch(dataset.x, self.mean, self.std, channels_last=False)
        return batch_loader(TensorImageDataset(x, dataset.y), batch_size or self.eval_batch_size)

    def _load(self) -> ImageData:
        if self.data is None:
            loader = DATASETS.get(self.dataset)
            self.data = loader(self.root, download=self.download, verify_checksums=self.verify_checksums)
        return self.data

    def prepare_data(self) -> None:
        """Download the dataset (Lightning runs this on one process per node) when ``download`` is set."""
        if self.download:
            self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the dataset once and split off the validation set; later calls do nothing."""
        if self.train_set is not None:
            return
        data = self._load()
        norm = self.normalization
        self.test_set = TensorImageDataset(data.test_x, data.test_y, norm)
        n_val = round(self.val_split * len(data.train_y))
        if n_val == 0:
            self.train_set = TensorImageDataset(data.train_x, data.train_y, norm)
            self.val_set = self.test_set
            return
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        self.train_set = TensorImageDataset(data.train_x[train_idx], data.train_y[train_idx], norm)
        self.val_set = TensorImageDataset(data.train_x[val_idx], data.train_y[val_idx], norm)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return batch_loader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def _eval_loader(self, dataset: TensorImageDataset) -> DataLoader:
        """Unshuffled loader; under several processes each rank gets its own shard without padding."""
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return batch_loader(dataset, self.eval_batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.test_set)

    def _rank_generator(self, device: torch.device) -> Optional[torch.Generator]:
        """Under several processes, a generator per rank: every rank runs with the same global seed, and
        would otherwise draw the same shifts and flips for the same batch positions. ``None`` (the global
        generator, seeded by ``seed_everything``) in a single process."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        if getattr(self, "_generator", None) is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(torch.initial_seed() + 7919 * trainer.global_rank)
        return self._generator

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: augment training batches, then normalise every batch to float32.

        Floating-point batches are not images but ready inputs (e.g. the cached prefix activations a
        stitching module trains on): they pass through untouched.
        """
        x, y = batch
        if x.is_floating_point():
            return x, y
        if self.trainer is not None and self.trainer.training:
            x = augment_batch(
                x, padding=self.crop_padding, flip=self.flip, cutout=self.cutout, channels_last=self.channels_last,
                generator=self._rank_generator(x.device),
            )
        return normalize_batch(x, self.mean, self.std, self.channels_last), y


#: why loaders given from Python serve one process
ONE_PROCESS = ("loaders given from Python feed one process: under several processes Lightning would shard them "
               "with a sampler that repeats samples to even out the ranks (an inexact evaluation), and a DDP "
               "subprocess does not have them; use the DataModule (data settings) on several devices")


class LoaderData(pl.LightningDataModule):
    """The loaders a user has, as a DataModule: training on ``train``, validation on ``val`` (by default the test
    loader, as the :class:`DataModule` validates on the test split without ``val_split``), test on ``test``.

    Batches are ``(image, label)`` — a pair, or a dict with ``image`` and ``label`` — with integer class indices;
    anything else is a TypeError naming what came (:func:`~symstitch.inputs.labelled_batch`). Images are read as
    :func:`~symstitch.metrics.similarity_matrix` reads them: float images are the networks' inputs, taken as
    already normalised; uint8 images are normalised on the device, ``(x / 255 − mean) / std`` per channel, by
    ``normalize`` (a :class:`~symstitch.inputs.Normalization`, any callable, or a (mean, std) pair on the 0..1
    scale), by default by the normalisation the loader's dataset carries (the :class:`DataModule`'s loaders carry
    theirs), else an error at the first batch. Batches are used as they come, in the loader's order, with the
    loader's own augmentation if it has any (a shuffling loader draws its order from the global random state,
    which the run's seed fixes). One process only (:data:`ONE_PROCESS`).
    """

    def __init__(self, train: Iterable[Any], test: Iterable[Any], val: Optional[Iterable[Any]] = None,
                 normalize: Optional[Normalize] = None):
        super().__init__()
        self.loaders = {"train": train, "val": test if val is None else val, "test": test}
        self.normalizers = {split: loader_normalization(loader, normalize) for split, loader in self.loaders.items()}

    @staticmethod
    def check_one_process(trainer: Optional[pl.Trainer]) -> None:
        """Refuse a trainer of several processes (:data:`ONE_PROCESS`)."""
        if trainer is not None and trainer.world_size > 1:
            raise ValueError(ONE_PROCESS)

    def setup(self, stage: Optional[str] = None) -> None:
        self.check_one_process(self.trainer)

    def train_dataloader(self) -> Iterable[Any]:
        return self.loaders["train"]

    def val_dataloader(self) -> Iterable[Any]:
        return self.loaders["val"]

    def test_dataloader(self) -> Iterable[Any]:
        return self.loaders["test"]

    def prepare(self, batch: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of ``split``'s loader as ``(inputs, labels)`` (checked, uint8 images normalised)."""
        return labelled_batch(batch, self.normalizers[split], where=f"the {split} loader")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        split = "train" if trainer is not None and trainer.training else \
            "test" if trainer is not None and trainer.testing else "val"
        return self.prepare(batch, split)

    def batches(self, split: str, device: Union[str, torch.device]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` on ``device`` for every batch of ``split``'s loader, outside the Trainer's loops
        (a stitch's data start and its recalibration pass)."""
        for batch in self.loaders[split]:
            yield self.prepare(move_data_to_device(batch, device), split)
