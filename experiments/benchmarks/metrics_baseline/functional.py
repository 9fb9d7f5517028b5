"""Similarity metrics between representations (docs/method.md §3, paper §5), functional and streaming.

Features X ∈ R^{n×C1×h×w} and Y ∈ R^{n×C2×h'×w'} are taken at two feature points for the *same* n inputs.
Accepted layouts: ``(n, C)`` (read as ``(n, C, 1, 1)``), token tensors ``(n, L, C)`` (channels last, read as
``(n, C, L, 1)``) and ``(n, C, H, W)``.

Shape matching (:func:`match_features`). If the spatial sizes differ, the smaller is upsampled by nearest
neighbour to the larger (``F.interpolate(mode="nearest")``); if the channel counts differ, the smaller is
zero-padded to C = max(C1, C2) channels. Channel norms and means are over (n, h, w).

G_ReLU-Procrustes (invariant to positive-scaled permutations P·D of the channels)::

    X̂_a = X_a / ‖X_a‖            (a zero channel stays zero)
    M_ab = ⟨X̂_a, Ŷ_b⟩             π = Hungarian(M, maximize)
    d    = sqrt( max(0, ‖X̂‖² + ‖Ŷ‖² − 2 Σ_a M_{a,π(a)}) / (4C) )          similarity = 1 − d

Orthogonal Procrustes (invariant to orthogonal mixing of the channels)::

    X̂ = X / ‖X‖_F,   M = Σ_{n,h,w} X̂ Ŷᵀ  (C1×C2),
    d = sqrt( max(0, ‖X̂‖² + ‖Ŷ‖² − 2‖M‖_*) ) / 2                           similarity = 1 − d

CKA (linear) and G_ReLU-CKA. Centre each channel (mean over n, h, w); then a sample kernel with zero diagonal::

    linear:  K_ij = Σ_{c,h,w} X_icHW X_jcHW              (no per-channel normalisation)
    G_ReLU:  X_c ← X_c / ‖X_c‖,  K_ij = max_c Σ_{h,w} X_icHW X_jcHW     (estimator="median": median over c)

    HSIC1(K, L) = [ Σ K∘L + (1ᵀK1)(1ᵀL1)/((n−1)(n−2)) − (2/(n−2)) (K1)ᵀ(L1) ] / (n(n−3))   (Song et al. 2012)
    CKA = HSIC1(K, L) / sqrt( HSIC1(K, K) · HSIC1(L, L) )

Exact mode uses all n inputs at once; minibatch mode (Nguyen, Raghu & Kornblith 2021) centres and builds the
kernels within each minibatch and reports mean HSIC1(K, L) / sqrt(mean HSIC1(K, K) · mean HSIC1(L, L)).

Numerics (docs/method.md §7). Means, norms, cross-products of Procrustes and every HSIC sum are accumulated in float64;
the kernel GEMMs run in float32 for float32 features (they are the cost) and in float64 for float64 features.
The argument of every square root is clamped at 0. The caller's tensors are never modified.

Defined behaviour at the edges (never a silent NaN):

* CKA needs n ≥ 4 inputs (HSIC1 divides by n(n−3)); fewer raise ValueError, also for a minibatch.
* CKA of features that are constant (or all zero) across the inputs is undefined (HSIC1(K, K) = 0): ValueError
  naming the degenerate input. A channel whose centred norm is below 1e-8 of its norm counts as constant and
  is set exactly to zero (otherwise G_ReLU-CKA would blow rounding noise up to a unit-norm channel).
* Procrustes of an all-zero input is undefined (nothing to normalise): ValueError. NaN/Inf inputs: ValueError.
* The max-over-channels kernel is not positive semi-definite, so G_ReLU-CKA can in principle leave [0, 1]
  (and HSIC1(K, K) can even be negative, which raises). Values are reported as computed, never clipped.
* Zero-padding caps the score of a narrower layer: X with C1 channels against Y = [X | C2 − C1 other
  channels] is not 1; G_ReLU-Procrustes gives exactly 1 − sqrt((C2 − C1) / (4 C2)), e.g. 0.646 for 32 against
  64 channels. Compare layers of equal width when "1 = same up to symmetry" is the question.
* ``estimator="median"`` uses ``torch.median``, the lower median when the channel count is even. Zero-padded
  channels enter the median as zeros; when they are at least half of all channels the kernel vanishes and CKA
  raises.

API: :func:`procrustes`, :func:`cka`, :func:`hsic1`, :func:`match_features`, :func:`similarity` (by name) and
:data:`FUNCTIONS`, the functional twins of the four metrics of the paper. The streaming torchmetrics classes
are in :mod:`metrics_baseline.streaming`, the all-pairs engine in :mod:`metrics_baseline.pairwise`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from symstitch.registry import Registry

Tensor = torch.Tensor

GROUPS = ("relu", "orthogonal")
KERNELS = ("linear", "relu")
ESTIMATORS = ("max", "median")
MODES = ("exact", "minibatch")

#: a channel whose centred norm is at most this fraction of its norm is constant (set exactly to zero)
CONSTANT_TOL = 1e-8
#: elements of one temporary (channels × rows × columns) of the G_ReLU kernel: cache-sized for the running max,
#: larger for the median (which needs every channel of an entry at once)
_BUDGET = 1 << 20
_MEDIAN_BUDGET = 1 << 22


# ----------------------------------------------------------------------------------------------------------
# Shapes


def _to_4d(t: Tensor, name: str = "features") -> Tensor:
    """(n, C) → (n, C, 1, 1); tokens (n, L, C) → (n, C, L, 1); (n, C, H, W) unchanged (views, no copy)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2:
        t = t[:, :, None, None]
    elif t.dim() == 3:
        t = t.transpose(1, 2)[..., None]
    elif t.dim() != 4:
        raise ValueError(f"{name}: expected (n, C), (n, L, C) or (n, C, H, W) features; got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_same_n(x: Tensor, y: Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold features of the same inputs: got n = {x.shape[0]} and n = {y.shape[0]}")


