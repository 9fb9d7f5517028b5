"""symstitch.inputs: how every tool reads images and labels from a user's loader."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from symstitch.inputs import (Normalization, batch_images, describe, labelled_batch, loader_normalization,
                              network_input, normalize_batch)

MEAN, STD = (0.5, 0.25, 0.125), (0.5, 0.25, 0.2)


def _uint8(n=3, seed=0):
    return torch.randint(0, 256, (n, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_batch_is_the_per_channel_formula_in_either_layout(channels_last):
    x = _uint8()
    expected = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    out = normalize_batch(x, MEAN, STD, channels_last=channels_last)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(Normalization(MEAN, STD)(x), out.contiguous())


def test_a_loader_s_normalization_is_found_through_wrappers_and_an_explicit_one_wins():
    dataset = TensorDataset(_uint8(), torch.arange(3))
    dataset.normalization = Normalization(MEAN, STD)
    wrapped = DataLoader(Subset(Subset(dataset, [0, 1, 2]), [0, 1]))
    assert loader_normalization(wrapped) is dataset.normalization
    assert loader_normalization(DataLoader(TensorDataset(_uint8()))) is None
    given = loader_normalization(wrapped, normalize=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    assert given == Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert loader_normalization(wrapped, normalize=torch.neg) is torch.neg


def test_float_images_pass_unchanged_and_uint8_without_a_normalization_is_refused_with_the_remedy():
    x = torch.randn(2, 3, 4, 4)
    assert network_input(x, None) is x
    with pytest.raises(ValueError, match="normalize=dm.normalization"):
        network_input(_uint8(), None)
    torch.testing.assert_close(network_input(_uint8(), Normalization(MEAN, STD)),
                               normalize_batch(_uint8(), MEAN, STD, channels_last=False))


def test_batch_images_reads_every_batch_form():
    x = torch.randn(2, 3, 4, 4)
    for batch in (x, (x, torch.zeros(2)), [x], {"image": x}, {"x": x, "y": 1}):
        assert batch_images(batch) is x
    with pytest.raises(TypeError, match="got a dict with keys \\['pixels'\\]"):
        batch_images({"pixels": x})


def test_labelled_batch_takes_pairs_and_dicts_and_names_what_it_got():
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 0])
    for batch in ((x, y), [x, y], {"image": x, "label": y}, {"x": x, "y": y}):
        got_x, got_y = labelled_batch(batch)
        assert got_x is x and got_y is y
    bad = [(x, y.float()), (x, y[:1]), (x,), (x, y.view(2, 1)), {"image": x}]
    for batch in bad:
        with pytest.raises(TypeError, match="my loader must yield \\(image, label\\) batches"):
            labelled_batch(batch, where="my loader")


def test_describe_is_short():
    assert describe(torch.zeros(2, 3, dtype=torch.uint8)) == "a torch.uint8 tensor of shape (2, 3)"
    assert describe([1] * 6) == "a list of 6 (a int, a int, a int, a int, …)"
    assert describe({"b": 1, "a": 2}) == "a dict with keys ['a', 'b']"
