"""Intertwiner groups (docs/method.md §1 table) and the weight-space action g·A on the zoo."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from symstitch import models
from symstitch import symmetry as S
from symstitch.data import DataModule, normalize_batch
from symstitch.training import ClassifierModule

SMALL = 0.25
MCNN_FAMILY = ["mcnn", "mcnn_nobn", "mcnn_sigmoid", "mcnn_gelu", "mcnn_tanh", "cwcnn", "cwcnn_nobn"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


haar_orthogonal = S.haar_orthogonal


def test_haar_orthogonal_is_orthogonal_and_uniform_in_sign():
    gen = torch.Generator().manual_seed(0)
    Qs = torch.stack([S.haar_orthogonal(4, generator=gen) for _ in range(2000)])
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(Qs @ Qs.transpose(1, 2), eye.expand(2000, 4, 4), rtol=0, atol=1e-12)
    # Haar: every entry has mean 0 and variance 1/n (a QR without the sign fix biases the diagonal > 0)
    torch.testing.assert_close(Qs.mean(0), torch.zeros(4, 4, dtype=torch.float64), rtol=0, atol=0.06)
    torch.testing.assert_close((Qs ** 2).mean(0), torch.full((4, 4), 0.25, dtype=torch.float64), rtol=0, atol=0.03)


# ----------------------------------------------------------------------------------------------------------
# The table of docs/method.md §1, one row at a time

TABLE = [
    ("relu", {}, S.PositiveScaledPermutations),
    ("leaky_relu", {}, S.PositiveScaledPermutations),
    ("gelu", {}, S.Permutations),
    ("sigmoid", {}, S.Permutations),
    ("silu", {}, S.Permutations),
    ("tanh", {}, S.SignedPermutations),
    ("rbf", {}, S.SignedPermutations),
    ("poly", {"degree": 2}, S.InvertibleScaledPermutations),
    ("poly", {"degree": 3}, S.InvertibleScaledPermutations),
]


@pytest.mark.parametrize("name, kw, kind", TABLE, ids=[f"{n}{kw.get('degree', '')}" for n, kw, _ in TABLE])
def test_table_row_intertwines(name, kw, kind):
    torch.manual_seed(0)
    group = S.intertwiner_group(name, **kw)
    sigma = S.activation_fn(name, **kw)
    assert isinstance(group, kind)
    g = group.sample(7, generator=torch.Generator().manual_seed(1))
    x = torch.randn(7, 50, dtype=torch.float64)
    # σ(g x) = φ(g) σ(x)
    torch.testing.assert_close(sigma(g @ x), group.phi(g) @ sigma(x), rtol=1e-10, atol=1e-10)
    assert group.contains(g)
    perm, scales = group.decompose(g)
    assert torch.equal(group.compose(perm, scales), g)
    assert sorted(perm.tolist()) == list(range(7))


def _just_outside(kind) -> torch.Tensor:
    """A 7×7 matrix just outside a group of this kind."""
    P = S.compose(torch.tensor([3, 0, 6, 1, 5, 2, 4]), torch.ones(7, dtype=torch.float64))
    if kind is S.InvertibleScaledPermutations:  # any invertible diagonal is inside: leave the monomials
        return P + 0.3 * torch.eye(7, dtype=torch.float64)
    d = torch.ones(7, dtype=torch.float64)
    d[2] = -1.5 if kind is S.PositiveScaledPermutations else 2.0  # a negative / a non-unit scale
    return P @ torch.diag(d)


@pytest.mark.parametrize("name, kw, kind", TABLE, ids=[f"{n}{kw.get('degree', '')}" for n, kw, _ in TABLE])
def test_table_row_negative(name, kw, kind):
    """For every row: a matrix just outside G_σ is rejected, and no matrix B at all (best least-squares
    B, not just φ(A)) satisfies σ(A x) = B σ(x)."""
    group = S.intertwiner_group(name, **kw)
    sigma = S.activation_fn(name, **kw)
    A = _just_outside(kind)
    assert not group.contains(A)
    x = torch.randn(7, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Y, X = sigma(A @ x), sigma(x)
    B = torch.linalg.lstsq(X.T, Y.T).solution.T
    residual = (B @ X - Y).norm() / Y.norm()
    assert residual > 1e-2, residual
    # the control: for a member, the same least-squares fit is exact
    g = group.sample(7, generator=torch.Generator().manual_seed(3))
    Yg = sigma(g @ x)
    Bg = torch.linalg.lstsq(X.T, Yg.T).solution.T
    assert (Bg @ X - Yg).norm() / Yg.norm() < 1e-8


def test_tables_phi():
    g = S.intertwiner_group("poly3").sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(S.intertwiner_group("poly", degree=3).phi(g), g**3)
    assert torch.equal(S.intertwiner_group("rbf").phi(-g), g.abs())
    assert torch.equal(S.intertwiner_group("tanh").phi(g), g)


def test_decompose_convention():
    perm = torch.tensor([2, 0, 3, 1])
    d = torch.tensor([0.5, 2.0, 3.0, 4.0], dtype=torch.float64)
    g = S.compose(perm, d)  # g = P_π · diag(d)
    x = torch.randn(4, dtype=torch.float64)
    assert torch.equal(g @ x, (d * x)[perm])
    assert all(g[i, perm[i]] == d[perm[i]] for i in range(4))
    back_perm, back_d = S.decompose(g)
    assert torch.equal(back_perm, perm) and torch.equal(back_d, d)


def test_sampling_laws():
    gen = torch.Generator().manual_seed(0)
    group = S.intertwiner_group("relu", scale_spread=0.5)
    scales = torch.cat([group.decompose(group.sample(100, gen))[1] for _ in range(100)])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.02)  # exp(s z)/exp(s²/2) has mean 1
    assert scales.log().std().item() == pytest.approx(0.5, abs=0.02)
    perms = [tuple(S.decompose(group.sample(3, gen))[0].tolist()) for _ in range(1200)]
    counts = [perms.count(p) for p in set(perms)]
    assert len(counts) == 6 and min(counts) > 140  # uniform: 200 each
    signs = torch.cat([S.intertwiner_group("tanh").decompose(S.intertwiner_group("tanh").sample(50, gen))[1]])
    assert set(signs.tolist()) == {-1.0, 1.0}
    a = group.sample(6, torch.Generator().manual_seed(3))
    assert torch.equal(a, group.sample(6, torch.Generator().manual_seed(3)))
    assert group.sample(4, dtype=torch.float32).dtype == torch.float32


def test_orthogonal_is_not_in_g_relu():
    gen = torch.Generator().manual_seed(0)
    Q = haar_orthogonal(7, gen)
    torch.testing.assert_close(Q @ Q.T, torch.eye(7, dtype=torch.float64))
    assert not S.intertwiner_group("relu").contains(Q)
    x = torch.randn(7, 50, generator=gen, dtype=torch.float64)
    assert (torch.relu(Q @ x) - Q @ torch.relu(x)).abs().max() > 1e-2


def test_negative_scale_is_not_in_g_relu():
    d = torch.ones(5, dtype=torch.float64)
    d[2] = -1.0
    g = S.compose(torch.tensor([1, 2, 0, 4, 3]), d)
    assert not S.intertwiner_group("relu").contains(g)
    assert S.intertwiner_group("tanh").contains(g)
    with pytest.raises(ValueError, match="not allowed"):
        S.intertwiner_group("relu").compose(torch.tensor([1, 2, 0, 4, 3]), d)
    with pytest.raises(ValueError, match="not in"):
        S.intertwiner_group("relu").decompose(g)


def test_scaled_permutation_is_not_in_g_gelu():
    gen = torch.Generator().manual_seed(0)
    D = S.compose(torch.tensor([3, 1, 0, 2]), torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    assert S.intertwiner_group("relu").contains(D)
    assert not S.intertwiner_group("gelu").contains(D)
    gelu = S.activation_fn("gelu")
    x = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    assert (gelu(D @ x) - D @ gelu(x)).abs().max() > 1e-2


def test_not_monomial_and_wrong_shapes():
    group = S.intertwiner_group("relu")
    assert not group.contains(torch.ones(3, 3))
    assert not group.contains(torch.eye(3)[:2])
    assert not group.contains(torch.zeros(3, 3))
    with pytest.raises(ValueError):
        S.decompose(torch.ones(3, 3))


@pytest.mark.parametrize(
    "activation, kind",
    [
        (nn.ReLU(), S.PositiveScaledPermutations),
        (nn.ReLU, S.PositiveScaledPermutations),
        (nn.LeakyReLU(0.2), S.PositiveScaledPermutations),
        (nn.GELU, S.Permutations),
        (nn.GELU(approximate="tanh"), S.Permutations),
        (nn.Sigmoid(), S.Permutations),
        (nn.SiLU, S.Permutations),
        (nn.Tanh(), S.SignedPermutations),
    ],
)
def test_modules_resolve_to_their_group(activation, kind):
    assert isinstance(S.intertwiner_group(activation), kind)


def test_module_kwargs_are_read_and_names_are_readable():
    leaky = S.activation_fn(nn.LeakyReLU(0.2))
    assert leaky(torch.tensor([-1.0])).item() == pytest.approx(-0.2)
    assert S.intertwiner_group("relu").name == "G_ReLU: positive-scaled permutations P·D (D > 0)"
    assert S.intertwiner_group("poly3").name.startswith("G_x^3")
    assert set(S.GROUPS) == {"permutations", "positive_scaled_permutations", "signed_permutations",
                             "invertible_scaled_permutations"}
    with pytest.raises(KeyError, match="available"):
        S.intertwiner_group("softplus")
    with pytest.raises(ValueError):
        S.intertwiner_group(nn.Softplus())
    with pytest.raises(ValueError, match="degree"):
        S.intertwiner_group("poly1")


# ----------------------------------------------------------------------------------------------------------
# The weight-space action


def randomize_batchnorm(net: nn.Module, seed: int) -> None:
    """Non-trivial γ, β, running mean and variance: the defaults (1, 0, 0, 1) would hide a missing permutation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen))
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.5)


