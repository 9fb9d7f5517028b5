"""Alignment and merging (symstitch.merge, docs/method.md §7): ground truth B = g·A recovered by every method
for every zoo architecture the action reaches and a torchvision model, the barrier of such a pair 0, scales
that matter, the line θ(λ), BatchNorm re-estimation and the barrier in closed form, and the refusals."""

from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
from torch import nn

from symstitch import models
from symstitch.graph import as_network
from symstitch.merge import align, alignment_sites, barrier, interpolate, merge_path, reestimate_batchnorm
from symstitch.merge.from_stitch import harden_blocks
from symstitch.merge.sites import project_scales
from symstitch.merge.path import evaluate, lambdas
from symstitch.merge.weight import _scaled_cost, block_step
from symstitch.symmetry import act_, compose, decompose, monomial_inverse, sample_action

#: every zoo architecture with a weight-space action, small (name, width); the default suite runs one of each kind
#: (BatchNorm or not, each activation, option-A and option-B residual streams), the slow suite the rest
ARCHS = [("mcnn", 0.125), ("mcnn_nobn", 0.125), ("mcnn_gelu", 0.125), ("mcnn_sigmoid", 0.125), ("mcnn_tanh", 0.125),
         ("resnet20", 0.5), ("resnet18", 0.125),
         *[pytest.param(arch, width, marks=pytest.mark.slow) for arch, width in (
             ("cwcnn", 0.125), ("cwcnn_nobn", 0.125), ("resnet32", 0.25), ("resnet44", 0.25), ("resnet56", 0.25),
             ("resnet110", 0.25))]]


