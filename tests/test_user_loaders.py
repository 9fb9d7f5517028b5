"""stitch() on the loaders users have: plain torch DataLoaders of uint8 or float images give the same stitch as the
DataModule on the same images in the same order, and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from symstitch.data import DataModule, LoaderData, normalize_batch
from symstitch.stitching import stitch

from .conftest import fit_briefly

pytestmark = pytest.mark.usefixtures("one_thread")

POINT = "act1"  # the ReLU after conv1 + BN: a cut, positive-scaled permutations
STITCH = dict(layer="standard", epochs=2, lr=0.01, init="data", seed=0)
DATA = {"crop_padding": 0, "channels_last": False}  # un-augmented, and inputs laid out as a plain loader's


class Small(nn.Module):
    """Two strided conv → BN → ReLU stages and a linear classifier: a network of the user's own."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.fc = nn.Linear(width * 8 * 8, 10)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(x.flatten(1))


def train(seed: int, dm: DataModule) -> Small:
    torch.manual_seed(seed)
    net = Small()
    return fit_briefly(net, dm, torch.optim.Adam(net.parameters(), lr=0.01), epochs=2)


@pytest.fixture(scope="module")
def pair():
    dm = DataModule(dataset="digits", **DATA)
    dm.setup()
    return [train(seed, dm) for seed in (0, 1)], dm


def plain_loaders(dm: DataModule, train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[DataLoader, DataLoader]:
    """Loaders as a user writes them, over the DataModule's images. The training loader shuffles like the
    DataModule's (a RandomSampler drawing from the global random state, which the stitch's seed fixes), so both
    see the same batches in the same order."""
    return (DataLoader(TensorDataset(train_x, dm.train_set.y), batch_size=dm.batch_size, shuffle=True),
            DataLoader(TensorDataset(test_x, dm.test_set.y), batch_size=dm.eval_batch_size))


def test_plain_loaders_of_uint8_or_float_images_stitch_like_the_datamodule(pair):
    nets, dm = pair
    reference = stitch(*nets, POINT, data=DATA, **STITCH)
    assert min(reference.source_acc, reference.target_acc) > 0.7  # trained: the penalty means something
    uint8 = stitch(*nets, POINT, data=plain_loaders(dm, dm.train_set.x, dm.test_set.x), normalize=(dm.mean, dm.std),
                   **STITCH)
    floats = [normalize_batch(s.x, dm.mean, dm.std, channels_last=False) for s in (dm.train_set, dm.test_set)]
    float_ = stitch(*nets, POINT, data=plain_loaders(dm, *floats), **STITCH)
    own = stitch(*nets, POINT, data=(dm.train_dataloader(), dm.test_dataloader()), **STITCH)  # they say how
    for result in (uint8, float_, own):
        assert result.penalty_pts == reference.penalty_pts
        assert (result.source_acc, result.target_acc, result.stitched_acc) == \
               (reference.source_acc, reference.target_acc, reference.stitched_acc)
        assert torch.equal(result.layer.weight, reference.layer.weight)  # the same training, step by step
        # recalibration passes over the user's training loader (shuffled batches of 128), the DataModule's over
        # its training images in order (batches of 500): the same images, other batch statistics to average
        assert result.penalty_recalibrated_pts == pytest.approx(reference.penalty_recalibrated_pts, abs=1.0)
    # the order matters: the same images unshuffled train another layer
    train, test = plain_loaders(dm, dm.train_set.x, dm.test_set.x)
    unshuffled = DataLoader(train.dataset, batch_size=dm.batch_size, shuffle=False)
    other = stitch(*nets, POINT, data=(unshuffled, test), normalize=(dm.mean, dm.std), **STITCH)
    assert not torch.equal(other.layer.weight, reference.layer.weight)


def test_loaders_that_cannot_work_are_clear_errors(pair):
    nets, dm = pair
    train, test = plain_loaders(dm, dm.train_set.x, dm.test_set.x)
    images_only = DataLoader(TensorDataset(dm.train_set.x), batch_size=64)
    with pytest.raises(TypeError, match=r"the train loader must yield \(image, label\) batches .*got a list of 1 "
                                        r"\(a torch.uint8 tensor of shape \(64, 3, 32, 32\)\)"):
        stitch(*nets, POINT, data=(images_only, test), normalize=(dm.mean, dm.std), **STITCH)
    with pytest.raises(ValueError, match="does not say how they are normalised"):
        stitch(*nets, POINT, data=(train, test), **STITCH)  # uint8 images of a plain dataset: normalize= needed
    with pytest.raises(ValueError, match="normalize applies to loaders"):
        stitch(*nets, POINT, data=DATA, normalize=(dm.mean, dm.std), **STITCH)
    with pytest.raises(ValueError, match="loaders given from Python feed one process"):
        stitch(*nets, POINT, data=LoaderData(train, test, normalize=(dm.mean, dm.std)), **STITCH,
               fit_args=("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"))


def test_a_datamodule_and_a_subset_of_its_dataset_are_accepted(pair):
    """``stitch(data=DataModule(...))`` uses its settings (as the docstring says), unset ones (``flip=None``) too;
    a plain DataLoader over a Subset of the DataModule's dataset, uint8 batches by the default collate, feeds
    ``similarity_matrix`` with the DataModule's normalisation, as its own loader does."""
    from torch.utils.data import Subset

    from symstitch.metrics import similarity_matrix

    nets, dm = pair
    by_settings = stitch(*nets, POINT, data=DATA, **STITCH)
    by_module = stitch(*nets, POINT, data=DataModule(dataset="digits", **DATA), **STITCH)
    assert torch.equal(by_module.layer.weight, by_settings.layer.weight)
    assert by_module.penalty_pts == by_settings.penalty_pts
    subset = DataLoader(Subset(dm.test_dataloader().dataset, range(256)), batch_size=64)
    own = DataLoader(TensorDataset(normalize_batch(dm.test_set.x[:256], dm.mean, dm.std, channels_last=False),
                                   dm.test_set.y[:256]), batch_size=64)
    rows = [similarity_matrix(*nets, loader, metrics=["cka_linear"], points=[POINT]) for loader in (subset, own)]
    assert rows[0] == rows[1] and len(rows[0]) == 1
