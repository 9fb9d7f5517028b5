"""The fused metric kernels against the float64 references of test_metrics: the values of the float32 and the
float64 paths on random inputs, large-mean ReLU features, low-precision inputs and mismatched shapes; the errors
for non-finite inputs; the packed kernels and chunked moments against their plain forms."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from symstitch import metrics as M
from symstitch.metrics import base as MB
from symstitch.models import build

from .conftest import REPO
from .test_metrics import ref_moments, ref_similarity

# the family modules (the package's names ``cka`` and ``procrustes`` are the functions)
MC = importlib.import_module("symstitch.metrics.cka")
MPR = importlib.import_module("symstitch.metrics.procrustes")

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("cka_linear", "cka_relu", "procrustes_relu", "procrustes_orthogonal")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def relu_features(n: int, shape: tuple, seed: int, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=gen(seed)).relu_() + mean


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["plain", "large_mean", "mismatched", "vectors", "tokens"])
def test_fast_equals_the_float64_reference_on_random_inputs(name, case):
    if case == "plain":
        x, y = relu_features(70, (6, 4, 4), 1), relu_features(70, (6, 4, 4), 2)
        y = y + 0.5 * x
    elif case == "large_mean":  # ReLU features far from zero mean: centring must happen before the float32 GEMM
        x = relu_features(70, (6, 4, 4), 3, mean=50.0)
        y = x * torch.rand(1, 6, 1, 1, generator=gen(4)) + 0.3 * relu_features(70, (6, 4, 4), 5, mean=80.0)
    elif case == "mismatched":  # uniform and non-uniform upsampling, channel padding
        x, y = relu_features(70, (3, 2, 2), 6), relu_features(70, (5, 4, 4), 7)
        z = relu_features(70, (4, 3, 5), 8)
        for a, b in ((x, y), (y, x), (x, z), (z, y)):
            assert float(M.similarity(name, a, b)) == pytest.approx(ref_similarity(name, a, b), abs=2e-6)
        return
    elif case == "vectors":
        x, y = torch.randn(40, 7, generator=gen(9)), torch.randn(40, 5, generator=gen(10)) ** 2
    else:
        x, y = torch.randn(40, 9, 6, generator=gen(11)), torch.randn(40, 9, 6, generator=gen(12)).relu()
    x0, y0 = x.clone(), y.clone()
    reference = ref_similarity(name, x, y)
    # the float64 path equals the reference; the float32 path keeps float64 accuracy where docs/method.md §8 asks
    assert float(M.similarity(name, x.double(), y.double())) == pytest.approx(reference, abs=1e-12)
    assert float(M.similarity(name, x, y)) == pytest.approx(reference, abs=2e-6)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the caller's tensors are untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_are_upcast(name, dtype):
    x, y = relu_features(50, (4, 3, 3), 13).to(dtype), relu_features(50, (4, 3, 3), 14, mean=2.0).to(dtype)
    fast = M.similarity(name, x, y)
    assert fast.dtype == torch.float64
    assert float(fast) == pytest.approx(ref_similarity(name, x, y), abs=2e-6)
    assert float(fast) == pytest.approx(float(M.similarity(name, x.float(), y.float())), abs=1e-6)


def error_of(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_inputs_raise_the_same_error(name, bad):
    x, y = relu_features(20, (3, 2, 2), 15), relu_features(20, (3, 4, 4), 16)
    for side in ("x", "y"):
        bx, by = x.clone(), y.clone()
        (bx if side == "x" else by)[3, 1, 0, 1] = bad
        assert error_of(lambda: M.similarity(name, bx, by)) == f"{side} contains NaN or Inf values"
    with pytest.raises(ValueError, match="x contains NaN"):
        M.match_features(torch.full((5, 2), math.nan), torch.ones(5, 2))


def test_finite_check_survives_an_overflowing_sum():
    big = torch.full((4000,), 3e38)  # finite, but its float32 sum is inf: the exact check clears it
    assert not torch.isfinite(big.sum()) and MB._is_finite(big)
    big[17] = math.nan
    assert not MB._is_finite(big)
    MB._check_finite(torch.full((4000,), 3e38), "x")
    with pytest.raises(ValueError, match="y contains NaN"):
        MB._check_finite(big, "y")


@pytest.mark.parametrize("n,block", [(4, 1), (9, 2), (17, 5), (30, 128)])
def test_packed_kernels_round_trip_and_give_hsic1(n, block):
    A, C = torch.randn(n, n, generator=gen(17), dtype=torch.float64), torch.randn(n, n, generator=gen(18))
    K, L = A + A.T, (C + C.T).double()
    gk, gl = MC._Gram.of(K, block), MC._Gram.of(L, 3)  # different layouts are repacked
    zero_diag = K - torch.diag(K.diagonal())
    assert torch.equal(gk.full(), zero_diag)
    assert torch.allclose(gk.rows, zero_diag.sum(1), atol=1e-12)
    hkl, hkk, hll = MC._cka_terms(gk, gl)
    assert float(hkl) == pytest.approx(float(M.hsic1(K, L)), abs=1e-10)
    assert float(hkk) == pytest.approx(float(M.hsic1(K, K)), abs=1e-10)
    assert float(hll) == pytest.approx(float(M.hsic1(L, L)), abs=1e-10)


def test_packed_float32_kernel_sums_in_float64():
    x = relu_features(300, (8, 2, 2), 19, mean=10.0)
    g = MC._gram(x, "linear")
    full = g.full().double()
    assert g.rows.dtype == torch.float64
    assert torch.allclose(g.rows, full.sum(1), rtol=1e-9, atol=1e-9)
    assert float(MC._cka_terms(g, g)[1]) == pytest.approx(float(M.hsic1(full, full)), rel=1e-9)


def test_moments_in_small_chunks_equal_whole(monkeypatch):
    cases = [(relu_features(30, (4, 4, 4), 20), relu_features(30, (6, 2, 2), 21)),  # y upsampled uniformly
             (relu_features(30, (3, 2, 2), 22), relu_features(30, (5, 4, 4), 23)),  # x upsampled uniformly
             (relu_features(30, (3, 3, 5), 24), relu_features(30, (5, 4, 4), 25)),  # not uniform: explicit
             (torch.randn(30, 6, generator=gen(26)), torch.randn(30, 6, generator=gen(27)))]
    whole = [MPR._procrustes_update(x, y) for x, y in cases]
    monkeypatch.setattr(MPR, "_MOMENT_BUDGET", 1)  # one input per chunk
    for (x, y), want in zip(cases, whole):
        got = MPR._procrustes_update(x, y)
        for a, b, c in zip((got.cross, got.sq_x, got.sq_y), (want.cross, want.sq_x, want.sq_y), ref_moments(x, y)):
            assert a.dtype == torch.float64
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12) and torch.allclose(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("budget,width", [(1, 1024), (10 * 7 * 4, 12), (1 << 22, 8), (1 << 22, 1 << 20)])
def test_grouped_cross_products_equal_the_float64_sums(monkeypatch, budget, width):
    """Inputs side by side in groups (chunks of whole groups, a last chunk with a shorter group, one input per
    chunk, all inputs in one group) give Σ_i X_i Y_iᵀ and the squared norms of a plain float64 computation."""
    x, y = relu_features(29, (3, 2, 2), 40), relu_features(29, (4, 2, 2), 41, mean=3.0)
    monkeypatch.setattr(MPR, "_MOMENT_BUDGET", budget)
    monkeypatch.setattr(MPR, "_GROUP_WIDTH", width)
    got = MPR._procrustes_update(x, y)
    x64, y64 = x.double().flatten(2), y.double().flatten(2)
    assert torch.allclose(got.cross, torch.einsum("iap,ibp->ab", x64, y64), rtol=1e-13, atol=0)
    assert torch.allclose(got.sq_x, x64.square().sum((0, 2)), rtol=1e-13, atol=0)
    assert torch.allclose(got.sq_y, y64.square().sum((0, 2)), rtol=1e-13, atol=0)


def test_procrustes_scratch_buffers_are_per_thread():
    """Threads computing Procrustes at once (each reusing its own kept buffer) get the values of serial calls."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(relu_features(300, (8, 4, 4), 50 + k), relu_features(300, (8, 4, 4), 60 + k)) for k in range(4)]
    serial = [float(M.procrustes(x, y, "orthogonal")) for x, y in pairs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(lambda p: float(M.procrustes(*p, "orthogonal")), pairs)) == serial