def random_net(arch: str, seed: int = 0) -> models.StagedNet:
    torch.manual_seed(seed)
    net = models.build(arch, width=SMALL)
    randomize_batchnorm(net, seed)
    with torch.no_grad():  # the zoo zero-initialises conv biases
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
    return net


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def sample_for(net: models.StagedNet, point: str, seed: int) -> torch.Tensor:
    x = torch.zeros(1, 3, 32, 32, dtype=next(net.parameters()).dtype)
    channels = S.feature(net, point, x).shape[1]
    g = S.sample_action(net, point, generator=torch.Generator().manual_seed(seed))
    assert g.shape == (channels, channels)
    return g


def check_action(net: models.StagedNet, point: str, g: torch.Tensor, x: torch.Tensor) -> None:
    """g·net computes the same function, has representation g·h at ``point``, and net is untouched."""
    modes = [m.training for m in net.modules()]
    before = snapshot(net)
    new = S.act(net, point, g)
    after = snapshot(net)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical parameters and buffers
    assert [m.training for m in net.modules()] == modes
    assert [m.training for m in new.modules()] == modes
    net, new = net.eval(), new.eval()
    try:
        with torch.no_grad():
            assert max_rel(new(x), net(x)) < 1e-5
        h, h_new = S.feature(net, point, x), S.feature(new, point, x)
        assert max_rel(h_new, S.act_on_features(g, h)) < 1e-5
    finally:  # shared fixtures: leave the modes as they were
        for m, mode in zip(net.modules(), modes):
            m.training = mode


