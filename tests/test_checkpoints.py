"""Checkpoints load with the weights-only unpickler; anything else is a clear CheckpointError."""

from __future__ import annotations

import pickle

import pytest
import torch

from symstitch.checkpoints import CheckpointError, load_classifier, read_checkpoint
from symstitch.training import ClassifierModule


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _lightning_like_ckpt(module: ClassifierModule) -> dict:
    return {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": "2.6.6",
    }


def test_roundtrip_weights_only(tmp_path):
    torch.manual_seed(0)
    module = ClassifierModule("mcnn", arch_kwargs={"width": 0.125}, num_classes=10)
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_like_ckpt(module), path)
    net = load_classifier(path)
    assert not net.training
    for (k, a), (k2, b) in zip(net.state_dict().items(), module.net.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(3, 3, 32, 32)
    module.eval()
    # same weights; only the memory format (channels_last in training) may change the summation order
    torch.testing.assert_close(net(x), module.net(x), rtol=0, atol=1e-6)


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(path)
    assert not marker.exists()
    # a raw pickle (not torch's zip format) as well
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_classifier(raw)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable PyTorch checkpoint"),
        (b"this is a text file\n", "not a readable PyTorch checkpoint"),
    ],
)
def test_garbage_files(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_classifier(path)


def test_truncated_checkpoint(tmp_path):
    module = ClassifierModule("mcnn", arch_kwargs={"width": 0.125}, num_classes=10)
    good = tmp_path / "good.ckpt"
    torch.save(_lightning_like_ckpt(module), good)
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_classifier(bad)


def test_not_a_classifier_and_missing(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a symstitch classifier checkpoint"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "nope.ckpt")


def test_weights_that_do_not_fit(tmp_path):
    module = ClassifierModule("mcnn", arch_kwargs={"width": 0.125}, num_classes=10)
    ckpt = _lightning_like_ckpt(module)
    ckpt["hyper_parameters"]["arch_kwargs"] = {"width": 0.25}
    path = tmp_path / "mismatch.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(path)
