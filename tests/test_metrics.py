"""Similarity metrics (docs/method.md §3, §8): plain float64 references, invariances, streaming, edges, two networks.

The references (``ref_*``) are the one home of the written-out float64 forms of the metrics; the tests of the
fused kernels (test_metrics_fast) compare with them too."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

from symstitch import metrics as M
from symstitch.metrics import base as MB
from symstitch.metrics import pairwise as MP
from symstitch.models import build
from symstitch.symmetry import act, actionable_points, compose, feature, intertwiner_group

# the family modules (the package's names ``cka`` and ``procrustes`` are the functions)
MC = importlib.import_module("symstitch.metrics.cka")
MPR = importlib.import_module("symstitch.metrics.procrustes")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

F64 = torch.float64
NAMES = ("cka_linear", "cka_relu", "procrustes_relu", "procrustes_orthogonal")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


# ------------------------------------------------------------------------------------------------ references


def ref_layout(t: torch.Tensor) -> torch.Tensor:
    """(n, C) → (n, C, 1, 1); tokens (n, L, C) → (n, C, L, 1)."""
    if t.dim() == 2:
        return t[:, :, None, None]
    return t.transpose(1, 2)[..., None] if t.dim() == 3 else t


def ref_match(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit nearest upsampling (output row i reads input row ⌊i·h/H⌋: by whole factors, each row / column
    repeated) and zero channels."""
    x, y = ref_layout(x), ref_layout(y)
    H, W = max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3])
    C = max(x.shape[1], y.shape[1])
    out = []
    for t in (x, y):
        h, w = t.shape[2:]
        t = t[:, :, [i * h // H for i in range(H)]][:, :, :, [j * w // W for j in range(W)]]
        padded = torch.zeros(t.shape[0], C, H, W, dtype=t.dtype)
        padded[:, : t.shape[1]] = t
        out.append(padded)
    return out[0], out[1]


def ref_centre(x: torch.Tensor) -> torch.Tensor:
    """Per-channel centring over (n, h, w), written out channel by channel."""
    x = x.clone()
    for c in range(x.shape[1]):
        x[:, c] -= x[:, c].sum() / x[:, c].numel()
    return x


def ref_unit_channels(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    for c in range(x.shape[1]):
        norm = math.sqrt(float((x[:, c] ** 2).sum()))
        if norm > 0:
            x[:, c] /= norm
    return x


def ref_kernel(x: torch.Tensor, kernel: str, estimator: str = "max") -> torch.Tensor:
    """Loops over (i, j); zero diagonal."""
    n, C = x.shape[:2]
    xc = ref_centre(x)
    if kernel == "relu":
        xc = ref_unit_channels(xc)
    K = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if kernel == "linear":
                K[i, j] = (xc[i] * xc[j]).sum()
            else:
                vals = sorted(float((xc[i, c] * xc[j, c]).sum()) for c in range(C))
                K[i, j] = vals[-1] if estimator == "max" else vals[(C - 1) // 2]  # lower median
    return K


def ref_hsic1(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. (2012), written out."""
    n = K.shape[0]
    one = torch.ones(n, dtype=F64)
    return float(((K * L).sum() + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (K @ one) @ (L @ one)) / (n * (n - 3)))


def ref_hsic1_ustat(K: torch.Tensor, L: torch.Tensor) -> float:
    """The same estimator as a U-statistic over ordered 4-tuples of distinct indices."""
    n, total, count = K.shape[0], 0.0, 0
    for t, u, v, w in itertools.permutations(range(n), 4):
        total += float(K[t, u] * L[t, u] + K[t, u] * L[v, w] - 2 * K[t, u] * L[t, v])
        count += 1
    return total / count


def ref_cka(K: torch.Tensor, L: torch.Tensor) -> float:
    return ref_hsic1(K, L) / math.sqrt(ref_hsic1(K, K) * ref_hsic1(L, L))


def ref_procrustes_relu(x: torch.Tensor, y: torch.Tensor) -> float:
    """min over every permutation P of ‖X̂ − P Ŷ‖² / (4C), by brute force."""
    x, y = ref_match(x, y)
    xh, yh = ref_unit_channels(x), ref_unit_channels(y)
    C = x.shape[1]
    best = min(float(((xh - yh[:, list(p)]) ** 2).sum()) for p in itertools.permutations(range(C)))
    return 1 - math.sqrt(max(0.0, best / (4 * C)))


def ref_procrustes_orthogonal(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖X̂ − Q Ŷ‖ / 2 with the optimal orthogonal Q = U Vᵀ of the SVD of X̂ Ŷᵀ (channels × channels)."""
    x, y = ref_match(x, y)
    xh, yh = x / x.norm(), y / y.norm()
    X, Y = xh.transpose(0, 1).reshape(x.shape[1], -1), yh.transpose(0, 1).reshape(y.shape[1], -1)
    U, _, Vh = torch.linalg.svd(X @ Y.T)
    Q = U @ Vh
    return 1 - float((X - Q @ Y).norm()) / 2, X, Y


def ref_similarity(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """The metric ``name`` (one of NAMES) of x and y by the references above, in float64."""
    x, y = x.double(), y.double()
    if name == "procrustes_relu":
        return ref_procrustes_relu(x, y)
    if name == "procrustes_orthogonal":
        return ref_procrustes_orthogonal(x, y)[0]
    mx, my = ref_match(x, y)
    kernel = "linear" if name == "cka_linear" else "relu"
    return ref_cka(ref_kernel(mx, kernel), ref_kernel(my, kernel))


def ref_moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Procrustes moments on the matched grid, in float64: Σ X_a Y_b (C1×C2), ‖X_a‖² (C1), ‖Y_b‖² (C2)."""
    c1, c2 = ref_layout(x).shape[1], ref_layout(y).shape[1]
    mx, my = ref_match(x.double(), y.double())
    X = mx[:, :c1].transpose(0, 1).reshape(c1, -1)
    Y = my[:, :c2].transpose(0, 1).reshape(c2, -1)
    return X @ Y.T, X.square().sum(1), Y.square().sum(1)


def positive_scaled_permutation(x: torch.Tensor, seed: int, spread: float = 1.0) -> torch.Tensor:
    """y[:, i] = d[π[i]] · x[:, π[i]]."""
    C = x.shape[1]
    perm = torch.randperm(C, generator=gen(seed))
    d = torch.exp(spread * torch.randn(C, generator=gen(seed + 1), dtype=F64))
    y = torch.stack([d[perm[i]] * x[:, perm[i]] for i in range(C)], dim=1)
    g = compose(perm, d)  # the same element as a matrix: g @ v == (d * v)[π]
    assert torch.allclose(torch.einsum("ij,nj...->ni...", g, x), y)
    return y


def haar(C: int, seed: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(C, C, generator=gen(seed), dtype=F64))
    return Q * torch.sign(torch.diagonal(R))


# ------------------------------------------------------------------------------------------------ shapes


def test_match_features_equals_manual_padding_and_upsampling():
    x, y = randn(5, 3, 2, 2, seed=1), randn(5, 6, 4, 4, seed=2)
    x0, y0 = x.clone(), y.clone()
    mx, my = M.match_features(x, y)
    rx, ry = ref_match(x, y)
    assert mx.shape == my.shape == (5, 6, 4, 4)
    assert torch.equal(mx, rx) and torch.equal(my, ry)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the caller's tensors are untouched

    v = randn(5, 4, seed=3)  # (n, C) is (n, C, 1, 1)
    mv, my = M.match_features(v, y)
    assert torch.equal(mv, ref_match(v, y)[0]) and torch.equal(my, ref_match(v, y)[1])

    tokens = randn(5, 7, 3, seed=4)  # (n, L, C): channels last
    mt, _ = M.match_features(tokens, randn(5, 3, 7, 1, seed=5))
    assert torch.equal(mt, tokens.transpose(1, 2)[..., None])

    with pytest.raises(ValueError, match="same inputs"):
        M.match_features(randn(5, 3), randn(6, 3))


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_shapes_equal_explicitly_matched(name):
    x, y = randn(9, 3, 2, 2, seed=6), torch.relu(randn(9, 5, 4, 4, seed=7))
    x0 = x.clone()
    value = M.similarity(name, x, y)
    mx, my = ref_match(x, y)
    assert value.dtype == F64 and value.dim() == 0
    assert float(value) == pytest.approx(float(M.similarity(name, mx, my)), abs=1e-9)
    assert torch.equal(x, x0)


def test_narrow_layer_against_wider_copy_is_capped():
    """H (C1 channels) against [H | C2 − C1 more channels] can not score 1: G_ReLU-Procrustes gives
    1 − sqrt((C2 − C1)/(4 C2)), 0.646 for 32 against 64 (docs/method.md §3)."""
    h = torch.relu(randn(40, 32, 2, 2, seed=8))
    wide = torch.cat([h, torch.relu(randn(40, 32, 2, 2, seed=9))], dim=1)
    capped = float(M.procrustes(h, wide, "relu"))
    assert capped == pytest.approx(1 - math.sqrt(32 / (4 * 64)), abs=1e-9)
    assert capped == pytest.approx(0.646, abs=1e-3)
    for name in NAMES:
        assert float(M.similarity(name, h, wide)) < 0.99, name
    # literal zero channels: after padding both are the same tensor
    zeros = torch.cat([h, torch.zeros_like(h)], dim=1)
    for name in NAMES:
        assert float(M.similarity(name, h, zeros)) == pytest.approx(1.0, abs=1e-7), name


# ------------------------------------------------------------------------------------------------ references


def test_hsic1_matches_formula_and_u_statistic():
    for n, seed in ((6, 10), (7, 11)):
        A, B = randn(n, n, seed=seed), randn(n, n, seed=seed + 100)
        K, L = A + A.T, B + B.T
        K.fill_diagonal_(0)
        L.fill_diagonal_(0)
        value = float(M.hsic1(K, L))
        assert value == pytest.approx(ref_hsic1(K, L), abs=1e-12)
        assert value == pytest.approx(ref_hsic1_ustat(K, L), abs=1e-12)
        K2 = K + torch.diag(randn(n, seed=seed + 200))  # the diagonal is ignored, K untouched
        kept = K2.clone()
        assert float(M.hsic1(K2, L)) == pytest.approx(value, abs=1e-12)
        assert torch.equal(K2, kept)


@pytest.mark.parametrize("kernel,estimator", [("linear", "max"), ("relu", "max"), ("relu", "median")])
def test_cka_matches_plain_reference(kernel, estimator):
    x = torch.relu(randn(9, 4, 3, 3, seed=12))
    y = randn(9, 4, 3, 3, seed=13) + 0.5 * x
    want = ref_cka(ref_kernel(x, kernel, estimator), ref_kernel(y, kernel, estimator))
    got = float(M.cka(x, y, kernel, estimator))
    assert got == pytest.approx(want, abs=1e-9)
    # row blocks of 2 (and the mirrored triangle) give the same kernel
    assert float(M.cka(x, y, kernel, estimator, block_size=2)) == pytest.approx(want, abs=1e-9)


def test_cka_on_vectors_uses_the_centring_matrix():
    x, y = randn(8, 5, seed=14), randn(8, 3, seed=15) ** 2
    n = 8
    H = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    K, L = (H @ x) @ (H @ x).T, (H @ y) @ (H @ y).T
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    assert float(M.cka(x, y)) == pytest.approx(ref_cka(K, L), abs=1e-9)


def test_relu_kernel_in_small_channel_chunks(monkeypatch):
    x, y = randn(10, 6, 2, 2, seed=16), randn(10, 6, 2, 2, seed=17)
    whole = float(M.cka(x, y, "relu"))
    monkeypatch.setattr(MC, "_BUDGET", 7)  # one channel per GEMM
    monkeypatch.setattr(MC, "_MEDIAN_BUDGET", 7)  # one row per block for the median
    assert float(M.cka(x, y, "relu", block_size=3)) == pytest.approx(whole, abs=1e-12)
    assert float(M.cka(x, y, "relu", "median")) == pytest.approx(
        ref_cka(ref_kernel(x, "relu", "median"), ref_kernel(y, "relu", "median")), abs=1e-9)


@pytest.mark.parametrize("tile,budget,block", [(2, 7, 3), (3, 40, 4), (5, 1 << 21, 6), (512, 1 << 21, 256)])
def test_relu_kernel_tiles_give_the_reference_kernel(monkeypatch, tile, budget, block):
    """Row blocks cut into column tiles (ragged last tiles, one or several channels per GEMM, all channels in one):
    every entry of the packed kernel is the written-out max over channels, with and without zero channels."""
    x = torch.relu(randn(13, 5, 2, 3, seed=60))
    monkeypatch.setattr(MC, "_TILE_COLUMNS", tile)
    monkeypatch.setattr(MC, "_BUDGET", budget)
    for pad_to in (5, 7):
        got = MC._relu_gram(MC._centre(x, "relu")[0], "max", pad_to, block).full()
        padded = torch.cat([x, x.new_zeros(13, pad_to - 5, 2, 3)], 1)
        assert torch.allclose(got, ref_kernel(padded, "relu"), atol=1e-12, rtol=0)


def test_padded_relu_kernel_matches_reference():
    """Zero channels are candidates of value 0 in the max and in the median."""
    x, y = randn(8, 4, 2, 2, seed=18), randn(8, 5, 2, 2, seed=19)
    mx, my = ref_match(x, y)
    for est in ("max", "median"):
        want = ref_cka(ref_kernel(mx, "relu", est), ref_kernel(my, "relu", est))
        assert float(M.cka(x, y, "relu", est)) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("shapes", [((6, 3, 2, 2), (6, 3, 2, 2)), ((6, 2, 2, 2), (6, 4, 1, 1)), ((7, 5), (7, 3))])
def test_procrustes_matches_brute_force(shapes):
    x, y = randn(*shapes[0], seed=20), torch.relu(randn(*shapes[1], seed=21))
    if x.shape[1] > 2:
        x[:, 1] = 0  # a zero channel stays zero
    assert float(M.procrustes(x, y, "relu")) == pytest.approx(ref_procrustes_relu(x, y), abs=1e-9)
    want, X, Y = ref_procrustes_orthogonal(x, y)
    assert float(M.procrustes(x, y, "orthogonal")) == pytest.approx(want, abs=1e-9)
    for seed in range(5):  # no other orthogonal Q does better
        Q = haar(X.shape[0], seed)
        assert 1 - float((X - Q @ Y).norm()) / 2 <= want + 1e-12


# ------------------------------------------------------------------------------------------------ invariances


def test_relu_metrics_invariant_to_positive_scaled_permutations():
    x = torch.relu(randn(30, 6, 3, 3, seed=22))
    y = positive_scaled_permutation(x, seed=23, spread=2.0)
    assert float(M.procrustes(x, y, "relu")) == pytest.approx(1.0, abs=1e-6)
    assert float(M.cka(x, y, "relu")) == pytest.approx(1.0, abs=1e-6)
    assert float(M.cka(x, y, "relu", "median")) == pytest.approx(1.0, abs=1e-6)
    # … which linear CKA and orthogonal Procrustes are not (a wide range of scales)
    assert float(M.cka(x, y, "linear")) < 0.99
    assert float(M.procrustes(x, y, "orthogonal")) < 0.99


def test_orthogonal_metrics_invariant_to_orthogonal_mixing():
    x = randn(30, 6, 3, 3, seed=24)
    y = torch.einsum("ij,njhw->nihw", haar(6, 25), x)
    assert float(M.cka(x, y, "linear")) == pytest.approx(1.0, abs=1e-6)
    assert float(M.procrustes(x, y, "orthogonal")) == pytest.approx(1.0, abs=1e-6)
    assert float(M.procrustes(x, y, "relu")) < 0.99


def test_unrelated_features_are_not_similar():
    x, y = randn(64, 8, 2, 2, seed=26), randn(64, 8, 2, 2, seed=27)
    for name in NAMES:
        assert float(M.similarity(name, x, y)) < 0.9, name


# ------------------------------------------------------------------------------------------------ streaming


def batches(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


@pytest.mark.parametrize("group", ["relu", "orthogonal"])
def test_streaming_procrustes_equals_functional(group):
    x, y = randn(30, 4, 4, 4, seed=28), torch.relu(randn(30, 6, 2, 2, seed=29))
    metric = M.Procrustes(group)
    for bx, by in batches(x, y, (7, 13, 10)):
        metric.update(bx, by)
    assert metric.cross.dtype == F64 and metric.sq_x.dtype == F64
    assert float(metric.compute()) == pytest.approx(float(M.procrustes(x, y, group)), abs=1e-9)


@pytest.mark.parametrize("kernel,estimator", [("linear", "max"), ("relu", "max"), ("relu", "median")])
def test_exact_streaming_cka_equals_functional(kernel, estimator):
    x, y = randn(20, 3, 2, 2, seed=30), torch.relu(randn(20, 5, 4, 4, seed=31))
    metric = M.CKA(kernel, estimator, mode="exact")
    for bx, by in batches(x, y, (5, 9, 6)):
        metric.update(bx, by)
    assert float(metric.compute()) == pytest.approx(float(M.cka(x, y, kernel, estimator)), abs=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "relu"])
def test_minibatch_cka_is_ratio_of_mean_hsic(kernel):
    x, y = randn(24, 3, 2, 2, seed=32), randn(24, 3, 2, 2, seed=33) + 0.3 * randn(24, 3, 2, 2, seed=32)
    metric = M.CKA(kernel, mode="minibatch")
    hxy, hxx, hyy = [], [], []
    for bx, by in batches(x, y, (8, 6, 10)):
        metric.update(bx, by)
        K, L = ref_kernel(bx, kernel), ref_kernel(by, kernel)
        hxy.append(ref_hsic1(K, L))
        hxx.append(ref_hsic1(K, K))
        hyy.append(ref_hsic1(L, L))
    assert metric.hsic_xy.dtype == F64 and int(metric.batches) == 3
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    want = mean(hxy) / math.sqrt(mean(hxx) * mean(hyy))
    assert float(metric.compute()) == pytest.approx(want, abs=1e-9)


def test_states_reduce_under_ddp_and_merge():
    assert all(M.Procrustes()._reductions[s] is dim_zero_sum for s in ("cross", "sq_x", "sq_y"))
    exact = M.CKA(mode="exact")
    assert exact._reductions["xs"] is dim_zero_cat and exact._reductions["ys"] is dim_zero_cat
    mini = M.CKA(mode="minibatch")
    assert all(mini._reductions[s] is dim_zero_sum for s in ("hsic_xy", "hsic_xx", "hsic_yy", "batches"))

    x, y = randn(24, 4, 2, 2, seed=34), torch.relu(randn(24, 5, 2, 2, seed=35))
    parts = batches(x, y, (6, 6, 6, 6))
    for make in (lambda: M.Procrustes("relu"), lambda: M.CKA("relu", mode="exact"),
                 lambda: M.CKA("linear", mode="minibatch")):
        one, first, second = make(), make(), make()
        for bx, by in parts:
            one.update(bx, by)
        for bx, by in parts[:2]:
            first.update(bx, by)
        for bx, by in parts[2:]:
            second.update(bx, by)
        first.merge_state(second)
        assert float(first.compute()) == pytest.approx(float(one.compute()), abs=1e-9)


def test_registry_builds_the_four_metrics():
    assert M.METRICS.available() == sorted(NAMES)
    assert isinstance(M.METRICS.build("procrustes_orthogonal"), M.Procrustes)
    relu = M.METRICS.build("cka_relu", mode="minibatch", estimator="median")
    assert (relu.kernel, relu.estimator, relu.mode) == ("relu", "median", "minibatch")
    with pytest.raises(KeyError, match="available"):
        M.similarity("cka_rbf", randn(5, 2), randn(5, 2))


# ------------------------------------------------------------------------------------------------ edges


def test_too_few_inputs_raise():
    with pytest.raises(ValueError, match="at least 4"):
        M.cka(randn(3, 4), randn(3, 4))
    with pytest.raises(ValueError, match="at least 4"):
        M.hsic1(torch.zeros(3, 3), torch.zeros(3, 3))
    metric = M.CKA(mode="minibatch")
    with pytest.raises(ValueError, match="at least 4"):
        metric.update(randn(3, 4), randn(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kernel", ["linear", "relu"])
def test_degenerate_features_raise_for_cka(kernel, dtype):
    y = randn(10, 3, 2, 2, seed=36).to(dtype)
    zero = torch.zeros(10, 3, 2, 2, dtype=dtype)
    constant = torch.full((10, 3, 2, 2), 3.7, dtype=dtype)
    per_channel = torch.tensor([0.1, -2.3, 7.0], dtype=dtype)[None, :, None, None].expand(10, 3, 2, 2)
    for bad in (zero, constant, per_channel):
        with pytest.raises(ValueError, match="features of x are (all zero|the same for every input)"):
            M.cka(bad, y, kernel)
        with pytest.raises(ValueError, match="features of y are (all zero|the same for every input)"):
            M.cka(y, bad, kernel)


def test_degenerate_and_invalid_inputs_raise_for_procrustes():
    y = randn(10, 3, seed=37)
    for group in ("relu", "orthogonal"):
        with pytest.raises(ValueError, match="features of x are all zero"):
            M.procrustes(torch.zeros(10, 3), y, group)
    bad = y.clone()
    bad[2, 1] = math.nan
    for name in NAMES:
        with pytest.raises(ValueError, match="NaN"):
            M.similarity(name, bad, y)
    with pytest.raises(ValueError, match="unknown Procrustes group"):
        M.procrustes(y, y, "permutation")


def test_no_nan_anywhere():
    cases = [(randn(4, 1), randn(4, 1, seed=1)), (randn(5, 2, 1, 1), torch.relu(randn(5, 3, 3, 3, seed=2))),
             (randn(6, 1, 2, 2), randn(6, 1, 2, 2)), (torch.relu(randn(8, 4, seed=3)), randn(8, 4, seed=4))]
    for x, y in cases:
        for name in NAMES:
            try:
                value = float(M.similarity(name, x, y))
            except ValueError:
                continue
            assert math.isfinite(value), (name, x.shape, y.shape)
    # a constant minibatch among others is a zero term of the means, not an error
    metric = M.CKA(mode="minibatch")
    metric.update(torch.ones(6, 3), randn(6, 3))
    metric.update(randn(6, 3, seed=5), randn(6, 3, seed=6))
    assert math.isfinite(float(metric.compute()))


# ------------------------------------------------------------------------------------------------ networks


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    net = build("mcnn", width=0.25)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # random statistics: eval mode is not the identity
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    net.eval()
    point = actionable_points(net)[1]
    channels = net.feature_shapes((1, 3, 16, 16))[point][0]
    g = intertwiner_group("relu", scale_spread=1.0).sample(channels, generator=gen(40))
    return net, act(net, point, g), point


def loader(n=48, batch_size=16, labels=True):
    x = torch.randn(n, 3, 16, 16, generator=gen(41))
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long)) if labels else TensorDataset(x)
    return DataLoader(data, batch_size=batch_size)


def table(rows):
    return {(r["metric"], r["point_a"], r["point_b"]): r for r in rows}


def test_network_against_its_transformed_copy(nets):
    net, moved, point = nets
    net.train()
    rows = table(M.similarity_matrix(net, moved, loader(), cka_mode="minibatch", progress=True))
    assert net.training and not moved.training  # modes restored
    net.eval()
    points = net.feature_points
    assert len(rows) == 4 * len(points) ** 2
    assert all(r["error"] is None and math.isfinite(r["value"]) for r in rows.values())
    for p in points:
        for name in ("cka_relu", "procrustes_relu"):
            assert rows[(name, p, p)]["value"] == pytest.approx(1.0, abs=1e-5), (name, p)
        if p != point:  # the same features
            for name in ("cka_linear", "procrustes_orthogonal"):
                assert rows[(name, p, p)]["value"] == pytest.approx(1.0, abs=1e-5), (name, p)
    assert rows[("cka_linear", point, point)]["value"] < 0.999
    assert rows[("procrustes_orthogonal", point, point)]["value"] < 0.999


def test_similarity_matrix_equals_functional_on_all_data(nets):
    net, moved, _ = nets
    data = loader(labels=False)
    x = data.dataset.tensors[0]
    pa, pb = ["layer1.act", "layer3.act"], ["layer2.act", "layer4.act", "layer1.act"]
    exact = table(M.similarity_matrix(net, moved, data, points=(pa, pb), cka_mode="exact", progress=False))
    mini = table(M.similarity_matrix(net, moved, data, points=(pa, pb), metrics=("cka_relu", "cka_linear"),
                                     progress=False))
    for a in pa:
        fa = feature(net, a, x).double()
        for b in pb:
            fb = feature(moved, b, x).double()
            for name in NAMES:
                want = float(M.similarity(name, fa, fb))
                assert exact[(name, a, b)]["value"] == pytest.approx(want, abs=1e-5), (name, a, b)
            for name in ("cka_relu", "cka_linear"):
                metric = M.METRICS.build(name, mode="minibatch")
                for start in range(0, len(x), 16):
                    metric.update(fa[start:start + 16], fb[start:start + 16])
                assert mini[(name, a, b)]["value"] == pytest.approx(float(metric.compute()), abs=1e-5)


def test_dead_features_give_nan_with_a_reason(nets):
    net, _, _ = nets
    dead = build("mcnn", width=0.25).eval()
    dead.load_state_dict(net.state_dict())
    with torch.no_grad():
        dead.layer2.bn.weight.zero_()
        dead.layer2.bn.bias.zero_()  # layer2.act is all zero
    rows = M.similarity_matrix(net, dead, loader(), points=["layer1.act", "layer2.act"], progress=False)
    for r in rows:
        if r["point_b"] == "layer2.act":
            assert math.isnan(r["value"]) and "all zero" in r["error"], r
        else:
            assert math.isfinite(r["value"]) and r["error"] is None, r


def test_similarity_matrix_checks_its_arguments(nets):
    net, moved, _ = nets
    with pytest.raises(ValueError, match="valid feature points: layer1.act"):
        M.similarity_matrix(net, moved, loader(), points=["layer9.act"], progress=False)
    with pytest.raises(KeyError, match="available"):
        M.similarity_matrix(net, moved, loader(), metrics=("cka_rbf",), progress=False)
    with pytest.raises(ValueError, match="drop_last"):
        M.similarity_matrix(net, moved, loader(n=18), progress=False)
    rows = M.similarity_matrix(net, net, loader(n=18, batch_size=9), points=["layer4.act"], progress=False)
    assert all(r["value"] == pytest.approx(1.0, abs=1e-6) for r in rows)
    one = table(M.similarity_matrix(net, net, loader(n=18, batch_size=9), points=(["layer1.act"], ["layer4.act"]),
                                    cka_mode="exact", progress=False))
    x = loader(n=18).dataset.tensors[0]
    f1, f4 = feature(net, "layer1.act", x).double(), feature(net, "layer4.act", x).double()
    for name in NAMES:
        assert one[(name, "layer1.act", "layer4.act")]["value"] == pytest.approx(
            float(M.similarity(name, f1, f4)), abs=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        M.similarity_matrix(net, moved, [], progress=False)


class Odd(torch.nn.Module):
    """Feature points on grids that nearest upsampling maps unevenly (6×6, 4×4, 3×5) and a (n, C) one."""

    feature_points = ("a6", "a4", "a35", "vec")

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.a6, self.a4, self.a35, self.vec = (torch.nn.ReLU() for _ in range(4))
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        h = self.a6(self.conv(x))
        self.a4(torch.nn.functional.adaptive_avg_pool2d(h[:, :3], (4, 4)))
        self.a35(torch.nn.functional.adaptive_max_pool2d(h, (3, 5)) - 0.2)
        return self.vec(self.fc(h.mean((2, 3))))


def test_similarity_matrix_on_uneven_grids_equals_functional():
    torch.manual_seed(1)
    net = Odd().double()
    other = Odd().double()
    x = torch.randn(24, 3, 6, 6, generator=gen(42), dtype=F64)
    data = DataLoader(TensorDataset(x), batch_size=8)
    exact = table(M.similarity_matrix(net, other, data, cka_mode="exact", progress=False))
    mini = table(M.similarity_matrix(net, other, data, progress=False))
    for a in Odd.feature_points:
        fa = feature(net, a, x)
        for b in Odd.feature_points:
            fb = feature(other, b, x)
            for name in NAMES:
                want = float(M.similarity(name, fa, fb))
                assert exact[(name, a, b)]["value"] == pytest.approx(want, abs=1e-9), (name, a, b)
                if name.startswith("procrustes"):
                    assert mini[(name, a, b)]["value"] == pytest.approx(want, abs=1e-9), (name, a, b)
                else:
                    metric = M.METRICS.build(name, mode="minibatch")
                    for start in range(0, len(x), 8):
                        metric.update(fa[start:start + 8], fb[start:start + 8])
                    assert mini[(name, a, b)]["value"] == pytest.approx(float(metric.compute()), abs=1e-9)


def test_batched_moments_in_small_chunks_equal_pairwise():
    torch.manual_seed(2)
    net = Odd().double()
    x = torch.randn(10, 3, 6, 6, generator=gen(43), dtype=F64)
    feats = {p: MB._to_4d(feature(net, p, x)) for p in Odd.feature_points}
    points = list(Odd.feature_points)
    batched = MP._all_moments(feats, feats, points, points, budget=1)  # one input per chunk
    for a in points:
        for b in points:
            want = MPR._procrustes_update(feats[a], feats[b])
            for got, ref in zip((batched[(a, b)].cross, batched[(a, b)].sq_x, batched[(a, b)].sq_y),
                                (want.cross, want.sq_x, want.sq_y)):
                assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), (a, b)


# ----------------------------------------------------------------------------------------------------------
# The edges: one rule for every metric and every path


class Features(torch.nn.Module):
    """A "network" whose one feature point gives its (nonnegative) input back: similarity_matrix over features
    chosen by the test."""

    feature_points = ("act",)

    def __init__(self):
        super().__init__()
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(x)


def _every_path(name: str, x: torch.Tensor, y: torch.Tensor) -> list:
    """The metric ``name`` of x and y by the functional metric, the streaming class (two batches; CKA exact, and by
    minibatches where each half has 4 inputs or more) and similarity_matrix (two batches): a float, or the
    ValueError's message."""
    def attempt(f):
        try:
            return float(f())
        except ValueError as err:
            return str(err)

    half = x.shape[0] // 2
    batches = [(x[:half], y[:half]), (x[half:], y[half:])] if half else [(x, y)]

    def streamed(**kw):
        metric = M.METRICS.build(name, **kw)
        for bx, by in batches:
            metric.update(bx, by)
        return metric.compute()

    out = [attempt(lambda: M.similarity(name, x, y)), attempt(lambda: streamed())]
    if name.startswith("cka") and half >= 4:
        out.append(attempt(lambda: streamed(mode="minibatch")))
    if torch.equal(x, y):  # one network, one point: the pair (act, act)
        try:
            (row,) = M.similarity_matrix(Features(), Features(), [bx.float() for bx, _ in batches], metrics=[name],
                                         points=["act"], progress=False)
            out.append(row["error"] if row["error"] is not None else row["value"])
        except ValueError as err:  # batches too small for minibatch CKA: the whole call is refused
            out.append(str(err))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_undefined_input_is_the_same_error_on_every_path(name):
    """Fewer than 4 inputs, features the same for every input (constant, all zero; against varying or constant
    features): a ValueError on the functional and streaming paths, a NaN with the reason in similarity_matrix —
    never a number."""
    x = torch.relu(randn(64, 16, seed=40))
    constant, other = torch.full((64, 16), 3.0), torch.full((64, 16), 4.0)
    cases = {"at least 4 inputs": [(x[:n], x[:n]) for n in (1, 2, 3)],
             "the same for every input": [(constant, x), (x, constant), (constant, other), (constant, constant)],
             "all zero": [(torch.zeros(64, 16), x), (torch.zeros(64, 16), torch.zeros(64, 16))]}
    for says, pairs in cases.items():
        for a, b in pairs:
            for result in _every_path(name, a, b):
                assert isinstance(result, str) and says in result, (name, says, result)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_value_does_not_depend_on_the_scale_or_the_dtype(name, dtype):
    """Every metric is scale-invariant, so the value is that of the float64 features at every scale the dtype
    holds (float32: 1e-30 … 1e30; half precision: within its range), on every path; half-precision input is
    computed in float32 (its own rounding of the input aside); inputs that require grad are read, not
    differentiated."""
    x, y = torch.relu(randn(64, 16, seed=41)), torch.relu(randn(64, 16, seed=42))
    scales = [1e-30, 1e-22, 1e-10, 1.0, 1e10, 1e19, 1e30] if dtype == torch.float32 else [1e-3, 1.0, 1e3]
    for scale in scales:
        xs = (x * scale).to(dtype)
        references = _every_path(name, xs.double() / scale, y.double())  # the dtype's own rounding of x aside
        for result, reference in zip(_every_path(name, xs, y), references, strict=True):
            assert result == pytest.approx(reference, abs=2e-6), (name, scale, result, reference)
        for result in _every_path(name, xs, xs):
            assert result == pytest.approx(1.0, abs=2e-6), (name, scale, result)
    grad = x.clone().requires_grad_(True)
    value = M.similarity(name, grad, y)
    assert not value.requires_grad and value.item() == pytest.approx(float(M.similarity(name, x, y)))


def test_similarity_matrix_takes_a_datamodule(nets):
    """A DataModule stands for its test loader (the paper's setting)."""
    from symstitch.data import DataModule

    net, _, _ = nets
    dm = DataModule(dataset="digits", eval_batch_size=120)
    rows = M.similarity_matrix(net, net, dm, points=["layer4.act"], metrics=["cka_linear"], progress=False)
    again = M.similarity_matrix(net, net, dm.test_dataloader(), points=["layer4.act"], metrics=["cka_linear"],
                                progress=False)
    assert rows == again and rows[0]["value"] == pytest.approx(1.0, abs=1e-6)