MCNN_CASES = [(arch, k) for arch in MCNN_FAMILY for k in range(1, 5)]


@pytest.mark.parametrize("arch, k", MCNN_CASES, ids=[f"{a}-layer{k}" for a, k in MCNN_CASES])
def test_act_mcnn_family_random_init(arch, k):
    net = random_net(arch).train()
    point = f"layer{k}.act"
    assert point in S.actionable_points(net)
    g = sample_for(net, point, seed=k)
    if arch in ("mcnn_sigmoid", "mcnn_gelu"):
        assert isinstance(S.intertwiner_group(net.activation), S.Permutations)
    elif arch == "mcnn_tanh":
        assert isinstance(S.intertwiner_group(net.activation), S.SignedPermutations)
        assert torch.equal(g.abs(), (g != 0).double()) and (g < 0).any()  # signs, no scales
        # every mCNN layer is followed by a max-pool, which commutes with no sign flip: refused, with the reason
        with pytest.raises(ValueError, match="max-pooling after .* does not commute with negative scales"):
            check_action(net, point, g, torch.randn(6, 3, 32, 32))
        return
    else:
        assert not torch.equal(g.abs(), (g != 0).double())  # really scaled
    torch.manual_seed(1)
    check_action(net, point, g, torch.randn(6, 3, 32, 32))


def test_actionable_points_cover_every_mcnn_feature_point():
    for arch in MCNN_FAMILY:
        net = models.build(arch, width=SMALL)
        assert S.actionable_points(net) == net.feature_points


RESNET20_INSIDE = [f"layer{s}.{b}.act1" for s in (1, 2, 3) for b in range(3)]
RESNET20_STREAM = ["stem.act"] + [f"layer{s}.{b}.act2" for s in (1, 2, 3) for b in range(3)]
RESNET20_POINTS = ["stem.act"] + [f"layer{s}.{b}.act{i}" for s in (1, 2, 3) for b in range(3) for i in (1, 2)]


