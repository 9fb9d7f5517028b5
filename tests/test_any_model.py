"""Acceptance of "bring your own networks": two torchvision ResNet-18s trained on digits, stitched and compared
from Python with the modules in memory and from the command line with state_dict files + class path — the
same numbers both ways."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
import yaml
from torch import nn

import symstitch
from symstitch.commands import main
from symstitch.data import DataModule
from symstitch.graph import GraphNet
from symstitch.metrics import similarity_matrix

from .conftest import fit_briefly

SPEC = "{{class_path: tests.test_any_model.narrow_resnet18, init_args: {{num_classes: 10}}, state_dict: {path}}}"
POINT = "layer2.1.relu_1"  # the output of the middle stage's last block: a cut of the graph
POINTS = ["relu", "layer1.0.relu", "layer2.1", "layer3.0.relu_1", "layer4.1.relu_1"]
STITCH = dict(epochs=2, relaxed_epochs=1, lr=0.005, init="data")


def narrow_resnet18(num_classes: int = 10, width: int = 16) -> nn.Module:
    """torchvision's ResNet-18 — its ``ResNet`` class, ``BasicBlock``s, module names and forward — with every
    channel count divided by 64 / ``width`` (torchvision fixes 64-128-256-512), so that the test trains fast."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    block = torchvision.models.resnet.BasicBlock
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for k in range(4):
        setattr(net, f"layer{k + 1}", net._make_layer(block, width * 2 ** k, 2, stride=1 if k == 0 else 2))
    net.fc = nn.Linear(8 * width, num_classes)
    return net


def train(seed: int, dm: DataModule, epochs: int = 4) -> torch.nn.Module:
    """A narrow torchvision ResNet-18 trained briefly on digits (SGD on normalised, un-augmented batches)."""
    torch.manual_seed(seed)
    net = narrow_resnet18()
    return fit_briefly(net, dm, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), epochs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    dm = DataModule(dataset="digits")
    nets = [train(seed, dm) for seed in (0, 1)]
    folder = tmp_path_factory.mktemp("nets")
    paths = []
    for k, net in enumerate(nets):
        paths.append(folder / f"resnet18_seed{k}.pt")
        torch.save(net.state_dict(), paths[-1])
    return nets, paths, dm


def accuracy(net: torch.nn.Module, dm: DataModule) -> float:
    with torch.no_grad():
        hits = sum(int((net(x).argmax(1) == y).sum()) for x, y in dm.loader("test"))
    return hits / len(dm.test_set)


def test_two_torchvision_resnets_from_python_and_from_the_cli(pair, tmp_path):
    nets, paths, dm = pair
    assert min(accuracy(n, dm) for n in nets) > 0.8  # trained: a stitch penalty means something
    graph = GraphNet(nets[0])
    assert POINT in graph.stitch_points and "layer2.1.relu" in graph.inner_points
    assert {"layer2.1", "layer2.1.conv1", "layer2.1.add"} <= set(graph.points)

    # Python, the modules in memory
    # the two layers side by side, as the command trains the layers of one point
    python = {r.layer_name: r for r in symstitch.stitch(nets[0], nets[1], POINT, ["standard", "birkhoff"], **STITCH)}
    for net in nets:  # the caller's modules are never frozen or switched to another mode by a stitch
        assert all(p.requires_grad for p in net.parameters())
    assert python["birkhoff"].permutation is not None and sorted(python["birkhoff"].permutation) == list(range(32))  # layer2: 2 × 16 channels
    rows = similarity_matrix(nets[0], nets[1], dm.test_dataloader(), points=POINTS, cka_mode="exact", progress=False)

    # the command line (its argument parsing, in this process): state_dict files + class path
    specs = [SPEC.format(path=p) for p in paths]
    out = tmp_path / "stitch"
    assert main(["stitch", "--source", specs[0], "--target", specs[1], "--points", POINT, "--layers", "standard,birkhoff",
                 "--epochs", str(STITCH["epochs"]), "--relaxed-epochs", str(STITCH["relaxed_epochs"]),
                 "--lr", str(STITCH["lr"]), "--init", STITCH["init"], "--out", str(out)]) == 0
    records = [json.loads(f.read_text()) for f in sorted((out / "cells").rglob("*.json"))]
    assert len(records) == 2
    for record in records:
        layer = record["cell"]["layer"]
        for key in ("penalty_pts", "stitched_acc", "source_acc", "target_acc", "permutation"):
            assert record["result"][key] == getattr(python[layer], key), (layer, key)

    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump({"source": specs[0], "target": specs[1], "points": POINTS,
                                      "metrics": ["procrustes_relu", "procrustes_orthogonal", "cka_linear", "cka_relu"]}))
    assert main(["align", "--config", str(config), "--no-wandb", "--out", str(tmp_path / "align")]) == 0
    (record,) = [json.loads(f.read_text()) for f in (tmp_path / "align" / "cells").rglob("*.json")]
    cli = record["result"]["metrics"]
    assert len(rows) == 4 * len(POINTS) ** 2
    for row in rows:
        table = cli[row["metric"]]
        value = table["values"][table["points_a"].index(row["point_a"])][table["points_b"].index(row["point_b"])]
        assert value == pytest.approx(row["value"], rel=1e-9, abs=1e-12), row
        assert row["group_a"] == "positive_scaled_permutations"
