"""Points of any nn.Module (symstitch.graph): names, cuts and carries, the hook fallback, the group per point, the
weight-space action on a traced graph, timm ViTs and the clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

import symstitch
from symstitch import symmetry
from symstitch.data import DataModule, TensorImageDataset, batch_loader
from symstitch.graph import GraphNet
from symstitch.library import load_model, load_pair, memory_ref
from symstitch.metrics import similarity_matrix
from symstitch.stitching import PrefixCache, StitchingModule
from symstitch.training import WarmupCosine

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """conv → BN → act → conv → act → pool → fc, with the activation chosen by name (a module or a function)."""

    def __init__(self, act: str = "relu", width: int = 6):
        super().__init__()
        self.act_name = act
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width, 10)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(),
                    "tanh": nn.Tanh()}[act]

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(torch.tanh(self.conv2(x)) if self.act_name == "tanh" else F.relu(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) and one module called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.relu(self.conv(x))
        if h.sum() > 0:
            h = self.relu(h - 0.1)
        return self.fc(h.mean((2, 3)))


class Residual(nn.Module):
    """A stem, then one residual block (conv → BN → ReLU → conv → BN, plus the block input, → ReLU), pooled."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1, self.bn1, self.relu = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)
        return self.fc(out.mean((2, 3)))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def test_points_are_the_graph_node_and_module_names(resnet):
    net = GraphNet(resnet)
    nodes = get_graph_node_names(resnet)[1]
    assert set(nodes) - {"x"} <= set(net.points)
    # the shared relu of a torchvision block: one node per call
    assert {"layer1.0.relu", "layer1.0.relu_1"} <= set(net.feature_points)
    assert net.stitch_points == ("relu", *(f"layer{s}.{b}.relu_1" for s in range(1, 5) for b in range(2)))
    assert net.inner_points == tuple(f"layer{s}.{b}.relu" for s in range(1, 5) for b in range(2))
    assert net.resolve("layer2.1") == "layer2.1.relu_1"  # a module name: its output
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = resnet(x)
        for point in net.points:  # every point splits, and the two halves are the network
            h, carry = net.split(x, point)
            assert torch.equal(net.forward_from(h, point, carry), y), point
        assert net.is_cut("layer2.1") and not net.is_cut("layer2.1.relu")
        h, carry = net.split(x, "layer2.1.relu")
        assert len(carry) == 1 and torch.equal(carry[0], net.forward_to(x, "layer2.0"))  # the block input
        feats = net.features(x, ["layer1.0.bn2", "layer1.0.relu_1"])  # bn2's output is then changed in place
        assert not torch.equal(feats["layer1.0.bn2"], feats["layer1.0.relu_1"])
        assert torch.equal(feats["layer1.0.relu_1"], net.forward_to(x, "layer1.0"))
    with pytest.raises(ValueError, match="needs its carry"):
        net.forward_from(h, "layer2.1.relu")


def test_unknown_point_lists_the_nearest_names(resnet):
    net = GraphNet(resnet)
    with pytest.raises(ValueError, match=r"no point 'layer2\.1\.rleu'; nearest: layer2\.1\.relu"):
        net.split(torch.zeros(1, 3, 32, 32), "layer2.1.rleu")
    with pytest.raises(ValueError, match="nearest: layer3.0.conv1"):
        similarity_matrix(resnet, resnet, [torch.zeros(4, 3, 32, 32)], points=["layer3.0.cnv1"], progress=False)


def test_models_that_do_not_trace_run_with_hooks():
    torch.manual_seed(0)
    model = Untraceable().eval()
    net = GraphNet(model)
    assert net.mode == "hooks" and "does not trace" in net.trace_error
    assert net.feature_points == ("relu",) and net.points == ("conv", "relu", "fc")
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        for point in ("relu", "relu_1", "conv"):  # relu_1: the second call of the shared module
            h, carry = net.split(x, point)
            assert torch.equal(net.forward_from(h, point, carry), model(x)), point
        first, second = net.features(x, ["relu", "relu_1"]).values()
        assert torch.equal(second, torch.relu(first - 0.1))
        # B's output with the point's output replaced: B's prefix runs, and is discarded
        h = net.forward_to(x, "relu")
        assert torch.allclose(net.forward_from(torch.zeros_like(h), "relu", (x,)), model.fc.bias.expand(2, 10))


@pytest.mark.parametrize("act, group", [("relu", "positive_scaled_permutations"), ("gelu", "permutations"),
                                        ("silu", "permutations"), ("sigmoid", "permutations"),
                                        ("tanh", "signed_permutations")])