def test_actionable_points_resnets():
    for arch in ("resnet20", "resnet56", "resnet18"):
        net = models.build(arch, width=SMALL)
        assert S.actionable_points(net) == net.feature_points  # every ReLU, in forward order
    assert S.actionable_points(models.build("resnet20", width=SMALL)) == tuple(RESNET20_POINTS)
    assert S.actionable_points(models.build("cct", width=SMALL)) == ()


def test_action_blocks_follow_the_shortcuts():
    """Option A (ResNet-20, widths 16-32-64 at width 1): a stage's stream starts with the previous stage's
    channels; option B (ResNet-18): every stage is free."""
    net = models.build("resnet20")
    assert S.action_blocks(net, "stem.act") == (16,)
    assert S.action_blocks(net, "layer1.2.act2") == (16,)
    assert S.action_blocks(net, "layer2.0.act2") == (16, 16)
    assert S.action_blocks(net, "layer3.2.act2") == (16, 16, 32)
    assert S.action_blocks(net, "layer3.2.act1") == (64,)  # inside a block: no shortcut involved
    resnet18 = models.build("resnet18")
    assert [S.action_blocks(resnet18, f"layer{s}.1.act2") for s in (1, 2, 3, 4)] == [(64,), (128,), (256,), (512,)]
    g = S.sample_action(net, "layer3.0.act2", torch.Generator().manual_seed(0))
    assert g[:16, 16:].abs().max() == 0 and g[16:32, 32:].abs().max() == 0 and g[32:, :32].abs().max() == 0
    assert S.intertwiner_group("relu").contains(g)


@pytest.mark.parametrize("point", RESNET20_POINTS)
def test_act_resnet20_random_init(point):
    net = random_net("resnet20").train()
    torch.manual_seed(1)
    check_action(net, point, sample_for(net, point, seed=2), torch.randn(6, 3, 32, 32))


def test_act_resnet56_every_point_random_init():
    net = random_net("resnet56").eval()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    for k, point in enumerate(S.actionable_points(net)):
        check_action(net, point, sample_for(net, point, seed=k), x)


def test_act_resnet18_every_point_random_init():
    net = random_net("resnet18").eval()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    assert len(S.actionable_points(net)) == 17
    for k, point in enumerate(S.actionable_points(net)):
        check_action(net, point, sample_for(net, point, seed=k), x)


def test_stream_action_edits_exactly_the_stream():
    """ResNet-20 at ``layer1.1.act2``: every producer of stage 1 moves (stem, each block's conv2/bn2), each
    block's conv1 absorbs, stage 2 and 3 see g ⊕ I (first channels moved, padded ones fixed), the classifier
    absorbs (g ⊕ I)^{-1}; block-internal layers after conv1 of the later stages do not change."""
    net = random_net("resnet20").eval()
    g = sample_for(net, "layer1.1.act2", seed=4)
    n = g.shape[0]
    new = S.act(net, "layer1.1.act2", g)
    perm, d = S.decompose(g)  # g = P_π diag(d): row i of g·W is d[π[i]] W[π[i]]
    torch.testing.assert_close(new.stem.conv.weight, net.stem.conv.weight[perm])
    torch.testing.assert_close(new.stem.bn.weight, (d[perm] * net.stem.bn.weight.double()[perm]).float())
    torch.testing.assert_close(new.layer1[2].conv2.weight, net.layer1[2].conv2.weight[perm])
    torch.testing.assert_close(new.layer1[0].conv1.weight, net.layer1[0].conv1.weight[:, perm] / d[perm].float()[None, :, None, None])
    torch.testing.assert_close(new.layer3[2].conv2.weight[:n], net.layer3[2].conv2.weight[perm])
    torch.testing.assert_close(new.layer3[2].conv2.weight[n:], net.layer3[2].conv2.weight[n:])
    torch.testing.assert_close(new.classifier.fc.weight[:, n:], net.classifier.fc.weight[:, n:])
    assert not torch.equal(new.classifier.fc.weight[:, :n], net.classifier.fc.weight[:, :n])
    for block in (1, 2):
        assert torch.equal(new.layer3[block].conv2.weight[n:], net.layer3[block].conv2.weight[n:])  # padded: I
        assert torch.equal(new.layer2[block].bn1.weight, net.layer2[block].bn1.weight)


