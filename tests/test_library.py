"""symstitch.library: model references, model libraries, loading any network."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from symstitch.checkpoints import CheckpointError
from symstitch.commands import main
from symstitch.library import (Manifest, ModelSpec, architecture, library_models, load_model, memory_ref, model_spec,
                               ref_identity, ref_text, resolve_model)
from symstitch.stitching import stitch

from .conftest import CONFIGS, LIB_POINT, library_refs

RESNET = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 10}}


def test_references_outside_the_zoo_parse_and_checkpoints_do_not():
    assert model_spec("runs/zoo:resnet20/seed0") is None and model_spec("a.ckpt") is None
    assert model_spec("timm:vit_tiny_patch16_224") == ModelSpec("timm", "vit_tiny_patch16_224")
    text = "{class_path: torchvision.models.resnet18, init_args: {num_classes: 10}, state_dict: a.pt, graph: {x: 1}}"
    assert model_spec(text) == ModelSpec("class", "torchvision.models.resnet18", {"num_classes": 10}, "a.pt", {"x": 1})
    assert model_spec(text) == model_spec({**RESNET, "state_dict": "a.pt", "graph": {"x": 1}})
    assert model_spec({"timm": "resnet18"}).label == "timm:resnet18"


@pytest.mark.parametrize("ref, error, message", [
    ("{class_path: [", ValueError, "is not a YAML mapping"),
    ({"class_path": "x", "timm": "y"}, ValueError, "has class_path \\(or timm\\)"),
    ({"init_args": {}}, ValueError, "got keys \\['init_args'\\]"),
    ({"class_path": "x", "weights": "a.pt"}, ValueError, "got keys \\['class_path', 'weights'\\]"),
    (3, TypeError, "a path, a mapping or an nn.Module; got int"),
])
def test_a_bad_reference_is_one_clear_error(ref, error, message):
    with pytest.raises(error, match=message):
        model_spec(ref)


def test_an_in_memory_network_has_one_name_and_loads_as_a_copy():
    model = torchvision.models.resnet18(num_classes=10)
    name = memory_ref(model)
    assert name.startswith("memory:") and memory_ref(model) == name and ref_text(model) == name
    net = load_model(model)
    assert not net.training and architecture(name) == "ResNet"
    first = next(net.parameters())
    assert first is not next(model.parameters()) and torch.equal(first, next(model.parameters()))
    assert ref_identity(model) == ref_identity(name)


def test_a_class_path_with_a_state_dict_loads_those_weights_and_refuses_others(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    net = load_model({**RESNET, "state_dict": str(tmp_path / "a.pt")})
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), model.parameters()))
    assert ref_text(RESNET) == json.dumps(RESNET, sort_keys=True)
    before = ref_identity({**RESNET, "state_dict": str(tmp_path / "a.pt")})
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "a.pt")
    assert ref_identity({**RESNET, "state_dict": str(tmp_path / "a.pt")}) != before  # caches see new weights
    with pytest.raises(CheckpointError, match="the weights do not fit torchvision.models.resnet18"):
        load_model({**RESNET, "state_dict": str(tmp_path / "a.pt")})


def test_loading_by_class_path_draws_no_random_numbers():
    torch.manual_seed(5)
    load_model(RESNET)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_a_manifest_adds_once_replaces_on_request_and_names_what_it_has(tmp_path):
    manifest = Manifest(tmp_path / "lib")
    assert manifest.load() == {}
    assert manifest.add("mcnn/seed1", {"checkpoint": "mcnn/seed1/model.ckpt"})
    assert not manifest.add("mcnn/seed1", {"checkpoint": "other"})
    assert manifest.add("mcnn/seed0", {"checkpoint": "mcnn/seed0/model.ckpt"})
    assert list(manifest.load()) == ["mcnn/seed0", "mcnn/seed1"]  # sorted on disk
    assert manifest.add("mcnn/seed1", {"checkpoint": "new"}, replace=True)
    assert manifest.checkpoint(manifest.load()["mcnn/seed1"]) == tmp_path / "lib" / "new"
    assert resolve_model(f"{tmp_path / 'lib'}:mcnn/seed0") == tmp_path / "lib" / "mcnn/seed0/model.ckpt"
    with pytest.raises(CheckpointError, match="has no model 'mcnn/seed7'; it has: mcnn/seed0, mcnn/seed1"):
        resolve_model(f"{tmp_path / 'lib'}:mcnn/seed7")
    with pytest.raises(ValueError, match="lacks mcnn seeds \\[2, 3\\]; train them first"):
        library_models(tmp_path / "lib", "mcnn", [0, 2, 3])
    assert library_models(tmp_path / "lib", "mcnn", [1]) == {1: f"{tmp_path / 'lib'}:mcnn/seed1"}
    (tmp_path / "lib" / "manifest.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a symstitch model-library manifest"):
        manifest.load()


def test_a_reference_that_names_nothing_says_what_it_should_be(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a model-library entry"):
        resolve_model(tmp_path / "missing.ckpt")


def _as_if_cifar10(mcnn_lib: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The two networks' checkpoints, saying they were trained on CIFAR-10 (kept in a folder with no CIFAR-10)."""
    out = []
    for seed in (0, 1):
        ckpt = torch.load(mcnn_lib / f"mcnn/seed{seed}/model.ckpt", weights_only=True)
        ckpt["datamodule_hyper_parameters"] = {**ckpt["datamodule_hyper_parameters"], "dataset": "cifar10",
                                               "root": str(tmp_path / "no-cifar")}
        torch.save(ckpt, tmp_path / f"cifar{seed}.ckpt")
        out.append(tmp_path / f"cifar{seed}.ckpt")
    return out[0], out[1]


def test_the_data_of_a_stitch_is_the_networks_own(mcnn_lib, tmp_path, capsys):
    a, b = _as_if_cifar10(mcnn_lib, tmp_path)
    fit = ["fit", "--config", str(CONFIGS / "stitch/standard.yaml"), "--model.point", LIB_POINT,
           "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    # networks trained on CIFAR-10 are stitched on CIFAR-10 (absent here: the error names it), never on digits
    assert main([*fit, "--model.source", str(a), "--model.target", str(b)]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10" in err and str(tmp_path / "no-cifar") in err
    # another dataset given explicitly is refused, from the command and from Python
    source, target = library_refs(mcnn_lib)
    assert main([*fit, "--model.source", source, "--model.target", target, "--data.dataset", "cifar100"]) == 2
    assert "trained on 'digits'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="trained on 'digits'"):
        stitch(source, target, LIB_POINT, layer="standard", epochs=1, data={"dataset": "cifar100"})
    # two networks trained on different data are not a pair
    with pytest.raises(ValueError, match="different datasets"):
        stitch(source, str(b), LIB_POINT, layer="standard", epochs=1)