def test_the_group_comes_from_the_activation_at_the_point(act, group):
    net = GraphNet(Tiny(act))
    assert symmetry.nonlinearity(net.activation_at("act")).group == group
    rows = similarity_matrix(net, net, [torch.randn(8, 3, 8, 8)], metrics=["cka_linear"], points=["act"],
                             progress=False)
    assert rows[0]["group_a"] == group
    with pytest.raises(ValueError, match=r"'conv1' of Tiny: no intertwiner group is known there \(it is the output "
                                         r"of Conv2d"):
        net.activation_at("conv1")
    if act == "tanh":  # max pooling does not commute with the negative scales of tanh's group
        with pytest.raises(ValueError, match="MaxPool2d after tanh does not commute"):
            net.activation_at("pool")
    else:
        assert net.activation_at("pool") == "relu"  # F.relu, then max pooling: still G_ReLU
    assert GraphNet(Tiny(act), activation="relu").activation_at("conv1") == "relu"  # given explicitly


def test_the_action_on_a_traced_graph_is_exact(resnet):
    net = GraphNet(resnet)
    x = torch.randn(4, 3, 32, 32)
    assert symmetry.actionable_points(net) == net.inner_points
    for point in ("layer1.0.relu", "layer3.1.relu"):
        g = symmetry.sample_action(net, point, torch.Generator().manual_seed(1))
        moved = symmetry.act(resnet, point, g)  # a plain module in, a plain module out
        assert isinstance(moved, torchvision.models.ResNet)
        with torch.no_grad():
            assert torch.allclose(moved(x), resnet(x), rtol=1e-4, atol=1e-5)
        h, h_moved = symmetry.feature(net, point, x), symmetry.feature(GraphNet(moved), point, x)
        assert torch.allclose(h_moved, symmetry.act_on_features(g.float(), h), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not defined at 'layer2.0.relu_1' of ResNet .*not a convolution or Linear"):
        symmetry.act(net, "layer2.0.relu_1", torch.eye(128))


def test_a_timm_vit_lists_its_points_and_its_permutation_metrics_see_the_symmetry():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                            num_classes=10).eval()
    net = GraphNet(vit)  # the input size is the model's own (16 × 16)
    assert net.feature_points == ("blocks.0.mlp.act", "blocks.1.mlp.act")
    assert net.inner_points == net.feature_points  # the residual stream bypasses the MLP
    assert net.feature_shapes(points=["blocks.1.mlp.act"]) == {"blocks.1.mlp.act": (5, 768)}  # 4 patches + cls
    assert symmetry.nonlinearity(net.activation_at("blocks.1.mlp.act")).group == "permutations"
    # B = g·A with g a permutation of the MLP's hidden units: the same function, features permuted
    g = symmetry.sample_action(net, "blocks.1.mlp.act", torch.Generator().manual_seed(0))
    assert symmetry.intertwiner_group("gelu").contains(g)
    other = symmetry.act(vit, "blocks.1.mlp.act", g)
    x = torch.randn(24, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(other(x), vit(x), atol=1e-5)
    loader = batch_loader(TensorImageDataset(x, torch.zeros(24, dtype=torch.long)), 12)
    rows = similarity_matrix(vit, other, loader, metrics=["procrustes_relu", "cka_relu", "procrustes_orthogonal"],
                             points=["blocks.1.mlp.act", "blocks.0.mlp.act"], progress=False)
    value = {(r["point_a"], r["point_b"], r["metric"]): r for r in rows}
    for metric in ("procrustes_relu", "cka_relu"):  # invariant under permutations: 1 at the moved point
        r = value[("blocks.1.mlp.act", "blocks.1.mlp.act", metric)]
        assert r["value"] == pytest.approx(1.0, abs=1e-5) and r["group_a"] == r["group_b"] == "permutations"
        assert value[("blocks.0.mlp.act", "blocks.1.mlp.act", metric)]["value"] < 0.99
    # class token handling: kept, dropped, separate
    for mode, shapes in (("dropped", {"blocks.1.mlp.act": (12, 4, 768)}),
                         ("separate", {"blocks.1.mlp.act": (12, 4, 768), "blocks.1.mlp.act[cls]": (12, 1, 768)})):
        wrapped = GraphNet(vit, input_shape=(1, 3, 16, 16), class_token=mode)
        feats = wrapped.features(x[:12], list(shapes))
        assert {k: tuple(v.shape) for k, v in feats.items()} == shapes
    assert "blocks.1.mlp.act[cls]" in GraphNet(vit, input_shape=(1, 3, 16, 16), class_token="separate").feature_points


def test_timm_names_and_class_paths_are_references(tmp_path):
    pytest.importorskip("timm")
    net = load_model("{timm: vit_tiny_patch16_224, init_args: {img_size: 16, patch_size: 8, depth: 1}}")
    assert isinstance(net, GraphNet) and net.input_shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="timm has no model 'vit_tiny_patch16_22'; nearest: vit_tiny_patch16_224"):
        load_model("timm:vit_tiny_patch16_22")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r.pt")
    ref = f"{{class_path: torchvision.models.resnet18, init_args: {{num_classes: 10}}, state_dict: {tmp_path / 'r.pt'}}}"
    loaded = load_model(ref)
    assert torch.equal(loaded.model.fc.weight, torch.load(tmp_path / "r.pt")["fc.weight"])
    with pytest.raises(Exception, match="do not fit"):
        load_model(ref.replace("num_classes: 10", "num_classes: 7"))


