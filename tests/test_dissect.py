"""Network dissection against exact ground truth: the quantile against torch's, the tally against a brute-force
loop, a planted concept detector, invariance under the weight action of positive-scaled permutations, rotations,
token points, the digits twin's labels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from symstitch.dissect.api import dissect, grid_of
from symstitch.dissect.concepts import Concept, ConceptBatch, ConceptSource
from symstitch.dissect.quantile import TopQuantile, exact_quantile, kept
from symstitch.dissect.rotation import haar_rotation, rotate, rotation_power
from symstitch.dissect.tally import IoUTally, unit_masks
from symstitch.dissect.twin import TEXTURES, TINTS, DigitsTwin
from symstitch.inputs import Normalization
from symstitch.models import MODELS
from symstitch.symmetry import act, compose, sample_action

PLAIN = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def twin():
    return DigitsTwin("test")


# ----------------------------------------------------------------------------------------------------------
# thresholds


@pytest.mark.parametrize("q", [0.005, 0.05, 0.3])
@pytest.mark.parametrize("batches", [[7], [3, 4], [1, 1, 5]])
def test_top_quantile_is_exact(q, batches):
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(b, 5, 6, 4, generator=g) for b in batches]
    quantile = TopQuantile(5, q, sum(batches) * 24)
    for a in data:
        quantile.update(a)
    t, info = quantile.compute()
    assert info.exact and info.level_error == 0 and quantile.top.shape[1] == kept(sum(batches) * 24, q)
    assert torch.equal(t, exact_quantile(torch.cat(data), q))


def test_top_quantile_beyond_the_budget_is_an_estimate_within_its_stated_error():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(400, 3, 10, 10, generator=g)  # 40 000 values per unit, uniform: the quantile is 1 − q
    q = 0.05
    quantile = TopQuantile(3, q, 40_000, budget=1_500)
    for chunk in a.split(64):
        quantile.update(chunk)
    t, info = quantile.compute()
    assert not info.exact and info.sampled < 40_000 and quantile.top.numel() <= 1_500
    assert "estimated from a uniform sample" in info.describe()
    above = (a.transpose(0, 1).reshape(3, -1) > t.view(-1, 1)).double().mean(dim=1)
    # 95 % bound per unit; twice it leaves the three units no room to fail by chance
    assert (above - q).abs().max() <= 2 * info.level_error


def test_top_quantile_counts_its_values():
    quantile = TopQuantile(2, 0.1, 100)
    quantile.update(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="expected 100 values per unit and saw 25"):
        quantile.compute()


# ----------------------------------------------------------------------------------------------------------
# the tally against brute force


class Random(ConceptSource):
    """Random pixel and image concepts, categories unlabelled in some images, a pixel concept found outside its
    primary category (as Broden's part masks hold object labels)."""

    name = "random"

    def __init__(self, n: int = 9, size: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self._concepts = [Concept(1, "a", "object"), Concept(2, "b", "object"), Concept(3, "c", "part"),
                          Concept(4, "d", "scene"), Concept(5, "e", "scene"), Concept(6, "f", "texture")]
        self.pixel = torch.randint(0, 4, (n, 2, size, size), generator=g)
        self.image = torch.rand(n, 7, generator=g) < 0.5
        self.image[:, :4] = False
        self.labelled = torch.rand(n, 4, generator=g) < 0.7
        self.n, self.size = n, size

    concepts = property(lambda self: self._concepts)
    categories = property(lambda self: ("object", "part", "scene", "texture"))
    image_categories = property(lambda self: ("scene", "texture"))
    mask_size = property(lambda self: (self.size, self.size))

    def __len__(self):
        return self.n

    def get(self, indices):
        i = torch.as_tensor(list(indices))
        return ConceptBatch(torch.zeros(len(i), 3, self.size, self.size), self.pixel[i], self.image[i],
                            self.labelled[i], i)


def brute_force_iou(masks: torch.Tensor, source: Random) -> torch.Tensor:
    """IoU(u, c) by the definition, one (unit, concept) pair and one image at a time."""
    primary = source.primary()
    iou = torch.zeros(masks.shape[1], 7, dtype=torch.float64)
    for u in range(masks.shape[1]):
        for c in range(1, 7):
            inter = union = 0
            for x in range(source.n):
                if not source.labelled[x, primary[c]]:
                    continue
                if source.image_level()[c]:
                    concept = torch.full(masks.shape[-2:], bool(source.image[x, c]))
                else:
                    concept = (source.pixel[x] == c).any(dim=0)
                inter += int((masks[x, u] & concept).sum())
                union += int((masks[x, u] | concept).sum())
            iou[u, c] = inter / union if union else 0.0
    return iou


def test_tally_equals_the_definition():
    source = Random()
    masks = torch.rand(source.n, 4, 6, 6, generator=torch.Generator().manual_seed(3)) < 0.3
    tally = IoUTally(4, source.primary(), source.image_level(), 4)
    for batch in source.batches(batch_size=4):
        tally.update(masks[batch.index], batch)
    assert torch.allclose(tally.compute(), brute_force_iou(masks, source), atol=1e-12)


def test_unit_masks_upsample_then_compare():
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    m = unit_masks(a, torch.tensor([1.5]), (4, 4))
    # bilinear at the pixel centres of the 4×4 grid (half-pixel offsets, edges clamped), worked by hand
    up = torch.tensor([[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]])
    assert torch.equal(m[0, 0], up > 1.5) and m.sum() == 7  # strictly above T


# ----------------------------------------------------------------------------------------------------------
# the digits twin's labels


def test_twin_labels_are_the_drawn_ones(twin):
    batch = twin.get(range(20))
    grey = twin.grey[:20]
    stroke = grey > 0.5
    number = {c.name: c.number for c in twin.concepts}
    objects = number["digit 0 strokes"] + twin.classes[:20].view(-1, 1, 1)
    assert torch.equal(batch.pixel[:, 1], torch.where(stroke, objects, 0))
    assert torch.equal(batch.pixel[:, 2] == number["upper stroke"], stroke & (torch.arange(32).view(-1, 1) < 16))
    for i in range(20):
        tint = list(TINTS)[i % 8]
        assert torch.equal(batch.pixel[i, 0] == number[tint], stroke[i])
        assert torch.allclose(batch.images[i, :, stroke[i]], grey[i, stroke[i]] * torch.tensor(TINTS[tint]).view(3, 1))
        texture = (i // 8) % 4
        present = {twin.concepts[c - 1].name for c in batch.image[i].nonzero().flatten().tolist()}
        assert present == {f"digit {int(twin.classes[i])}"} | ({TEXTURES[texture - 1]} if texture else set())
        drawn = batch.images[i] - grey[i] * torch.tensor(TINTS[tint]).view(3, 1, 1)  # the texture, off the strokes
        assert (drawn.abs().amax() > 0) == bool(texture) and drawn[:, stroke[i]].abs().amax() == 0
    assert twin.primary().tolist()[1:] == [0] * 8 + [1] * 10 + [2] * 2 + [3] * 10 + [4] * 3
    with pytest.raises(ValueError, match="unknown split 'val' of the digits twin; valid: train, test, all"):
        DigitsTwin("val")


# ----------------------------------------------------------------------------------------------------------
# a planted concept detector


class Planted(nn.Module):
    """Two units at point ``act``: a detector of the upper half's strokes (1 there, 0 elsewhere) and the same
    averaged over 2×2 blocks (a half-resolution map of it), then a classifier head."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.head = nn.Linear(2, 10)

    def forward(self, x):
        upper = (torch.arange(x.shape[-2]) < x.shape[-2] // 2).view(-1, 1)
        strokes = ((x.amax(dim=1, keepdim=True) > 0.5) & upper).float()
        blurred = torch.nn.functional.interpolate(nn.functional.avg_pool2d(strokes, 2), size=x.shape[-2:],
                                                  mode="nearest")
        h = self.act(torch.cat([strokes, blurred], dim=1))
        return self.head(h.mean(dim=(2, 3)))


def test_a_planted_detector_scores_iou_one(twin):
    coverage = float((twin.grey[:, :16] > 0.5).double().sum() / twin.grey.numel())
    d = dissect(Planted(), "act", twin, q=coverage, normalization=PLAIN)
    number = {c.name: c.number for c in twin.concepts}
    assert d.iou[0, number["upper stroke"]] == pytest.approx(1.0, abs=1e-12)
    assert d.best()[0][0] == number["upper stroke"] and d.iou[1, number["upper stroke"]] > 0.7
    rows = {r["unit"]: r for r in d.rows()}
    assert rows[0]["label"] == "upper stroke" and rows[0]["category"] == "part" and rows[0]["score"] == pytest.approx(1)
    assert d.summary()["interpretable"] == 2 and d.headline().startswith("2 of 2 units cover")


# ----------------------------------------------------------------------------------------------------------
# invariance under the group, and rotations


@pytest.fixture(scope="module")
def mcnn():
    torch.manual_seed(0)
    return MODELS.build("mcnn", num_classes=10).eval()


def test_dissection_is_invariant_under_positive_scaled_permutations(mcnn, twin):
    point = "layer2.act"
    n = mcnn.point_channels(point)
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(n, generator=g)
    scales = 2.0 ** torch.randint(-3, 4, (n,), generator=g).double()  # powers of two: every product exact
    moved = act(mcnn, point, compose(perm, scales))
    a = dissect(mcnn, point, twin, normalization=PLAIN, limit=120)
    b = dissect(moved, point, twin, normalization=PLAIN, limit=120)
    # unit i of g·A is unit π[i] of A, scaled by d[π[i]]
    assert torch.equal(b.iou, a.iou[perm]) and torch.equal(b.thresholds, a.thresholds[perm] * scales[perm].float())
    assert a.summary()["interpretable"] > 0 and b.summary() == a.summary() and b.record()["labels"] == [a.record()["labels"][int(p)] for p in perm]


def test_dissection_under_sampled_group_elements_keeps_every_label(mcnn, twin):
    point = "layer1.act"
    g = sample_action(mcnn, point, torch.Generator().manual_seed(5))
    perm = g.abs().argmax(dim=1)
    a = dissect(mcnn, point, twin, normalization=PLAIN, limit=120)
    b = dissect(act(mcnn, point, g), point, twin, normalization=PLAIN, limit=120)
    assert torch.equal(b.best()[0], a.best()[0][perm])
    assert torch.allclose(b.iou, a.iou[perm], atol=2e-3)


def test_rotation_alpha_zero_is_the_activation_basis_and_one_is_q(mcnn, twin):
    point = "layer1.act"
    n = mcnn.point_channels(point)
    Q = haar_rotation(n, seed=3)
    assert torch.linalg.det(Q) == pytest.approx(1.0)
    assert torch.allclose(rotation_power(Q, 1.0), Q, atol=1e-10)
    half = rotation_power(Q, 0.5)
    assert torch.allclose(half @ half, Q, atol=1e-10) and torch.allclose(half @ half.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    plain = dissect(mcnn, point, twin, normalization=PLAIN, limit=120)
    zero = dissect(mcnn, point, twin, normalization=PLAIN, limit=120, transform=rotation_power(Q, 0.0))
    assert torch.equal(zero.iou, plain.iou) and torch.equal(zero.thresholds, plain.thresholds)
    one = dissect(mcnn, point, twin, normalization=PLAIN, limit=120, transform=Q)
    assert not torch.equal(one.iou, plain.iou)
    x = torch.randn(2, n, 3, 3, dtype=torch.float64)
    assert torch.allclose(rotate(x, Q), torch.einsum("uv,bvhw->buhw", Q, x))


# ----------------------------------------------------------------------------------------------------------
# points


def test_token_points_on_a_square_grid_and_refusals():
    tokens = torch.arange(2 * 16 * 3).view(2, 16, 3).float()
    grid = grid_of(tokens)
    assert grid.shape == (2, 3, 4, 4) and grid[1, 2, 1, 3] == tokens[1, 7, 2]
    with pytest.raises(ValueError, match="has 15 tokens, not a square grid of patches"):
        grid_of(tokens[:, :15])
    assert grid_of(tokens[:, :15], grid=(3, 5)).shape == (2, 3, 3, 5)
    with pytest.raises(ValueError, match="needs a \\(C, H, W\\) feature map"):
        grid_of(torch.zeros(2, 3))


def test_unknown_point_lists_the_valid_ones(mcnn, twin):
    with pytest.raises(ValueError, match="unknown point 'layer9' of MCNN; valid points: layer1.act, layer2.act"):
        dissect(mcnn, "layer9", twin, normalization=PLAIN)


def test_cct_token_point_is_dissected(twin):
    torch.manual_seed(0)
    cct = MODELS.build("cct", num_classes=10).eval()
    point = cct.split_points[1]
    d = dissect(cct, point, twin, normalization=PLAIN, limit=16)
    side = math.isqrt(cct.point_shape(point)[0])
    assert d.feature_size == (side, side) and d.units == cct.point_channels(point)


def test_the_package_is_the_function(mcnn, twin):
    """``symstitch.dissect(...)`` is ``symstitch.dissect.api.dissect(...)``: the same dissection."""
    import symstitch
    import symstitch.dissect

    by_package = symstitch.dissect(mcnn, "layer1.act", twin, normalization=PLAIN, limit=32)
    assert torch.equal(by_package.iou, dissect(mcnn, "layer1.act", twin, normalization=PLAIN, limit=32).iou)
    assert symstitch.dissect.DigitsTwin is DigitsTwin