def test_option_b_shortcut_absorbs_the_stream():
    """ResNet-18 at ``layer2.1.act2``: stage 1 and the stem stay bit-identical, layer3.0's 1×1 shortcut absorbs."""
    net = random_net("resnet18").eval()
    new = S.act(net, "layer2.1.act2", sample_for(net, "layer2.1.act2", seed=5))
    before, after = net.state_dict(), new.state_dict()
    for key in before:
        if key.startswith(("stem.", "layer1.", "layer4.")) or key.startswith(("layer3.0.bn", "layer3.1.")):
            assert torch.equal(before[key], after[key]), key
    for key in ("layer2.0.shortcut.conv.weight", "layer2.0.shortcut.bn.weight", "layer3.0.shortcut.conv.weight",
                "layer3.0.conv1.weight", "layer2.1.conv1.weight", "layer2.0.conv2.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_stream_refuses_g_mixing_the_stages():
    net = random_net("resnet20")
    n = net.layer2[0].conv2.out_channels
    g = torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=0)  # a permutation across the 16/16 boundary
    with pytest.raises(ValueError, match=r"block diagonal with blocks 4\+4"):
        S.act(net, "layer2.1.act2", g)


def test_act_channels_last_float64_and_float_g():
    net = random_net("mcnn").to(memory_format=torch.channels_last).double().eval()
    g = sample_for(net, "layer2.act", seed=0)
    new = S.act(net, "layer2.act", g.float())
    assert new.layer2.conv.weight.dtype == torch.float64
    assert new.layer2.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel(new(x), net(x)) < 1e-6  # g was rounded to float32; the edit itself is exact


# -- trained networks


def train_one_epoch(arch: str) -> tuple[models.StagedNet, torch.Tensor]:
    pl.seed_everything(0)
    dm = DataModule(dataset="digits", batch_size=64)
    module = ClassifierModule(arch, arch_kwargs={"width": SMALL}, num_classes=dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    dm.setup("test")
    x = normalize_batch(dm.test_set.x[:32], dm.mean, dm.std)
    return module.net, x


@pytest.fixture(scope="module")
def trained_mcnn():
    return train_one_epoch("mcnn")


@pytest.fixture(scope="module")
def trained_resnet20():
    return train_one_epoch("resnet20")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_act_trained_mcnn(trained_mcnn, k):
    net, x = trained_mcnn
    net.eval()
    assert net.layer1.bn.running_var.std() > 0  # training moved the statistics off their defaults
    check_action(net, f"layer{k}.act", sample_for(net, f"layer{k}.act", seed=k), x)


@pytest.mark.parametrize("point", RESNET20_POINTS)
def test_act_trained_resnet20(trained_resnet20, point):
    net, x = trained_resnet20
    net.eval()
    check_action(net, point, sample_for(net, point, seed=5), x)


# -- refusals and a negative control


def test_act_refuses_elements_outside_the_group():
    net = random_net("resnet20")
    n = net.layer1[0].conv1.out_channels
    with pytest.raises(ValueError, match="not in G_ReLU"):
        S.act(net, "layer1.0.act1", haar_orthogonal(n, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=f"must be {n}×{n}"):
        S.act(net, "layer1.0.act1", torch.eye(n + 1, dtype=torch.float64))
    sigmoid_net = random_net("mcnn_sigmoid")
    g = sample_for(random_net("mcnn"), "layer1.act", seed=0)  # positive-scaled, not a permutation
    with pytest.raises(ValueError, match="not in G_sigmoid"):
        S.act(sigmoid_net, "layer1.act", g)


def test_act_refuses_undefined_and_unknown_points():
    net = random_net("resnet20")
    with pytest.raises(ValueError, match=r"layer1\.0\.act1\b.*layer3\.2\.act2"):
        S.act(net, "layer1.0", torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"layer9\.act.*layer1\.act"):
        S.act(random_net("mcnn"), "layer9.act", torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="not defined"):
        S.act(models.build("cct", width=SMALL), "blocks.0.mlp.act", torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="no feature point"):
        S.feature(net, "layer1.0", torch.zeros(1, 3, 32, 32))


def test_negative_control_conv_only_changes_the_output():
    net = random_net("mcnn").eval()
    g = sample_for(net, "layer2.act", seed=0)
    half = S.act(net, "layer2.act", g)
    with torch.no_grad():
        half.layer3.conv.weight.copy_(net.layer3.conv.weight)  # undo W_{l+1} ← W_{l+1} φ(g)^{-1}
        x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert max_rel(half(x), net(x)) > 1e-2
        assert max_rel(S.act(net, "layer2.act", g)(x), net(x)) < 1e-5


def test_monomial_inverse():
    g = S.intertwiner_group("poly3").sample(9, generator=torch.Generator().manual_seed(0))
    inverse = S.monomial_inverse(g)
    torch.testing.assert_close(inverse @ g, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(inverse != 0, g.T != 0)
