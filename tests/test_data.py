"""Tests of symstitch.data: datasets, batched loading, batched augmentation, splits and DDP sharding."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from symstitch.data import (
    DATASETS,
    DataModule,
    DatasetChecksumError,
    DatasetNotFoundError,
    TensorImageDataset,
    augment_batch,
    batch_loader,
    dataset_info,
    normalize_batch,
)
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------------------------
# helpers


def shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference translation by explicit slicing: out[:, i, j] = img[:, i - dy, j - dx], zero outside."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def nonzero_images(n: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (n, 3, 32, 32) with values 1..255, so zero fill is recognisable."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def fake_trainer(training: bool = False, world_size: int = 1, global_rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(training=training, world_size=world_size, global_rank=global_rank)


def row_keys(x: torch.Tensor) -> list[bytes]:
    return [bytes(row) for row in x.reshape(len(x), -1).numpy()]


# ----------------------------------------------------------------------------------------------------------
# fake CIFAR files in the real on-disk format


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def fake_cifar(tmp_path: Path) -> dict:
    """Write small CIFAR-10 and CIFAR-100 folders (python-pickle format, rows of 3072 CHW bytes)."""
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    train_rows, train_labels = [], []
    for k in range(1, 6):
        rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        train_rows.append(rows)
        train_labels += labels
        _dump(c10 / f"data_batch_{k}", {
            "batch_label": f"training batch {k} of 5", "labels": labels, "data": rows,
            "filenames": [f"img_{k}_{i}.png" for i in range(3)],
        })
    test10 = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    test10_labels = rng.integers(0, 10, 4).tolist()
    _dump(c10 / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test10_labels, "data": test10,
        "filenames": [f"test_{i}.png" for i in range(4)],
    })
    _dump(c10 / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 3,
                                 "num_vis": 3072})

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    splits100 = {}
    for name, n in [("train", 6), ("test", 5)]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        splits100[name] = (rows, fine)
        _dump(c100 / name, {
            "filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
            "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": rows,
        })
    _dump(c100 / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                          "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return {
        "root": tmp_path,
        "cifar10": (np.concatenate(train_rows), train_labels, test10, test10_labels),
        "cifar100": (*splits100["train"], *splits100["test"]),
    }


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_round_trip(fake_cifar, name, num_classes):
    dm = DataModule(dataset=name, root=str(fake_cifar["root"]), verify_checksums=False)
    dm.setup()
    data = dm.data
    train_rows, train_labels, test_rows, test_labels = fake_cifar[name]
    for x, rows in [(data.train_x, train_rows), (data.test_x, test_rows)]:
        assert x.dtype == torch.uint8 and x.is_contiguous() and x.shape == (len(rows), 3, 32, 32)
        n, c, h, w = len(rows) - 1, 2, 5, 17
        assert x[n, c, h, w].item() == rows[n, c * 1024 + h * 32 + w]
        assert torch.equal(x, torch.from_numpy(rows).reshape(-1, 3, 32, 32))
    assert data.train_y.tolist() == train_labels and data.test_y.tolist() == test_labels
    assert data.train_y.dtype == torch.int64
    assert data.num_classes == num_classes == dm.num_classes and len(data.classes) == num_classes
    assert data.flip and dm.flip
    expected_mean = data.train_x.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(torch.tensor(data.mean, dtype=torch.float64), expected_mean)


def test_cifar_missing_raises_clear_error(tmp_path):
    dm = DataModule(dataset="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in message
    assert "download" in message and "--data.download true" in message and "--data.root" in message
    assert isinstance(err.value, FileNotFoundError)


def test_cifar_checksums_fail_on_fake_files(fake_cifar):
    dm = DataModule(dataset="cifar10", root=str(fake_cifar["root"]), verify_checksums=True)
    with pytest.raises(DatasetChecksumError, match="checksum") as err:
        dm.setup()
    assert "verify_checksums" in str(err.value)
    assert str(fake_cifar["root"].resolve() / "cifar-10-batches-py") in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_data():
    return DATASETS.get("digits")(Path("data"), download=False, verify_checksums=True)


def test_digits_shapes_and_types(digits_data):
    d = digits_data
    assert d.train_x.shape == (1437, 3, 32, 32) and d.test_x.shape == (360, 3, 32, 32)
    assert d.train_x.dtype == d.test_x.dtype == torch.uint8
    assert d.train_x.is_contiguous() and d.test_x.is_contiguous()
    assert d.train_y.dtype == d.test_y.dtype == torch.int64
    assert d.num_classes == 10 and dataset_info("digits").num_classes == 10
    assert not d.flip and d.classes == [str(i) for i in range(10)]
    assert torch.equal(d.train_x[:, 0], d.train_x[:, 2])  # grey replicated to RGB
    assert d.train_x.max() == 255 and d.train_x.min() == 0
    assert len(d.mean) == len(d.std) == 3 and all(0 < s < 1 for s in d.std)


def test_digits_split_is_fixed(digits_data):
    torch.manual_seed(123)
    np.random.seed(123)
    again = DATASETS.get("digits")(Path("data"), download=False, verify_checksums=True)
    assert torch.equal(again.train_x, digits_data.train_x) and torch.equal(again.test_y, digits_data.test_y)


def test_digits_split_is_a_stratified_partition(digits_data):
    from sklearn.datasets import load_digits

    d = digits_data
    # the 1797 images are distinct, so distinct rows in train ∪ test = every image exactly once
    train_rows, test_rows = set(row_keys(d.train_x)), set(row_keys(d.test_x))
    assert len(train_rows) == 1437 and len(test_rows) == 360
    assert not train_rows & test_rows
    originals = load_digits()
    share = np.bincount(originals.target) / len(originals.target)
    test_counts = torch.bincount(d.test_y, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 360 * share) <= 1)
    assert np.all(np.abs(torch.bincount(d.train_y, minlength=10).numpy() - 1437 * share) <= 1)


# ----------------------------------------------------------------------------------------------------------
# augmentation


@pytest.mark.parametrize("device", DEVICES)
def test_translation_is_exact_and_per_sample(device):
    x = nonzero_images(48)
    g = torch.Generator(device=device).manual_seed(0)
    out = augment_batch(x.to(device), padding=3, generator=g).cpu()
    shifts = []
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4) if torch.equal(out[i], shift(x[i], dy, dx))]
        assert len(matches) == 1, f"sample {i} is not an exact translation"
        shifts += matches
    assert len(set(shifts)) > 10


@pytest.mark.parametrize("device", DEVICES)
def test_identical_images_get_different_shifts(device):
    x = nonzero_images(1).expand(64, -1, -1, -1).contiguous().to(device)
    out = augment_batch(x, padding=4, flip=True)
    assert len(set(row_keys(out.cpu()))) > 20


def test_flip_is_exact_mirror_and_translation_commutes():
    x = nonzero_images(64)
    out = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(1))
    mirrored = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    both = augment_batch(x[:16], padding=2, flip=True, generator=torch.Generator().manual_seed(2))
    for o, xi in zip(both, x[:16]):
        candidates = [shift(xi, dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(o, c) or torch.equal(o, c.flip(-1)) for c in candidates)


def test_cutout_zeroes_exactly_one_square():
    x = nonzero_images(32)
    k = 6
    out = augment_batch(x, cutout=k, generator=torch.Generator().manual_seed(3))
    corners = set()
    for o, xi in zip(out, x):
        zero = (o == 0).all(0)
        assert torch.equal((o == 0).any(0), zero)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert len(rows) == len(cols) == k and zero.sum() == k * k
        top, left = rows[0].item(), cols[0].item()
        assert zero[top : top + k, left : left + k].all()
        assert torch.equal(o[:, ~zero], xi[:, ~zero])
        corners.add((top, left))
    assert len(corners) > 10


def test_no_augmentation_is_identity_and_generator_is_reproducible():
    x = nonzero_images(8)
    assert torch.equal(augment_batch(x, padding=0, flip=False, cutout=0), x)
    a = augment_batch(x, padding=4, flip=True, cutout=8, generator=torch.Generator().manual_seed(7))
    b = augment_batch(x, padding=4, flip=True, cutout=8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    c = augment_batch(x, padding=4, flip=True, cutout=8, channels_last=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(c, a) and c.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalize_matches_formula(channels_last):
    x = nonzero_images(4)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    out = normalize_batch(x, mean, std, channels_last)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_hook_augments_training_batches_only():
    dm = DataModule(dataset="digits", crop_padding=4, cutout=8)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    plain = normalize_batch(x, dm.mean, dm.std)
    dm.trainer = fake_trainer(training=False)
    ex, ey = dm.on_after_batch_transfer((x, y), 0)
    assert torch.equal(ex, plain) and torch.equal(ey, y)
    dm.trainer = fake_trainer(training=True)
    tx, _ = dm.on_after_batch_transfer((x, y), 0)
    assert tx.shape == plain.shape and not torch.equal(tx, plain)
    assert tx.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------
# loading


class CountingDataset(TensorImageDataset):
    def __init__(self, x, y):
        super().__init__(x, y)
        self.calls = 0

    def __getitem__(self, index):
        raise AssertionError("batches must not be built sample by sample")

    def __getitems__(self, indices):
        self.calls += 1
        return super().__getitems__(indices)


def test_a_batch_is_one_getitems_call():
    x, y = nonzero_images(50), torch.arange(50)
    ds = CountingDataset(x, y)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    loader = batch_loader(ds, 16, sampler=order)
    batches = list(loader)
    assert ds.calls == len(batches) == 4
    bx, by = batches[1]
    idx = order[16:32]
    assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]  # drop_last is off


def test_the_datasets_work_with_any_dataloader_subset_and_the_default_collate():
    """torch's contract: ``__getitems__`` gives the batch's samples. A plain DataLoader (default collate), one over
    a Subset, and the DataModule's own loader give the same batches; the fast loader takes them in one piece."""
    from torch.utils.data import DataLoader, Subset

    dm = DataModule(dataset="digits")
    dm.setup()
    dataset = dm.test_dataloader().dataset
    fast = torch.cat([x for x, _ in batch_loader(dataset, 64)])
    plain = list(DataLoader(dataset, batch_size=64))
    subset = list(DataLoader(Subset(dataset, range(256)), batch_size=64))
    assert [len(y) for _, y in subset] == [64] * 4
    assert torch.equal(torch.cat([x for x, _ in plain]), fast) and torch.equal(torch.cat([x for x, _ in subset]), fast[:256])
    assert torch.equal(torch.cat([y for _, y in plain]), dm.test_set.y)
    batch = dataset.__getitems__([3, 1])
    assert len(batch) == 2 and torch.equal(batch[1][0], dataset.x[1]) and batch[1][1] == dataset.y[1]
    assert [len(s) for s in (batch[:1], batch[5:])] == [1, 0]
    with pytest.raises(IndexError):
        batch[2]