def _target_hw(x: Tensor, y: Tensor) -> tuple[int, int]:
    return max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3])


def _upsample(t: Tensor, hw: tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of (n, C, H, W) to ``hw`` (a new tensor; ``t`` itself if already there)."""
    if tuple(t.shape[2:]) == tuple(hw):
        return t
    return F.interpolate(t, size=hw, mode="nearest")


def _match_spatial(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Both as (n, C, H, W) on the larger spatial grid; checks n and finiteness."""
    x, y = _to_4d(x, "x"), _to_4d(y, "y")
    _check_same_n(x, y)
    _check_finite(x, "x")
    _check_finite(y, "y")
    dtype = torch.promote_types(x.dtype, y.dtype)
    hw = _target_hw(x, y)
    return _upsample(x.to(dtype), hw), _upsample(y.to(dtype), hw)


def match_features(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The pair on common ground: both ``(n, C, H, W)`` with H, W the larger spatial size (nearest-neighbour
    upsampling of the smaller) and C = max(C1, C2) (zero channels appended to the narrower).

    Different n raise ValueError. The inputs are never modified (new tensors, or views of unchanged ones).
    """
    x, y = _match_spatial(x, y)
    c = max(x.shape[1], y.shape[1])
    return _pad_channels(x, c), _pad_channels(y, c)


def _pad_channels(t: Tensor, c: int) -> Tensor:
    if t.shape[1] == c:
        return t
    zeros = t.new_zeros(t.shape[0], c - t.shape[1], *t.shape[2:])
    return torch.cat([t, zeros], dim=1)


@functools.lru_cache(maxsize=None)
def _nearest_factor(src: int, dst: int) -> Optional[int]:
    """f when nearest upsampling src → dst (as torch computes it) repeats every source index in a block of
    exactly f outputs, else None. Such an upsampling only reweights every position by f."""
    if dst < src or dst % src:
        return None
    f = dst // src
    idx = F.interpolate(torch.arange(src, dtype=torch.float32).view(1, 1, src), size=dst, mode="nearest")
    return f if torch.equal(idx.view(-1).long(), torch.arange(dst) // f) else None


def _uniform_upsampling(hw: Sequence[int], target: Sequence[int]) -> bool:
    return all(_nearest_factor(int(s), int(t)) is not None for s, t in zip(hw, target))


# ----------------------------------------------------------------------------------------------------------
# Procrustes


@dataclass
class _Moments:
    """Sufficient statistics of Procrustes over (n, h, w) on the matched grid, all float64:
    ``cross`` = Σ X_a Y_b (C1×C2), ``sq_x`` = ‖X_a‖² (C1), ``sq_y`` = ‖Y_b‖² (C2)."""

    cross: Tensor
    sq_x: Tensor
    sq_y: Tensor


def _flat(t: Tensor) -> Tensor:
    """(n, C, H, W) → (C, n·H·W) in float64."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).to(torch.float64)


def _moments(x: Tensor, y: Tensor) -> _Moments:
    x, y = _match_spatial(x, y)
    fx, fy = _flat(x), _flat(y)
    return _Moments(fx @ fy.T, fx.square().sum(1), fy.square().sum(1))


def _procrustes_value(m: _Moments, group: str) -> Tensor:
    """Similarity 1 − d from the moments (channel padding to C = max(C1, C2) is implicit: padded channels are
    zero, so they add nothing to ‖X̂‖², ‖Ŷ‖², ‖M‖_* or any matching)."""
    cross, sq_x, sq_y = m.cross, m.sq_x, m.sq_y
    for sq, name in ((sq_x, "x"), (sq_y, "y")):
        if not bool((sq > 0).any()):
            raise ValueError(f"Procrustes is undefined: {name} is all zero (no channel to normalise)")
    if group == "relu":
        # M_ab = ⟨X̂_a, Ŷ_b⟩ = Σ X_a Y_b / (‖X_a‖ ‖Y_b‖); zero channels stay zero
        inv_x = torch.where(sq_x > 0, sq_x.rsqrt(), torch.zeros_like(sq_x))
        inv_y = torch.where(sq_y > 0, sq_y.rsqrt(), torch.zeros_like(sq_y))
        M = cross * inv_x[:, None] * inv_y[None, :]
        rows, cols = linear_sum_assignment(M.detach().cpu().numpy(), maximize=True)
        matched = M[torch.as_tensor(rows, device=M.device), torch.as_tensor(cols, device=M.device)].sum()
        norm_x2 = (sq_x > 0).sum().to(torch.float64)  # ‖X̂‖² = number of nonzero channels
        norm_y2 = (sq_y > 0).sum().to(torch.float64)
        c = max(cross.shape)
        d2 = (norm_x2 + norm_y2 - 2 * matched) / (4 * c)
        d = d2.clamp(min=0).sqrt()
    else:
        # X̂ = X/‖X‖_F, Ŷ = Y/‖Y‖_F: ‖X̂‖² = ‖Ŷ‖² = 1, M = Σ X Yᵀ / (‖X‖_F ‖Y‖_F)
        M = cross / (sq_x.sum().sqrt() * sq_y.sum().sqrt())
        nuclear = torch.linalg.svdvals(M).sum()
        d = (2 - 2 * nuclear).clamp(min=0).sqrt() / 2
    return (1 - d).to(torch.float64)


def _check_group(group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"unknown Procrustes group {group!r}; choose from {', '.join(GROUPS)}")
    return group


def procrustes(x: Tensor, y: Tensor, group: str = "relu") -> Tensor:
    """Procrustes similarity 1 − d of X and Y (0-dim float64); ``group="relu"``: G_ReLU-Procrustes (optimal
    channel permutation after per-channel normalisation), ``"orthogonal"``: orthogonal Procrustes.

    See the module docstring for the formulas; cross-products and norms are float64.
    Raises ValueError for different n, NaN/Inf, or an all-zero input.
    """
    _check_group(group)
    return _procrustes_value(_moments(x, y), group)


# ----------------------------------------------------------------------------------------------------------
# CKA: kernels and HSIC1


def _check_n(n: int, what: str = "CKA") -> None:
    if n <= 3:
        raise ValueError(f"{what} needs at least 4 inputs (the unbiased HSIC1 divides by n(n−3)); got n = {n}")


def _check_kernel(kernel: str, estimator: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown CKA kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")


def _gemm_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class _Gram:
    """A sample kernel K (n×n, zero diagonal) with what HSIC1 needs of it alone: its row sums K1 and total
    1ᵀK1 (float64), and HSIC1(K, K) once asked for."""

    K: Tensor
    rows: Tensor
    total: Tensor
    _self_hsic: Optional[Tensor] = None

    @classmethod
    def of(cls, K: Tensor) -> "_Gram":
        rows = K.sum(1, dtype=torch.float64)
        return cls(K, rows, rows.sum())

    @property
    def n(self) -> int:
        return self.K.shape[0]

    def self_hsic(self) -> Tensor:
        if self._self_hsic is None:
            self._self_hsic = _hsic1(self, self)
        return self._self_hsic


def _frobenius(K: Tensor, L: Tensor, block: int = 1024) -> Tensor:
    """Σ K∘L accumulated in float64, in row blocks (O(block·n) extra memory)."""
    total = torch.zeros((), dtype=torch.float64, device=K.device)
    for r in range(0, K.shape[0], block):
        total += (K[r:r + block].to(torch.float64) * L[r:r + block].to(torch.float64)).sum()
    return total


def _hsic1(a: _Gram, b: _Gram) -> Tensor:
    """HSIC1(K, L) = [ Σ K∘L + (1ᵀK1)(1ᵀL1)/((n−1)(n−2)) − (2/(n−2)) (K1)ᵀ(L1) ] / (n(n−3))."""
    n = a.n
    if b.n != n:
        raise ValueError(f"kernels of different sizes: {a.n} and {b.n}")
    _check_n(n, "HSIC1")
    kl = _frobenius(a.K, b.K)
    return (kl + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * torch.dot(a.rows, b.rows)) / (n * (n - 3))


def hsic1(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC estimator HSIC1(K, L) of Song et al. (2012) for n×n kernels (0-dim float64).

    The estimator is defined for kernels with zero diagonals; the diagonals of K and L are ignored (treated as
    zero), and the inputs are not modified. All sums are float64. Needs n ≥ 4.
    """
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(f"need two n×n kernels of the same size; got {tuple(K.shape)} and {tuple(L.shape)}")
    n = K.shape[0]
    _check_n(n, "HSIC1")
    dk, dl = K.diagonal().to(torch.float64), L.diagonal().to(torch.float64)
    kl = _frobenius(K, L) - torch.dot(dk, dl)
    rk, rl = K.sum(1, dtype=torch.float64) - dk, L.sum(1, dtype=torch.float64) - dl
    return (kl + rk.sum() * rl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * torch.dot(rk, rl)) / (n * (n - 3))


def _centre(x: Tensor) -> tuple[Tensor, Tensor]:
    """(n, C, H, W) → (n, C, H·W) centred per channel (mean over n, h, w) in the GEMM dtype, statistics in
    float64. Constant channels become exactly zero. Returns the centred tensor (new: the caller's is untouched),
    and the inverse channel norms 1/‖X_c‖ after centring (0 for constant channels)."""
    n, c = x.shape[:2]
    dtype = _gemm_dtype(x)
    xf = x.reshape(n, c, -1).to(dtype)
    count = n * xf.shape[2]
    # sums over the h·w positions of one input stay in the GEMM dtype (few terms); over n they are float64
    mean = xf.sum(2).to(torch.float64).sum(0) / count
    xc = xf - mean.to(dtype)[None, :, None]
    sq_c = (xc * xc).sum(2).to(torch.float64).sum(0)
    sq = sq_c + count * mean.square()  # Σ x² = Σ (x − m)² + count·m²
    constant = sq_c <= (CONSTANT_TOL ** 2) * sq
    if bool(constant.any()):
        xc.mul_((~constant).to(dtype)[None, :, None])
    inv_norm = torch.where(constant, torch.zeros_like(sq_c), sq_c.clamp(min=torch.finfo(torch.float64).tiny).rsqrt())
    return xc, inv_norm


def _unit_channels(xc: Tensor, inv_norm: Tensor) -> Tensor:
    return xc * inv_norm.to(xc.dtype)[None, :, None]


def _relu_kernel(xn: Tensor, estimator: str, pad_to: int, block_size: int) -> Tensor:
    """K_ij = max_c Σ_p X_icp X_jcp (or the median over c) of (n, C, P) unit-channel features, with
    ``pad_to − C`` zero channels appended implicitly (each adds the value 0 to every entry's candidates).

    Built in row blocks of the upper triangle (K is symmetric) with channel-batched GEMMs: one (b×P)·(P×m)
    product per channel, then a running elementwise max, so the peak extra memory is bounded by _BUDGET
    (or _MEDIAN_BUDGET) elements plus the n×n result.
    """
    n, c, _ = xn.shape
    A = xn.transpose(0, 1).contiguous()  # (C, n, P)
    At = A.transpose(1, 2)  # (C, P, n)
    K = torch.empty(n, n, dtype=xn.dtype, device=xn.device)
    if estimator == "median":
        block = max(1, min(block_size, _MEDIAN_BUDGET // max(1, pad_to * n)))
    else:
        block = max(1, min(block_size, n))
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        rows, cols = A[:, r0:r1], At[:, :, r0:]  # only columns ≥ r0: the rest is the mirror image
        b, m = r1 - r0, n - r0
        if estimator == "max":
            acc = torch.full((b, m), -math.inf, dtype=xn.dtype, device=xn.device)
            step = max(1, _BUDGET // (b * m))
            for c0 in range(0, c, step):
                prod = torch.bmm(rows[c0:c0 + step], cols[c0:c0 + step])  # (channels, b, m)
                torch.maximum(acc, prod.amax(0), out=acc)
            if pad_to > c:
                acc.clamp_(min=0)  # max(…, 0) over the zero channels
        else:
            prod = torch.bmm(rows, cols)
            if pad_to > c:
                prod = torch.cat([prod, prod.new_zeros(pad_to - c, b, m)])
            acc = prod.median(0).values
        K[r0:r1, r0:] = acc
        K[r0:, r0:r1] = acc.T
    return K


def _kernel(xc: Tensor, inv_norm: Tensor, kernel: str, estimator: str, pad_to: int, block_size: int) -> Tensor:
    """The zero-diagonal kernel of centred (n, C, P) features (see the module docstring)."""
    n = xc.shape[0]
    if kernel == "linear":
        flat = xc.reshape(n, -1)
        K = flat @ flat.T
    else:
        K = _relu_kernel(_unit_channels(xc, inv_norm), estimator, max(pad_to, xc.shape[1]), block_size)
    K.fill_diagonal_(0)
    return K


def _gram(x: Tensor, kernel: str, estimator: str = "max", pad_to: int = 0, block_size: int = 128) -> _Gram:
    """The zero-diagonal sample kernel of (n, C, H, W) features with its HSIC1 statistics."""
    _check_n(x.shape[0])
    xc, inv_norm = _centre(x)
    return _Gram.of(_kernel(xc, inv_norm, kernel, estimator, pad_to, block_size))


def _cka_value(hxy: Tensor, hxx: Tensor, hyy: Tensor) -> Tensor:
    """HSIC1(K, L) / sqrt(HSIC1(K, K) · HSIC1(L, L)); ValueError when a self-term is not positive."""
    for h, name in ((hxx, "x"), (hyy, "y")):
        value = float(h)
        if math.isnan(value):
            raise ValueError(f"HSIC1 of {name} with itself is NaN")
        if value == 0.0:
            raise ValueError(f"CKA is undefined: HSIC1 of {name} with itself is 0, i.e. its kernel vanishes: the "
                             f"features of {name} are constant (or all zero) across the inputs, or (median "
                             "estimator) zero-padded channels are half of all channels or more")
        if not value > 0.0:
            raise ValueError(f"CKA is undefined: HSIC1 of {name} with itself is {value:.3g} ≤ 0 (the G_ReLU "
                             "max-over-channels kernel is not positive semi-definite, or n is too small)")
    value = hxy / (hxx.sqrt() * hyy.sqrt())
    if not bool(torch.isfinite(value)):
        raise ValueError(f"CKA is not finite ({float(value)})")
    return value.to(torch.float64)


def _cka_from_grams(gx: _Gram, gy: _Gram) -> Tensor:
    return _cka_value(_hsic1(gx, gy), gx.self_hsic(), gy.self_hsic())


def cka(x: Tensor, y: Tensor, kernel: str = "linear", estimator: str = "max", *, block_size: int = 128) -> Tensor:
    """CKA of X and Y (0-dim float64) with the linear kernel or the G_ReLU kernel (``kernel="relu"``, max or
    median over channels), on all n inputs at once.

    Shapes are matched as in :func:`match_features` (zero channels enter the G_ReLU kernel as candidates of
    value 0; they do not change the linear kernel). ``block_size`` bounds the rows of a G_ReLU kernel block.

    Raises ValueError for n ≤ 3, different n, NaN/Inf, constant or all-zero features (HSIC1(K, K) = 0), and a
    non-positive HSIC1(K, K) of the (not PSD) G_ReLU kernel. The value is not clipped to [0, 1].
    """
    _check_kernel(kernel, estimator)
    x, y = _match_spatial(x, y)
    c = max(x.shape[1], y.shape[1])
    gx = _gram(x, kernel, estimator, c, block_size)
    gy = _gram(y, kernel, estimator, c, block_size)
    return _cka_from_grams(gx, gy)


# ----------------------------------------------------------------------------------------------------------
# Registry: the functional twins of the four metrics of the paper, by name

FUNCTIONS: Registry[Tensor] = Registry("similarity function")

FUNCTIONS.register("procrustes_relu")(lambda x, y: procrustes(x, y, group="relu"))
FUNCTIONS.register("procrustes_orthogonal")(lambda x, y: procrustes(x, y, group="orthogonal"))
FUNCTIONS.register("cka_linear")(lambda x, y, **kw: cka(x, y, kernel="linear", **kw))
FUNCTIONS.register("cka_relu")(lambda x, y, estimator="max", **kw: cka(x, y, "relu", estimator, **kw))


def similarity(name: str, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    """The functional metric ``name`` (one of :data:`METRICS`) of X and Y, e.g. ``similarity("cka_relu", x, y)``."""
    return FUNCTIONS.get(name)(x, y, **kwargs)


__all__ = [
    "CONSTANT_TOL",
    "ESTIMATORS",
    "FUNCTIONS",
    "GROUPS",
    "KERNELS",
    "MODES",
    "cka",
    "hsic1",
    "match_features",
    "procrustes",
    "similarity",
]