def test_clear_errors_for_widths_and_unknown_groups():
    narrow, wide = Tiny(width=4), Tiny(width=6)
    with pytest.raises(ValueError, match=r"differ in shape: source \(4, 32, 32\), target \(6, 32, 32\)"):
        load_pair(narrow, wide, "act")
    with pytest.raises(ValueError, match="'conv2' of Tiny: no intertwiner group is known there"):
        StitchingModule(memory_ref(narrow), memory_ref(narrow), "conv2", layer="birkhoff")
    module = StitchingModule(narrow, narrow, "conv2", layer="standard")  # an unconstrained layer needs no group
    assert module.stitch.channels == 4 and module.hparams.source.startswith("memory:")
    # from Python, the same errors come first and alone (before any fit starts)
    with pytest.raises(ValueError, match=r"^Tiny has no point 'atc'; nearest: act"):
        symstitch.stitch(narrow, narrow, "atc", layer="standard")
    with pytest.raises(ValueError, match=r"^representations at 'act' differ in shape"):
        symstitch.stitch(narrow, wide, "act", layer="standard")


def test_loaders_of_uint8_images_are_normalised_as_training_did():
    torch.manual_seed(0)
    net = Tiny().eval()
    dm = DataModule(dataset="digits", eval_batch_size=120)
    kwargs = dict(metrics=["cka_linear", "procrustes_relu"], points=["act"], progress=False)
    raw, ready = similarity_matrix(net, net, dm.test_dataloader(), **kwargs), similarity_matrix(net, net, dm.loader("test"), **kwargs)
    assert [r["value"] for r in raw] == [r["value"] for r in ready]
    bare = batch_loader(TensorImageDataset(dm.test_set.x, dm.test_set.y), 120)  # uint8, and nothing says how
    with pytest.raises(ValueError, match="does not say how they are normalised"):
        similarity_matrix(net, net, bare, **kwargs)
    given = similarity_matrix(net, net, bare, normalize=(dm.mean, dm.std), **kwargs)
    assert [r["value"] for r in given] == [r["value"] for r in ready]


def test_prefix_cache_inside_a_block_trains_exactly_like_the_full_forward():
    """At a graph point that is not a cut, the prefix cache holds h and the carry (a tuple: the block input that
    the shortcut takes); training on it is the same computation as running A's prefix every step, also when a
    later fit reads the cache another one computed (a sweep's cells at one point)."""
    torch.manual_seed(0)
    a, b = Residual().eval(), Residual().eval()
    net = GraphNet(a)
    assert not net.is_cut("relu")
    _, carry = net.split(torch.zeros(2, 3, 32, 32), "relu")
    assert isinstance(carry, tuple) and len(carry) == 1
    weights, starts, recalibrated = [], [], []
    with PrefixCache().scope():  # the second cached fit reuses the first one's cache
        for cache in (None, "float32", "float32"):
            pl.seed_everything(3, verbose=False)
            dm = DataModule(dataset="digits", crop_padding=0)
            module = StitchingModule(a, b, "relu", layer="standard", prefix_cache=cache,
                                     scheduler=lambda opt: WarmupCosine(opt, warmup=0.1),  # needs the loader early
                                     protocols=["frozen", "recalibrated"])
            starts.append(module.stitch.matrix().detach().clone())
            trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, limit_train_batches=4, limit_val_batches=1,
                                 num_sanity_val_steps=0)
            trainer.fit(module, datamodule=dm)
            if cache:
                assert len(module._cache_layout) == 2  # h and the block input
            weights.append(module.stitch.matrix().detach())
            recalibrated.append(float(trainer.callback_metrics["stitch_recalibrated/acc"]))
            assert dm.train_set.x.dtype == torch.uint8  # the DataModule has its images back
    assert torch.equal(starts[0], starts[1]) and torch.equal(starts[0], starts[2])
    assert (weights[0] - starts[0]).abs().max() > 1e-3  # it trained
    for cached in weights[1:]:
        torch.testing.assert_close(cached, weights[0], atol=1e-5, rtol=1e-5)
    assert recalibrated[1] == recalibrated[0] and recalibrated[2] == recalibrated[0]