def _alive(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random BatchNorm affine parameters with positive shifts, statistics estimated on random images, and positive
    biases before every activation: no unit is dead or a copy of another on random inputs (every unit is
    identifiable from its activations)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(0.2, 0.6, generator=generator)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(0.2, 0.6, generator=generator)
    return reestimate_batchnorm(net, _random_data(11, batches=2, n=32))


def _transformed(a: nn.Module, seed: int, spread: Optional[float] = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """B = g₀·A with g₀ drawn at every alignment site (``sample_action``: residual streams with their blocks);
    ``spread``: positive scales exp(spread · z) instead of the sampler's."""
    generator = torch.Generator().manual_seed(seed)
    net, g0 = copy.deepcopy(a), {}
    wrapped, target = as_network(a), as_network(net)  # traced once each (a wrapper shares the module's weights)
    for site in alignment_sites(wrapped)[0]:
        perm, d = decompose(sample_action(wrapped, site.point, generator))
        g = compose(perm, project_scales(d, site.scales))  # e.g. no signs where max-pooling follows tanh
        if spread is not None and site.scales == "positive":  # the permutation is block diagonal: so is g
            g = compose(decompose(g)[0], torch.exp(spread * torch.randn(site.size, generator=generator,
                                                                         dtype=torch.float64)))
        g0[site.point] = g
        act_(target, site.point, g)  # one copy, edited site by site
    return net, g0


def _weights_close(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


def _random_data(seed: int, batches: int = 3, n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator))
            for _ in range(batches)]


def _identifiable(a: nn.Module, points: list[str], data) -> dict[str, torch.Tensor]:
    """Per point, A's units that activations can identify: not zero on every input, and no copy of another unit
    (normalised cross-correlation below 1)."""
    from symstitch.merge.activation import record_moments

    net = as_network(a)
    out = {}
    for p, (cross, sq, _) in record_moments(net, net, points, data).items():
        norm = sq.sqrt().clamp_min(1e-300)
        corr = cross / norm[:, None] / norm[None, :]
        corr.fill_diagonal_(0)
        out[p] = (sq > 0) & (corr.max(1).values < 1 - 1e-9)
    return out


@pytest.mark.groundtruth
@pytest.mark.parametrize("arch,width", ARCHS)
def test_ground_truth_every_zoo_architecture(arch, width, one_thread):
    """B = g₀·A: weight matching finds g = g₀⁻¹ at every site, g·B has A's weights, and the line between A and g·B
    is flat (barrier 0); activation matching finds g₀⁻¹ on every unit its data can identify (all of them where
    every unit is alive)."""
    torch.manual_seed(0)
    a = _alive(models.build(arch, width=width), torch.Generator().manual_seed(1))
    b, g0 = _transformed(a, seed=2)
    data = _random_data(3)
    al = align(a, b, "weight", "full")
    assert set(al.elements) == set(g0) and al.details["converged"]
    # without BatchNorm the scales of consecutive sites are coupled and the descent creeps the last digits
    tight = any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    for point, g in al.elements.items():
        assert torch.equal(decompose(g)[0], decompose(monomial_inverse(g0[point]))[0]), point
        assert torch.allclose(g, monomial_inverse(g0[point]), rtol=1e-5 if tight else 1e-3, atol=1e-6), point
    merged = al.apply(b)
    assert _weights_close(a, merged) < (1e-4 if tight else 1e-2)
    path = merge_path(a, merged, data[:1], data[1:], count=3)
    for mode in path.loss:
        assert abs(path.barrier_loss[mode]) < 1e-4
    al = align(a, b, "activation", "full", data=data)
    sites = {s.point: s for s in al.sites}
    known = _identifiable(a, [p for s in al.sites for p in s.points], data)
    for point, g in al.elements.items():
        site = sites[point]
        rows = torch.cat([known[site.holders(hi)[-1]][lo:hi] for lo, hi in site.block_ranges()])
        assert rows.float().mean() > 0.5, point  # the check below is not empty
        assert torch.allclose(g[rows], monomial_inverse(g0[point])[rows], atol=1e-5), point
    if all(k.all() for k in known.values()):
        assert _weights_close(a, al.apply(b)) < 1e-4


@pytest.mark.groundtruth
def test_signed_permutations_for_tanh(one_thread):
    """A tanh network without max-pooling (any module, through the network interface): its group is the signed
    permutations, B = g₀·A with random signs is undone by both methods, signs included."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(), nn.Conv2d(8, 12, 3, padding=1),
                      nn.Tanh(), nn.Conv2d(12, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    sites = alignment_sites(a)[0]
    assert [s.scales for s in sites] == ["sign", "sign"]
    b, g0 = _transformed(a, seed=4)
    assert any((decompose(g)[1] < 0).any() for g in g0.values())
    data = _random_data(5, batches=2, n=16)
    for method, options in (("weight", {}), ("activation", {"data": data})):
        al = align(a, b, method, **options)
        for point, g in al.elements.items():
            assert torch.allclose(g, monomial_inverse(g0[point]), atol=1e-5), (method, point)
        assert _weights_close(a, al.apply(b)) < 1e-4
        al = align(a, b, method, "permutations", **options)
        assert all((decompose(g)[1] == 1).all() for g in al.elements.values())


def test_weight_matching_converges_and_reports(one_thread):
    torch.manual_seed(0)
    a = models.build("resnet20", width=0.5).eval()
    b, _ = _transformed(a, seed=5)
    al = align(a, b, "weight")
    assert al.details["converged"] and al.details["distance"] < 1e-8
    summary = al.summary()
    assert summary["method"] == "weight" and len(summary["sites"]) == 10  # one stream run + 9 block-internal sites
    stream = summary["sites"][0]
    assert stream["blocks"] == [8, 8, 16] and len(stream["points"]) == 10


def test_residual_stream_is_one_site_with_blocks():
    net = models.build("resnet20")
    sites, unreached = alignment_sites(net)
    assert not unreached
    stream = [s for s in sites if "stem.act" in s.points][0]
    assert stream.point.startswith("layer3.") and stream.blocks == (16, 16, 32)
    assert stream.holders(16) == list(stream.points) and stream.holders(64) == [p for p in stream.points
                                                                                  if p.startswith("layer3")]
    # option-B shortcuts end a run: ResNet-18 has one stream site per stage
    assert sum(len(s.points) > 1 for s in alignment_sites(models.build("resnet18", width=0.125))[0]) == 4


def test_tanh_with_max_pooling_aligns_with_permutations_only():
    net = models.build("mcnn_tanh", width=0.125)
    assert {s.scales for s in alignment_sites(net)[0]} == {"none"}  # signs do not commute with max-pooling
    assert {s.scales for s in alignment_sites(models.build("mcnn_gelu", width=0.125))[0]} == {"none"}
    assert {s.scales for s in alignment_sites(models.build("mcnn", width=0.125))[0]} == {"positive"}


@pytest.fixture(scope="module")
def trained_pair(mcnn_lib):
    from tests.conftest import library_refs
    from symstitch.align import evaluation_loader
    from symstitch.library import load_model

    ref_a, ref_b = library_refs(mcnn_lib)
    train = evaluation_loader(ref_a, None, "train", 256, 128)
    test = evaluation_loader(ref_a, None, "test", 256, 128)
    return load_model(ref_a), load_model(ref_b), train, test


@pytest.mark.groundtruth
def test_scales_matter(trained_pair):
    """B = P·D·A with D far from 1: permutation-only alignment finds P but leaves D, and the line from A to it
    rises; the G_ReLU alignment removes D as well and the barrier with it."""
    a, _, train, test = trained_pair
    b, _ = _transformed(a, seed=7, spread=2.0)
    for method, options in (("activation", {"data": train}), ("weight", {})):
        barriers = {}
        for group in ("permutations", "full"):
            al = align(a, b, method, group, **options)
            perm_only = group == "permutations"
            assert all(torch.allclose(decompose(g)[1], torch.ones(len(g), dtype=torch.float64)) == perm_only
                       for g in al.elements.values())
            path = merge_path(a, al.apply(b), test, train, count=5, modes=["interpolated"])
            barriers[group] = path.barrier_loss["interpolated"]
        assert abs(barriers["full"]) < 1e-4, method
        assert barriers["permutations"] > 0.05, (method, barriers)


@pytest.mark.groundtruth
def test_torchvision_model_aligned_where_the_action_reaches(one_thread):
    """A torchvision ResNet-18 through the network interface: the block-internal ReLUs are aligned, the residual
    streams (an activation read by several layers) are named as unreached with the reason; B = g·A at the
    reached sites is undone and the barrier is 0."""
    import torchvision
    torch.manual_seed(0)
    a = _alive(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(1))
    net = as_network(a)
    sites, unreached = alignment_sites(net)
    assert len(sites) == 8 and unreached
    assert all(reason for reason in unreached.values())
    b, g0 = _transformed(net, seed=2)
    data = _random_data(4, batches=2, n=16)
    al = align(a, b.model, "activation", "full", data=data)  # every site
    assert al.unaligned == unreached and set(al.elements) == set(g0)
    for point, g in al.elements.items():
        assert torch.allclose(g, monomial_inverse(g0[point]), atol=1e-5), point
    merged = al.apply(b.model)
    assert isinstance(merged, type(a)) and _weights_close(a, merged) < 1e-4
    early = [s.point for s in sites[:4]]  # weight matching at the 64- and 128-unit sites (the 512-unit ones cost)
    al = align(a, b.model, "weight", "full", points=early)
    for point in early:
        assert torch.allclose(al.elements[point], monomial_inverse(g0[point]), atol=1e-5), point
    path = merge_path(a, merged, data[:1], data[1:], count=3)
    assert abs(path.barrier_loss["reestimated"]) < 1e-4


def test_refusals():
    with pytest.raises(ValueError, match="no point where the weight-space action is defined"):
        align(models.build("cct"), models.build("cct"), "weight")
    with pytest.raises(ValueError, match="sites differ.*one architecture and width"):
        align(models.build("mcnn", width=0.125), models.build("mcnn", width=0.25), "weight")
    with pytest.raises(ValueError, match="activation matching needs data"):
        align(models.build("mcnn", width=0.125), models.build("mcnn", width=0.125), "activation")
    with pytest.raises(KeyError, match="unknown alignment method 'bogus'; available: activation, stitch, weight"):
        align(models.build("mcnn", width=0.125), models.build("mcnn", width=0.125), "bogus")
    with pytest.raises(ValueError, match="group is one of none, permutations, full"):
        align(models.build("mcnn", width=0.125), models.build("mcnn", width=0.125), "weight", "orthogonal")
    import torchvision
    tv = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match=r"cannot align at relu: .*read by 2 operations.*; alignable points: layer1.0.relu"):
        align(tv, tv, "weight", points=["relu"])


def test_weight_step_finds_scaled_permutation_exactly():
    """One block, B = g⁻¹·A for g = P_π·diag(d): B's row π(i) is A's row i divided by d_π(i) where the scales
    act (a), A's row i where only the permutation does (w), and A's column i times d_π(i) in the reading layer
    (c); the step finds π and d."""
    generator = torch.Generator().manual_seed(0)
    n = 12
    sa, wa, ca = (torch.randn(n, k, generator=generator, dtype=torch.float64) for k in (3, 5, 7))
    perm = torch.randperm(n, generator=generator)
    d = torch.exp(torch.randn(n, generator=generator, dtype=torch.float64))
    sb, wb, cb = torch.empty_like(sa), torch.empty_like(wa), torch.empty_like(ca)
    sb[perm], wb[perm], cb[perm] = sa / d[perm, None], wa, ca * d[perm, None]
    found_perm, found_d = block_step((sa, wa, ca), (sb, wb, cb), "positive")
    assert torch.equal(found_perm, perm)
    assert torch.allclose(found_d, d, rtol=1e-6)
    found_perm, found_d = block_step((sa, wa, ca), (sb, wb, cb), "none")
    assert torch.equal(found_d, torch.ones(n, dtype=torch.float64))


def test_activation_scales_are_the_norm_ratio():
    """A's unit 0 is B's unit 1 times 3; A's unit 1 is weakly correlated with B's unit 0 and 2× its norm: the
    scale of a matched pair is ‖Y_i‖ / ‖X_π(i)‖ (3 and 2), not the least-squares ρ‖Y_i‖ / ‖X_π(i)‖, which shrinks
    with the correlation."""
    from symstitch.merge.activation import norm_ratio_scales
    from symstitch.stitch_layers import ChannelMatch

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 2, generator=generator, dtype=torch.float64)  # B's units (ReLU-like: non-negative)
    other = torch.rand(1000, generator=generator, dtype=torch.float64)
    weak = 0.2 * x[:, 0] + other
    y = torch.stack([3 * x[:, 1], 2 * weak * x[:, 0].norm() / weak.norm()], dim=1)  # A's units
    match = ChannelMatch(y.T @ x, (x * x).sum(0), (y * y).sum(0))
    perm = match.permutation()
    assert perm.tolist() == [1, 0]
    d = norm_ratio_scales(match, perm)
    assert torch.allclose(d, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert match.scales(perm)[0] < 2.0  # least squares: shrunk by the correlation


def test_scaled_cost_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    alpha, gamma = torch.rand(1, 6, generator=generator, dtype=torch.float64) + 0.1, \
        torch.rand(1, 6, generator=generator, dtype=torch.float64) + 0.1
    beta, delta = torch.randn(6, 6, generator=generator, dtype=torch.float64), \
        torch.randn(6, 6, generator=generator, dtype=torch.float64)
    cost, d = _scaled_cost(alpha, beta, gamma, delta)
    t = torch.linspace(-6, 6, 200001, dtype=torch.float64)[:, None, None]
    e = t.exp()
    brute = (alpha * e * e - 2 * beta * e + gamma / (e * e) - 2 * delta / e).min(0).values
    assert torch.allclose(cost, brute, atol=1e-8)
    assert (d > 0).all()


def test_harden_blocks_keeps_a_block_diagonal_element():
    sites = alignment_sites(models.build("resnet20"))[0]
    stream = [s for s in sites if len(s.blocks) == 3][0]
    g = sample_action(models.build("resnet20"), stream.point, torch.Generator().manual_seed(0))
    assert torch.allclose(harden_blocks(g, stream), g)
    noisy = g + 0.01 * torch.rand(g.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(decompose(harden_blocks(noisy, stream))[0], decompose(g)[0])


def test_barrier_closed_form():
    lams = lambdas(5)
    assert lams == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert barrier(lams, [1.0, 2.0, 4.0, 3.0, 3.0]) == pytest.approx(4.0 - 2.0)  # line at ½: (1 + 3)/2
    assert barrier(lams, [1.0, 1.5, 2.0, 2.5, 3.0]) == pytest.approx(0.0)
    assert barrier(lams, [0.9, 0.5, 0.3, 0.5, 0.7], higher_is_worse=False) == pytest.approx(0.8 - 0.3)
    with pytest.raises(ValueError, match="at least 3"):
        lambdas(2)


def test_interpolation_ends_and_middle():
    a, b = models.build("mcnn", width=0.125), models.build("mcnn", width=0.125)
    assert _weights_close(interpolate(a, b, 0.0), a) == 0 and _weights_close(interpolate(a, b, 1.0), b) < 1e-7
    mid = interpolate(a, b, 0.5)
    for (k, p), q, r in zip(mid.state_dict().items(), a.state_dict().values(), b.state_dict().values()):
        if p.is_floating_point():
            assert torch.allclose(p, (q + r) / 2, atol=1e-6), k
        else:
            assert torch.equal(p, q), k  # BatchNorm's batch counter: A's
    with pytest.raises(ValueError, match="one architecture and width"):
        interpolate(a, models.build("mcnn", width=0.25), 0.5)


def test_reestimated_statistics_are_the_exact_batch_moments():
    """After re-estimation the first BatchNorm's running mean and variance are the mean and (unbiased) variance
    of its input over all the images, whatever the batches."""
    net = models.build("mcnn", width=0.125)
    data = _random_data(9, batches=3, n=20)
    reestimate_batchnorm(net, data)
    x = torch.cat([x for x, _ in data])
    z = net.layer1.conv(x)
    assert torch.allclose(net.layer1.bn.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net.layer1.bn.running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert not net.training and net.layer1.bn.momentum == 0.1


def test_evaluate_loss_and_accuracy():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 0]])
    y = torch.tensor([0, 0, 1])
    loss, acc = evaluate(net, [(x, y)])
    expect = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1)), math.log(1 + math.exp(3))]
    assert loss == pytest.approx(sum(expect) / 3) and acc == pytest.approx(1 / 3)
