"""One network interface (symstitch.network): the zoo's staged networks and both kinds of GraphNet implement
PointNetwork, and give the same answers for the same model."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from symstitch import models, symmetry
from symstitch.graph import GraphNet, HookedNet, TraceError, TracedNet, as_network
from symstitch.network import MEMBERS, is_network

from .test_graph import Untraceable

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mcnn():
    torch.manual_seed(0)
    return models.build("mcnn", width=1 / 16).eval()


@pytest.fixture(scope="module")
def three(mcnn):
    """The same mCNN as the zoo's network, traced, and run with hooks (the wrappers share its weights)."""
    return {"staged": mcnn, "traced": GraphNet(mcnn), "hooked": GraphNet(mcnn, trace=False)}


def test_every_kind_is_a_network(three):
    assert [type(n).__name__ for n in three.values()] == ["MCNN", "TracedNet", "HookedNet"]
    for net in three.values():
        assert is_network(net) and as_network(net) is net
        for member in MEMBERS:
            assert hasattr(type(net), member), (type(net).__name__, member)
    for name in models.available():
        assert is_network(models.build(name, width=1 / 16)), name
    plain = torchvision.models.resnet18(num_classes=10)
    assert not is_network(plain) and is_network(as_network(plain))


def test_the_same_model_gives_the_same_answers(three):
    staged, traced, hooked = three.values()
    points = staged.feature_points
    assert points == ("layer1.act", "layer2.act", "layer3.act", "layer4.act")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y = staged(x)
        features = staged.features(x, points)
        for net in three.values():
            assert net.label == "MCNN" and net.num_classes == 10
            assert net.feature_points == points and net.stitch_points == points and net.inner_points == ()
            for p in points:
                assert net.point_shape(p) == staged.point_shape(p)
                assert net.point_channels(p) == staged.point_channels(p)
                assert net.point_activation(p) == "relu"
                h, carry = net.split(x, p)
                assert torch.equal(h, features[p])
                assert torch.equal(net.forward_from(h, p, carry), y), (type(net).__name__, p)
                net.check_feature_point(p)
            got = net.features(x, points)
            assert all(torch.equal(got[p], features[p]) for p in points)
    # the zoo hooks its activation modules; a graph gives every point from its own pass
    assert staged.point_module("layer2.act") is staged.layer2.act
    assert traced.point_module("layer2.act") is None and hooked.point_module("layer2.act") is None
    # a graph has features at every node, the zoo at its activations only
    traced.check_feature_point("layer2.conv")
    with pytest.raises(ValueError, match="valid feature points: layer1.act"):
        staged.check_feature_point("layer2.conv")


def test_each_family_declares_its_sites(three):
    staged, traced, hooked = three.values()
    zoo = staged.symmetry_sites()
    assert list(zoo) == list(staged.stitch_points)
    graph = traced.symmetry_sites()
    # the traced graph finds the plain layers itself (not past the classifier's Flatten): the same modules
    assert list(graph) == ["layer1.act", "layer2.act", "layer3.act"]
    assert all(graph[p] == zoo[p] for p in graph)
    assert "Flatten" in traced.no_action_reason("layer4.act")
    assert hooked.symmetry_sites() == {} and "forward hooks" in hooked.no_action_reason("layer1.act")
    assert staged.no_action_reason("layer1.act") == ""
    resnet = models.build("resnet20", width=0.25)
    assert symmetry.actionable_points(resnet) == resnet.feature_points  # every point, the stream included
    assert models.build("cct", width=1 / 16).symmetry_sites() == {}


def test_graphnet_builds_the_kind_that_runs_the_model():
    traced = GraphNet(torchvision.models.resnet18(num_classes=10))
    hooked = GraphNet(Untraceable())
    asked = GraphNet(torchvision.models.resnet18(num_classes=10), trace=False)
    assert isinstance(traced, TracedNet) and traced.trace_error is None and traced.note == ""
    assert isinstance(hooked, HookedNet) and "does not trace" in hooked.trace_error
    assert hooked.note.startswith("forward hooks: ") and "does not trace" in hooked.note
    assert isinstance(asked, HookedNet) and asked.trace_error is None and asked.note == "forward hooks: not traced"
    for net in (traced, hooked, asked):
        assert isinstance(net, GraphNet)
        twin = copy.deepcopy(net)
        assert type(twin) is type(net) and twin.trace_error == net.trace_error and twin.model is not net.model
    with pytest.raises(TraceError):
        TracedNet(Untraceable())


def test_as_graph_lists_every_node(three):
    staged, traced, hooked = three.values()
    graph = staged.as_graph()
    assert isinstance(graph, TracedNet) and graph.model is staged and "layer2.conv" in graph.points
    assert traced.as_graph() is traced
    wider = traced.as_graph(input_shape=(1, 3, 64, 64))
    assert wider.point_shape("layer1.act")[1:] == (64, 64) and traced.point_shape("layer1.act")[1:] == (32, 32)
    assert hooked.as_graph((1, 3, 64, 64)).point_shape("layer1.act")[1:] == (64, 64)


def test_a_network_of_ones_own_is_used_as_it_is():
    """No base class needed: every member of the interface makes a network; a module short of one is wrapped."""

    def module_with(members):
        return type("Own", (nn.Module,), {m: (lambda self, *args: None) for m in members if m != "__call__"})()

    own = module_with(MEMBERS)
    assert is_network(own) and as_network(own) is own
    with pytest.raises(ValueError, match="takes no GraphNet options"):
        as_network(own, class_token="dropped")
    short = module_with([m for m in MEMBERS if m != "symmetry_sites"])
    assert not is_network(short)
