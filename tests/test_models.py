"""The model zoo: shapes, point names, exact split forward, parameter counts, option-A shortcuts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symstitch import models
from symstitch.models.resnet import ShortcutA

SMALL = 0.25  # channel multiplier that keeps every test fast on CPU
NAMES = models.available()
CNNS = [n for n in NAMES if n != "cct"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def small(name: str, **kwargs) -> models.StagedNet:
    torch.manual_seed(0)
    return models.build(name, width=SMALL, **kwargs).eval()


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_registry_lists_the_paper_zoo():
    expected = {"mcnn", "mcnn_nobn", "mcnn_sigmoid", "mcnn_gelu", "mcnn_tanh", "cwcnn", "cwcnn_nobn", "cct", "resnet18"}
    expected |= {f"resnet{d}" for d in (20, 32, 44, 56, 110)}
    assert set(NAMES) == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_shape(name, num_classes):
    net = small(name, num_classes=num_classes)
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, num_classes)
    net.train()
    assert net(x).shape == (2, num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_odd_width_still_builds(name):
    torch.manual_seed(0)
    net = models.build(name, width=0.1)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_feature_points_are_in_forward_order(name):
    net = small(name)
    fired: list[str] = []
    handles = [
        net.get_submodule(p).register_forward_hook(lambda *_, p=p: fired.append(p)) for p in net.feature_points
    ]
    net(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert fired == list(net.feature_points)
    assert len(fired) == len(set(fired))


@pytest.mark.parametrize(
    "name, n_features, n_stitch",
    [
        ("resnet20", 19, 10),
        ("resnet32", 31, 16),
        ("resnet44", 43, 22),
        ("resnet56", 55, 28),
        ("resnet110", 109, 55),
        ("resnet18", 17, 9),
        ("mcnn", 4, 4),
        ("mcnn_nobn", 4, 4),
        ("mcnn_sigmoid", 4, 4),
        ("cwcnn", 4, 4),
        ("cwcnn_nobn", 4, 4),
        ("cct", 4, 3),
    ],
)
def test_point_counts(name, n_features, n_stitch):
    net = small(name)
    assert len(net.feature_points) == n_features
    assert len(net.stitch_points) == n_stitch


def test_resnet20_point_names():
    net = small("resnet20")
    assert net.feature_points[:4] == ("stem.act", "layer1.0.act1", "layer1.0.act2", "layer1.1.act1")
    assert net.feature_points[-1] == "layer3.2.act2"
    blocks = [f"layer{s}.{b}.act2" for s in (1, 2, 3) for b in range(3)]
    assert net.stitch_points == ("stem.act", *blocks)
    block = net.get_submodule("layer2.0")
    assert [n for n, _ in block.named_children()] == ["conv1", "bn1", "act1", "conv2", "bn2", "shortcut", "act2"]


def test_mcnn_layout():
    net = small("mcnn")
    assert net.stitch_points == net.feature_points == tuple(f"layer{k}.act" for k in range(1, 5))
    assert [n for n, _ in net.layer1.named_children()] == ["conv", "bn", "act"]
    assert [n for n, _ in net.layer2.named_children()] == ["pool", "conv", "bn", "act"]
    nobn = small("mcnn_nobn")
    assert [n for n, _ in nobn.layer3.named_children()] == ["pool", "conv", "act"]
    assert nobn.layer3.conv.bias is not None and net.layer3.conv.bias is None


@pytest.mark.parametrize(
    "name, activation, module",
    [("mcnn", "relu", nn.ReLU), ("mcnn_sigmoid", "sigmoid", nn.Sigmoid), ("resnet20", "relu", nn.ReLU)],
)
def test_activation_attribute(name, activation, module):
    net = small(name)
    assert net.activation == activation
    assert all(isinstance(net.get_submodule(p), module) for p in net.feature_points)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_stitch_points_are_feature_points(name):
    net = small(name)
    assert set(net.stitch_points) <= set(net.feature_points)


def test_cct_points():
    net = small("cct")
    assert net.activation == "gelu"
    assert net.stitch_points == ("tokenizer", "blocks.0", "blocks.1")
    assert net.feature_points == (
        "tokenizer.layers.0.act",
        "tokenizer.layers.1.act",
        "blocks.0.mlp.act",
        "blocks.1.mlp.act",
    )
    h = net.forward_to(torch.randn(2, 3, 32, 32), "blocks.0")
    assert h.shape == (2, 64, 32)  # (N, L, C): 8×8 tokens, embedding 128 × 0.25


@pytest.mark.parametrize("name", NAMES)
def test_split_forward_is_exact(name):
    net = small(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = net(x)
        for p in net.stitch_points:
            assert torch.equal(net.forward_from(net.forward_to(x, p), p), y), p
        for p in net.split_points:  # inner points too: the rest of the block from h and the carry
            h, carry = net.split(x, p)
            assert (carry is None) == (p in net.stitch_points), p
            assert torch.equal(net.forward_from(h, p, carry), y), p


def test_inner_points_of_the_resnets():
    net = small("resnet20")
    inner = [f"layer{s}.{b}.act1" for s in (1, 2, 3) for b in range(3)]
    assert net.inner_points == tuple(inner)
    assert len(net.split_points) == 19 and net.split_points[:3] == ("stem.act", "layer1.0.act1", "layer1.0.act2")
    assert set(net.split_points) == set(net.feature_points)  # every ReLU of a ResNet is a split point
    assert small("mcnn").inner_points == () and small("mcnn").split_points == small("mcnn").stitch_points
    x = torch.randn(2, 3, 32, 32)
    h, carry = net.split(x, "layer2.0.act1")
    assert h.shape[1:] == (8, 16, 16) and carry.shape[1:] == (4, 32, 32)  # stride 2 block: the carry is its input
    with pytest.raises(ValueError, match="needs its carry"):
        net.forward_from(h, "layer2.0.act1")
    with pytest.raises(ValueError, match="no carry"):
        net.forward_from(h, "layer2.0.act2", carry)
    with pytest.raises(ValueError, match=r"valid stitch points: stem\.act.*inner points: layer1\.0\.act1"):
        net.check_split_point("layer2.0.conv1")


def option_a_count(n: int, num_classes: int = 10, widths=(16, 32, 64)) -> int:
    """Closed-form parameter count of a CIFAR ResNet-(6n+2) with option-A shortcuts."""
    c1, c2, c3 = widths
    conv = 3 * c1  # stem
    c_prev = c1
    for c in widths:
        conv += c_prev * c + c * c + (n - 1) * 2 * c * c
        c_prev = c
    bn = 2 * (c1 + 2 * n * (c1 + c2 + c3))
    return 9 * conv + bn + c3 * num_classes + num_classes


@pytest.mark.parametrize(
    "depth, published, digits",
    [(20, 0.27, 2), (32, 0.46, 2), (44, 0.66, 2), (56, 0.85, 2), (110, 1.7, 1)],
)
def test_option_a_parameter_counts(depth, published, digits):
    count = n_params(models.build(f"resnet{depth}"))
    assert count == option_a_count((depth - 2) // 6)
    assert round(count / 1e6, digits) == published


def test_resnet20_exact_count():
    assert option_a_count(3) == 269_722


def test_resnet18_parameter_count():
    count = n_params(models.build("resnet18"))
    assert count == 11_173_962
    assert round(count / 1e6, 2) == 11.17


def test_option_a_shortcut_values():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    out = ShortcutA(1, 3, stride=2)(x)
    assert torch.equal(out, torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]]))

    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = ShortcutA(2, 4, stride=2)(x)
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    expected = torch.tensor([[[0.0, 2.0], [8.0, 10.0]], [[16.0, 18.0], [24.0, 26.0]], zeros, zeros])
    assert torch.equal(out, expected[None])
    assert list(ShortcutA(2, 4, stride=2).parameters()) == []


def test_resnet_shortcut_kinds():
    net = small("resnet20")
    assert isinstance(net.get_submodule("layer1.0.shortcut"), nn.Identity)
    assert isinstance(net.get_submodule("layer2.0.shortcut"), ShortcutA)
    assert isinstance(net.get_submodule("layer3.1.shortcut"), nn.Identity)
    r18 = small("resnet18")
    proj = r18.get_submodule("layer2.0.shortcut")
    assert isinstance(proj.conv, nn.Conv2d) and proj.conv.kernel_size == (1, 1) and proj.conv.stride == (2, 2)
    assert isinstance(proj.bn, nn.BatchNorm2d)
    assert isinstance(r18.get_submodule("layer1.1.shortcut"), nn.Identity)


def test_unknown_stitch_point():
    net = small("resnet20")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="layer1.0.act2") as err:
        net.forward_to(x, "layer1.0.conv1")  # a module, not a point
    assert "stem.act" in str(err.value) and "inner points: layer1.0.act1" in str(err.value)
    with pytest.raises(ValueError, match="valid stitch points"):
        net.forward_from(x, "nope")


def test_unknown_architecture():
    with pytest.raises(KeyError, match="resnet20") as err:
        models.build("resnet21")
    assert "available" in str(err.value) and "mcnn" in str(err.value)


@pytest.mark.parametrize(
    "name, width, expected",
    [
        ("resnet20", 0.25, {"stem.act": (4, 32, 32), "layer2.0.act1": (8, 16, 16), "layer3.2.act2": (16, 8, 8)}),
        ("resnet20", 0.5, {"stem.act": (8, 32, 32), "layer2.0.act2": (16, 16, 16), "layer3.2.act2": (32, 8, 8)}),
        ("resnet18", 0.25, {"stem.act": (16, 32, 32), "layer4.1.act2": (128, 4, 4)}),
        ("mcnn", 0.25, {"layer1.act": (16, 32, 32), "layer2.act": (32, 16, 16), "layer4.act": (128, 4, 4)}),
        ("cwcnn", 0.125, {"layer1.act": (64, 32, 32), "layer4.act": (64, 4, 4)}),
        (
            "cct",
            0.25,
            {"tokenizer.layers.0.act": (16, 32, 32), "tokenizer": (64, 32), "blocks.1.mlp.act": (64, 64)},
        ),
    ],
)
def test_width_multiplier(name, width, expected):
    torch.manual_seed(0)
    net = models.build(name, width=width)
    shapes = net.feature_shapes()
    assert set(shapes) == set(net.feature_points) | set(net.stitch_points)
    for point, shape in expected.items():
        assert shapes[point] == shape, point