def test_similarity_matrix_of_float32_networks_equals_float64():
    """All pairs of two float32 networks, both CKA modes, against each pair's float64 features: the functional
    metric (exact) and the minibatch class fed the same two batches."""
    torch.manual_seed(0)
    net, other = build("mcnn", width=0.25).eval(), build("mcnn", width=0.25).eval()
    x = torch.randn(32, 3, 16, 16, generator=gen(28))
    data = DataLoader(TensorDataset(x), batch_size=16)
    points = (["layer1.act", "layer3.act"], ["layer2.act", "layer3.act"])
    fa = {p: f.double() for p, f in copied_features(net, x).items()}
    fb = {p: f.double() for p, f in copied_features(other, x).items()}
    for mode in ("minibatch", "exact"):
        rows = M.similarity_matrix(net, other, data, points=points, cka_mode=mode, progress=False)
        assert len(rows) == 16
        for r in rows:
            name, a, b = r["metric"], r["point_a"], r["point_b"]
            want = (expected(name, fa[a], fb[b], batch=16) if mode == "minibatch"
                    else float(M.similarity(name, fa[a], fb[b])))
            assert r["error"] is None and r["value"] == pytest.approx(want, abs=2e-6), (mode, r, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_equals_cpu(name):
    x, y = relu_features(300, (8, 4, 4), 29, mean=5.0), relu_features(300, (8, 2, 2), 30)
    on_gpu = M.similarity(name, x.cuda(), y.cuda())
    assert on_gpu.device.type == "cuda" or name.startswith("procrustes")
    assert float(on_gpu) == pytest.approx(float(M.similarity(name, x, y)), abs=1e-5)
    assert float(M.similarity(name, x.cuda().half(), y.cuda().half())) == pytest.approx(
        float(M.similarity(name, x.half(), y.half())), abs=1e-5)


class InPlace(torch.nn.Module):
    """Feature points whose outputs the forward pass changes in place after their hooks ran ("a", "b"), and one
    it leaves alone ("c")."""

    feature_points = ("a", "b", "c")

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b, self.c = torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.ReLU()

    def forward(self, x):
        h = self.a(self.conv(x))
        h.mul_(-1.0).add_(3.0)  # not the feature at "a" any more
        g = self.b(h[:, :2])
        g += 1.0  # a view of what "b" recorded
        return self.c(h + g.sum(1, keepdim=True))


def copied_features(net, x):
    out = {}
    hooks = [net.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: out.__setitem__(p, o.detach().clone()))
             for p in net.feature_points]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return out