def test_datamodule_loaders():
    dm = DataModule(dataset="digits", batch_size=100, eval_batch_size=200)
    assert dm.num_classes == 10 and not dm.flip and dm.data is None  # known before setup
    dm.setup()
    dm.setup()  # idempotent
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 1437
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 360
    val = torch.cat([b[1] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.data.test_y)  # val_split 0 validates on the test split, in order


def test_unknown_dataset_lists_available():
    with pytest.raises(KeyError, match="cifar10, cifar100, digits"):
        DataModule(dataset="mnist")


def test_val_split_is_seeded_and_disjoint():
    def split(seed):
        dm = DataModule(dataset="digits", val_split=0.2, split_seed=seed)
        dm.setup()
        return dm

    a, b, c = split(0), split(0), split(1)
    assert len(a.val_set) == round(0.2 * 1437) and len(a.train_set) + len(a.val_set) == 1437
    assert torch.equal(a.val_set.x, b.val_set.x) and torch.equal(a.train_set.y, b.train_set.y)
    assert not torch.equal(a.val_set.x, c.val_set.x)
    assert Counter(row_keys(a.train_set.x)) + Counter(row_keys(a.val_set.x)) == Counter(row_keys(a.data.train_x))
    assert a.test_set.x is a.data.test_x


# ----------------------------------------------------------------------------------------------------------
# DDP sharding


def test_unrepeated_shards_cover_every_index_once():
    ds = TensorImageDataset(torch.zeros(101, 3, 32, 32, dtype=torch.uint8), torch.arange(101))
    shards = [list(UnrepeatedDistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(101))
    assert [len(s) for s in shards] == [51, 50]


def test_eval_loaders_shard_without_padding_under_ddp():
    dm = DataModule(dataset="digits", eval_batch_size=64)
    dm.setup()
    seen = []
    for rank in range(3):
        dm.trainer = fake_trainer(world_size=3, global_rank=rank)
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        seen.append(torch.cat([b[1] for b in loader]))
    assert sum(len(s) for s in seen) == 360
    assert sorted(torch.cat(seen).tolist()) == sorted(dm.data.test_y.tolist())


# ----------------------------------------------------------------------------------------------------------
# inside a Trainer


def test_fit_hooks_inside_trainer(tmp_path):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen = []

        def forward(self, x):
            return self.layer(x.flatten(1))

        def training_step(self, batch, _):
            x, y = batch
            self.seen.append(("train", x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, _):
            self.seen.append(("val", batch[0]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Probe()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    dm = DataModule(dataset="digits", batch_size=32, eval_batch_size=100)
    trainer.fit(model, datamodule=dm)
    assert model.seen[:2] == [("train", torch.float32, True)] * 2
    assert model.seen[2][0] == "val" and len(model.seen) == 3
    assert torch.equal(model.seen[2][1], normalize_batch(dm.data.test_x[:100], dm.mean, dm.std))  # not augmented