def expected(name, fa, fb, batch=12):
    """One pair's value from the copied features: the functional Procrustes, or the minibatch CKA class fed the
    batches that similarity_matrix saw."""
    if name.startswith("procrustes"):
        return float(M.similarity(name, fa, fb))
    metric = M.METRICS.build(name, mode="minibatch")
    for s in range(0, len(fa), batch):
        metric.update(fa[s:s + batch], fb[s:s + batch])
    return float(metric.compute())


def test_similarity_matrix_sees_features_before_in_place_changes():
    torch.manual_seed(3)
    net, other = InPlace().double().eval(), InPlace().double().eval()
    x = torch.randn(24, 3, 5, 5, generator=gen(31), dtype=torch.float64)
    fa, fb = copied_features(net, x), copied_features(other, x)
    rows = M.similarity_matrix(net, other, DataLoader(TensorDataset(x), batch_size=12), progress=False)
    assert len(rows) == 4 * 9
    for r in rows:
        name, a, b = r["metric"], r["point_a"], r["point_b"]
        assert r["error"] is None, r
        assert r["value"] == pytest.approx(expected(name, fa[a], fb[b]), abs=1e-12), r


def test_pair_engines_merge_like_one_pass():
    """The engines of similarity_matrix are torchmetrics objects whose states are sums: two of them fed the two
    halves of the batches and merged (what a DDP reduction does) equal one fed every batch."""
    from torchmetrics.utilities.data import dim_zero_sum

    from symstitch.metrics import pairwise as MP

    torch.manual_seed(4)
    nets = [build("mcnn", width=0.25).double().eval() for _ in range(2)]
    points = ["layer1.act", "layer2.act", "layer3.act"]
    x = torch.randn(48, 3, 16, 16, generator=gen(32), dtype=torch.float64)
    batches = [x[s:s + 12] for s in range(0, 48, 12)]

    def engines():
        return {"cka_relu": MP._PairCKA("relu", "max", points, points),
                "procrustes": MP._PairMoments(["relu", "orthogonal"], points, points)}

    def feed(objs, xs):
        with MP.FeatureRecorder(nets[0], nets[1], points, points) as rec:
            for xb in xs:
                MP._update_pairs(objs, {}, rec.run(xb), points, points, 128, False)

    whole, first, second = engines(), engines(), engines()
    feed(whole, batches)
    feed(first, batches[:2])
    feed(second, batches[2:])
    for name in whole:
        assert whole[name]._reductions and all(fx is dim_zero_sum for fx in whole[name]._reductions.values())
        first[name].merge_state(second[name])
        got, want = first[name].compute(), whole[name].compute()
        assert got.keys() == want.keys() and len(want) >= 9
        for key in want:
            assert want[key][1] is None and got[key][0] == pytest.approx(want[key][0], abs=1e-12), key


class WithNaN(torch.nn.Module):
    """A feature point with NaN in one batch only ("bad") beside a clean one ("good")."""

    feature_points = ("good", "bad")

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.good, self.bad = torch.nn.ReLU(), torch.nn.Identity()

    def forward(self, x):
        h = self.good(self.conv(x))
        poisoned = torch.where(x[:, :1, :1, :1] > 2.5, torch.tensor(math.nan, dtype=h.dtype), h[:, :2] + 0.1)
        return self.bad(poisoned)


def test_similarity_matrix_reports_nan_features_per_pair():
    torch.manual_seed(5)
    net, other = WithNaN().double().eval(), WithNaN().double().eval()
    x = torch.randn(24, 3, 4, 4, generator=gen(33), dtype=torch.float64)
    x[15, 0, 0, 0] = 3.0  # the second batch holds a NaN at "bad"
    fa, fb = copied_features(net, x), copied_features(other, x)
    rows = M.similarity_matrix(net, other, DataLoader(TensorDataset(x), batch_size=12), progress=False)
    for r in rows:
        name, a, b = r["metric"], r["point_a"], r["point_b"]
        if "bad" in (a, b):
            assert math.isnan(r["value"]) and "contains NaN or Inf" in r["error"], r
            continue
        assert r["error"] is None, r
        assert r["value"] == pytest.approx(expected(name, fa[a], fb[b]), abs=1e-12), r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_similarity_matrix_on_cuda_equals_cpu():
    torch.manual_seed(6)
    net, other = build("mcnn", width=0.25).eval(), build("mcnn", width=0.25).eval()
    data = DataLoader(TensorDataset(torch.randn(32, 3, 16, 16, generator=gen(34))), batch_size=16)
    points = (["layer1.act", "layer3.act"], ["layer2.act", "layer3.act"])
    on_cpu = M.similarity_matrix(net, other, data, points=points, progress=False)
    on_gpu = M.similarity_matrix(net, other, data, points=points, device="cuda", progress=False)
    for c, g in zip(on_cpu, on_gpu):
        assert (c["metric"], c["point_a"], c["point_b"]) == (g["metric"], g["point_a"], g["point_b"])
        assert g["error"] is None and g["value"] == pytest.approx(c["value"], abs=1e-5), (c, g)


@pytest.mark.slow
def test_metrics_benchmark_runs_its_parts_and_compares_values():
    """The benchmark script end to end at its --quick sizes, the baseline the committed code (HEAD, from git):
    every part prints, values agree with the baseline."""
    import re

    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: no revision to take the baseline from")
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "benchmarks" / "metrics.py"), "--quick",
                          "--threads", "1", "--baseline", "HEAD"], capture_output=True, text=True, check=True).stdout
    for part in ("1. float32 GEMM", "2. per metric", "3. straightforward G_ReLU-CKA", "4. similarity_matrix"):
        assert part in out
    diffs = [float(d) for d in re.findall(r"×\s+(\S+)\s+\d+%", out)]
    assert len(diffs) == 12 and max(diffs) < 1e-6
    assert re.search(r"ratio [\d.]+×; ours < 4 GB .*: met", out)
