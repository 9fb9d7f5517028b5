"""Similarity metrics between representations (SPEC §3, paper §5), functional and streaming.

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

Numerics (SPEC §7). Means, norms, cross-products of Procrustes and every HSIC sum are accumulated in float64;
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

API: :func:`procrustes`, :func:`cka`, :func:`hsic1`, :func:`match_features`, :func:`similarity` (by name); the
torchmetrics classes :class:`Procrustes` and :class:`CKA` (DDP-reducible states); :data:`METRICS`, the four
metrics of the paper by name; :func:`similarity_matrix`, every metric for every pair of feature points of two
networks in one pass over the data.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

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
# Streaming (torchmetrics) versions


def _f64_zero() -> Tensor:
    return torch.tensor(0.0, dtype=torch.float64)


class Procrustes(Metric):
    """Streaming Procrustes similarity: ``update(x, y)`` with batches of features of the same inputs,
    ``compute()`` = :func:`procrustes` on all of them.

    State (float64, summed across processes under DDP): the channel cross-products Σ X_a Y_b (C1×C2) on the
    matched spatial grid and the per-channel squared norms of X and Y; memory does not grow with n. The states
    take their shapes at the first ``update``, so every process must see at least one batch.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, group: str = "relu", **kwargs: Any):
        super().__init__(**kwargs)
        self.group = _check_group(group)
        self.add_state("cross", default=_f64_zero(), dist_reduce_fx="sum")
        self.add_state("sq_x", default=_f64_zero(), dist_reduce_fx="sum")
        self.add_state("sq_y", default=_f64_zero(), dist_reduce_fx="sum")

    def update(self, x: Union[Tensor, _Moments], y: Optional[Tensor] = None) -> None:
        m = x if isinstance(x, _Moments) else _moments(x, y)
        if self.cross.dim() == 2 and self.cross.shape != m.cross.shape:
            raise ValueError(f"channel counts changed between batches: {tuple(self.cross.shape)} before, "
                             f"{tuple(m.cross.shape)} now")
        self.cross = self.cross + m.cross.to(self.cross.device)
        self.sq_x = self.sq_x + m.sq_x.to(self.sq_x.device)
        self.sq_y = self.sq_y + m.sq_y.to(self.sq_y.device)

    def compute(self) -> Tensor:
        if self.cross.dim() != 2:
            raise ValueError("Procrustes.compute() before any update")
        return _procrustes_value(_Moments(self.cross, self.sq_x, self.sq_y), self.group)


class CKA(Metric):
    """Streaming CKA: ``update(x, y)`` with batches of features of the same inputs, then ``compute()``.

    * ``mode="exact"``: keeps the batches (list states, concatenated across processes under DDP; float64
      batches stay float64, lower precisions are stored as float32) and computes :func:`cka` on all of them.
      Memory grows with n (features, then n×n kernels).
    * ``mode="minibatch"`` (Nguyen, Raghu & Kornblith 2021): every update is one minibatch; its kernels are
      centred and built within it, and float64 sums of HSIC1(K, L), HSIC1(K, K), HSIC1(L, L) and the number of
      minibatches are kept (summed under DDP). ``compute`` = mean HSIC1(K, L) / sqrt(mean HSIC1(K, K) ·
      mean HSIC1(L, L)); memory does not grow with n. Every minibatch needs n ≥ 4.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, kernel: str = "linear", estimator: str = "max", mode: str = "exact",
                 block_size: int = 128, **kwargs: Any):
        super().__init__(**kwargs)
        _check_kernel(kernel, estimator)
        if mode not in MODES:
            raise ValueError(f"unknown CKA mode {mode!r}; choose from {', '.join(MODES)}")
        self.kernel, self.estimator, self.mode, self.block_size = kernel, estimator, mode, block_size
        if mode == "exact":
            self.add_state("xs", default=[], dist_reduce_fx="cat")
            self.add_state("ys", default=[], dist_reduce_fx="cat")
        else:
            for name in ("hsic_xy", "hsic_xx", "hsic_yy", "batches"):
                self.add_state(name, default=_f64_zero(), dist_reduce_fx="sum")

    def update(self, x: Union[Tensor, _Gram], y: Union[Tensor, _Gram]) -> None:
        if self.mode == "exact":
            x4, y4 = _to_4d(x, "x"), _to_4d(y, "y")
            _check_same_n(x4, y4)
            keep = (lambda t: t.detach() if t.dtype == torch.float64 else t.detach().to(torch.float32))
            self.xs.append(keep(x))
            self.ys.append(keep(y))
            return
        if isinstance(x, _Gram):
            gx, gy = x, y
        else:
            xm, ym = _match_spatial(x, y)
            _check_n(xm.shape[0], "a CKA minibatch")
            c = max(xm.shape[1], ym.shape[1])
            gx = _gram(xm, self.kernel, self.estimator, c, self.block_size)
            gy = _gram(ym, self.kernel, self.estimator, c, self.block_size)
        _check_n(gx.n, "a CKA minibatch")
        device = self.hsic_xy.device
        self.hsic_xy = self.hsic_xy + _hsic1(gx, gy).to(device)
        self.hsic_xx = self.hsic_xx + gx.self_hsic().to(device)
        self.hsic_yy = self.hsic_yy + gy.self_hsic().to(device)
        self.batches = self.batches + 1

    def compute(self) -> Tensor:
        if self.mode == "exact":
            if isinstance(self.xs, list) and not self.xs:
                raise ValueError("CKA.compute() before any update")
            return cka(dim_zero_cat(self.xs), dim_zero_cat(self.ys), self.kernel, self.estimator,
                       block_size=self.block_size)
        if float(self.batches) == 0:
            raise ValueError("CKA.compute() before any update")
        k = self.batches
        return _cka_value(self.hsic_xy / k, self.hsic_xx / k, self.hsic_yy / k)


# ----------------------------------------------------------------------------------------------------------
# Registries: the four metrics of the paper, by name

METRICS: Registry[Metric] = Registry("metric")
FUNCTIONS: Registry[Tensor] = Registry("similarity function")


@METRICS.register("procrustes_relu")
def _procrustes_relu(**kwargs: Any) -> Procrustes:
    return Procrustes(group="relu", **kwargs)


@METRICS.register("procrustes_orthogonal")
def _procrustes_orthogonal(**kwargs: Any) -> Procrustes:
    return Procrustes(group="orthogonal", **kwargs)


@METRICS.register("cka_linear")
def _cka_linear(mode: str = "exact", **kwargs: Any) -> CKA:
    return CKA(kernel="linear", mode=mode, **kwargs)


@METRICS.register("cka_relu")
def _cka_relu(mode: str = "exact", estimator: str = "max", **kwargs: Any) -> CKA:
    return CKA(kernel="relu", estimator=estimator, mode=mode, **kwargs)


FUNCTIONS.register("procrustes_relu")(lambda x, y: procrustes(x, y, group="relu"))
FUNCTIONS.register("procrustes_orthogonal")(lambda x, y: procrustes(x, y, group="orthogonal"))
FUNCTIONS.register("cka_linear")(lambda x, y, **kw: cka(x, y, kernel="linear", **kw))
FUNCTIONS.register("cka_relu")(lambda x, y, estimator="max", **kw: cka(x, y, "relu", estimator, **kw))


def similarity(name: str, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    """The functional metric ``name`` (one of :data:`METRICS`) of X and Y, e.g. ``similarity("cka_relu", x, y)``."""
    return FUNCTIONS.get(name)(x, y, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# All pairs of feature points of two networks


def _resolve_points(model_a: nn.Module, model_b: nn.Module, points: Any) -> tuple[list[str], list[str]]:
    def valid(model: nn.Module) -> tuple[str, ...]:
        found = getattr(model, "feature_points", None)
        if found is None:
            raise TypeError(f"{type(model).__name__} has no feature_points; use a network of the zoo")
        return tuple(found)

    def check(model: nn.Module, chosen: Iterable[str]) -> list[str]:
        chosen, ok = list(chosen), valid(model)
        for p in chosen:
            if p not in ok:
                raise ValueError(f"{type(model).__name__} has no feature point {p!r}; valid feature points: "
                                 + ", ".join(ok))
        if not chosen:
            raise ValueError("no feature points chosen")
        return chosen

    if isinstance(points, str):
        if points != "all":
            raise ValueError(f"points must be 'all', a list of feature points or a pair of lists; got {points!r}")
        return list(valid(model_a)), list(valid(model_b))
    points = list(points)
    if len(points) == 2 and all(not isinstance(p, str) for p in points):
        return check(model_a, points[0]), check(model_b, points[1])
    return check(model_a, points), check(model_b, points)


def _batch_input(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"dataloader batches must be tensors or (x, y) tuples; got {type(batch).__name__}")


def _check_loader_tail(dataloader: Any) -> None:
    """Fail before any work when the last minibatch will be too small for minibatch CKA."""
    size, dataset = getattr(dataloader, "batch_size", None), getattr(dataloader, "dataset", None)
    if not size or getattr(dataloader, "drop_last", False) or dataset is None:
        return
    try:
        n = len(dataset)
    except TypeError:
        return
    tail = n % size
    if 0 < tail <= 3 or n <= 3:
        raise ValueError(f"minibatch CKA needs at least 4 inputs in every batch, but the last batch of this "
                         f"dataloader has {tail or n}; use drop_last=True or another batch size")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Features:
    """Features of one side at the chosen points (one batch, or the whole run in exact mode), with caches of
    what several pairs share: centred tensors and kernels. ``lean`` (for n×n kernels of all inputs) caches
    only the kernels that are expensive to rebuild: no centred copies of the features, and max(K, 0) is derived
    from the cached K each time."""

    def __init__(self, feats: dict[str, Tensor], block_size: int, lean: bool = False):
        self.feats = feats
        self.block_size = block_size
        self.lean = lean
        self._centred: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._grams: dict[tuple, _Gram] = {}

    def hw(self, point: str) -> tuple[int, int]:
        return tuple(self.feats[point].shape[2:])

    def channels(self, point: str) -> int:
        return self.feats[point].shape[1]

    def gram(self, point: str, kernel: str, estimator: str, hw: tuple[int, int], pad_to: int) -> _Gram:
        """The kernel of the feature at ``point`` as matched for a pair with target grid ``hw`` and C = pad_to.

        Uniform nearest upsampling only repeats every position f times: the G_ReLU kernel is unchanged and the
        linear one scales by f (CKA is scale invariant), so the native grid is used then. Zero channels leave
        the linear kernel unchanged, turn the max kernel into max(K, 0) and enter the median as zeros."""
        native = self.hw(point)
        grid = native if _uniform_upsampling(native, hw) else tuple(hw)
        c = self.channels(point)
        if kernel == "linear":
            key: tuple = (point, kernel, grid)
        elif estimator == "max":
            key = (point, kernel, estimator, grid, pad_to > c)
        else:
            key = (point, kernel, estimator, grid, max(pad_to, c))
        if key in self._grams:
            return self._grams[key]
        if kernel == "relu" and estimator == "max" and pad_to > c:
            base = self.gram(point, kernel, estimator, grid, c)
            gram = _Gram.of(base.K.clamp(min=0))  # max(K, 0); the diagonal stays 0
        else:
            centred = self._centred.get((point, grid)) or _centre(_upsample(self.feats[point], grid))
            if not self.lean:
                self._centred[(point, grid)] = centred
            gram = _Gram.of(_kernel(*centred, kernel, estimator, pad_to, self.block_size))
        if not (self.lean and kernel == "relu" and estimator == "max" and pad_to > c):
            self._grams[key] = gram
        return gram


def _stack(feats: dict[str, Tensor], points: list[str], rows: slice, to: tuple[int, int]) -> Tensor:
    """The features of ``points`` (all on one grid) for the inputs ``rows``, channels stacked, in float64 as
    (ΣC, rows·h·w); sum-pooled down to the grid ``to`` if it is coarser (the adjoint of uniform nearest
    upsampling: Σ_p up(X)_p Y_p = Σ_q X_q Σ_{p ↦ q} Y_p)."""
    t = torch.cat([feats[p][rows] for p in points], dim=1).to(torch.float64)
    if tuple(t.shape[2:]) != tuple(to):
        fh, fw = t.shape[2] // to[0], t.shape[3] // to[1]
        t = F.avg_pool2d(t, (fh, fw)) * (fh * fw)
    return _flat(t)


def _all_moments(fa: dict[str, Tensor], fb: dict[str, Tensor], points_a: list[str], points_b: list[str],
                 budget: int = 1 << 23) -> dict[tuple[str, str], _Moments]:
    """Procrustes moments of every pair (a, b) for one batch.

    Points are grouped by grid; for two groups whose matched grid is reached by uniform upsampling of one of
    them, one float64 GEMM of the stacked channels gives the cross-products of all their pairs, computed on the
    coarser grid. The inputs are processed in chunks, so the float64 copies stay near ``budget`` elements.
    Any other pair of grids is upsampled explicitly."""
    def groups(feats: dict[str, Tensor], points: list[str]) -> dict[tuple[int, int], list[str]]:
        out: dict[tuple[int, int], list[str]] = {}
        for p in dict.fromkeys(points):
            out.setdefault(tuple(feats[p].shape[2:]), []).append(p)
        return out

    ga, gb = groups(fa, points_a), groups(fb, points_b)
    plans, explicit = [], []
    for grid_a, pa in ga.items():
        for grid_b, pb in gb.items():
            target = (max(grid_a[0], grid_b[0]), max(grid_a[1], grid_b[1]))
            ratio_a = (target[0] // grid_a[0]) * (target[1] // grid_a[1])  # positions per source position
            ratio_b = (target[0] // grid_b[0]) * (target[1] // grid_b[1])
            # (grid, computed on, factor of ‖·‖²) for a, then for b
            if grid_a == grid_b:
                plans.append((grid_a, grid_a, 1, grid_b, grid_b, 1))
            elif target == grid_b and _uniform_upsampling(grid_a, target):
                plans.append((grid_a, grid_a, ratio_a, grid_b, grid_a, 1))
            elif target == grid_a and _uniform_upsampling(grid_b, target):
                plans.append((grid_a, grid_b, 1, grid_b, grid_b, ratio_b))
            else:
                explicit += [(a, b) for a in pa for b in pb]

    n = next(iter(fa.values())).shape[0]
    per_input = sum(t[0].numel() for t in fa.values()) + sum(t[0].numel() for t in fb.values())
    chunk = max(1, budget // max(1, per_input))
    sq_a = {p: torch.zeros(fa[p].shape[1], dtype=torch.float64, device=fa[p].device) for p in fa}
    sq_b = {p: torch.zeros(fb[p].shape[1], dtype=torch.float64, device=fb[p].device) for p in fb}
    crosses = [None] * len(plans)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        stacks: dict[tuple, Tensor] = {}

        def stack(side: str, grid: tuple[int, int], to: tuple[int, int]) -> Tensor:
            key = (side, grid, to)
            if key not in stacks:
                feats, points = (fa, ga[grid]) if side == "a" else (fb, gb[grid])
                stacks[key] = _stack(feats, points, rows, to)
            return stacks[key]

        for i, (grid_a, to_a, _, grid_b, to_b, _) in enumerate(plans):
            part = stack("a", grid_a, to_a) @ stack("b", grid_b, to_b).T
            crosses[i] = part if crosses[i] is None else crosses[i] + part
        for side, grouped, sq in (("a", ga, sq_a), ("b", gb, sq_b)):
            for grid, points in grouped.items():
                norms = stack(side, grid, grid).square().sum(1)
                offset = 0
                for p in points:
                    c = sq[p].shape[0]
                    sq[p] += norms[offset:offset + c]
                    offset += c

    def offsets(feats: dict[str, Tensor], points: list[str]) -> dict[str, slice]:
        out, start = {}, 0
        for p in points:
            out[p] = slice(start, start + feats[p].shape[1])
            start += feats[p].shape[1]
        return out

    result: dict[tuple[str, str], _Moments] = {}
    for (grid_a, _, fa_up, grid_b, _, fb_up), cross in zip(plans, crosses):
        pa, pb = ga[grid_a], gb[grid_b]
        ia, ib = offsets(fa, pa), offsets(fb, pb)
        for a in pa:
            for b in pb:
                result[(a, b)] = _Moments(cross[ia[a], ib[b]], fa_up * sq_a[a], fb_up * sq_b[b])
    for a, b in explicit:
        result[(a, b)] = _moments(fa[a], fb[b])
    return result


def _progress(enabled: bool):
    if not enabled:
        return None
    try:
        from rich.progress import Progress
    except ImportError:  # the bar is optional
        return None
    return Progress(transient=True)


class _Recorder:
    """Forward hooks on the feature-point modules of both models (a context manager): ``run(x)`` gives the
    features of one batch as ``{"a": {point: (n, C, H, W)}, "b": {…}}`` and the points whose features are not
    finite."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, points_a: list[str], points_b: list[str]):
        self.model_a, self.model_b = model_a, model_b
        self.same = model_a is model_b
        self.wanted = [("a", p) for p in dict.fromkeys(points_a)] + [("b", p) for p in dict.fromkeys(points_b)]
        self.captured: dict[tuple[str, str], Tensor] = {}
        self.handles: list[Any] = []

    def side_of(self, side: str) -> str:
        """The model whose hooks record ``side`` (both are "a" when the two models are one)."""
        return "a" if self.same else side

    def __enter__(self) -> "_Recorder":
        for side, p in dict.fromkeys((self.side_of(s), p) for s, p in self.wanted):
            model = self.model_a if side == "a" else self.model_b

            def hook(_module, _inputs, out, key=(side, p)):
                self.captured[key] = out.detach().clone()  # later in-place ops must not change it

            self.handles.append(model.get_submodule(p).register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def run(self, x: Tensor) -> tuple[dict[str, dict[str, Tensor]], dict[tuple[str, str], str]]:
        self.captured.clear()
        self.model_a(x)
        if not self.same:
            self.model_b(x)
        feats: dict[str, dict[str, Tensor]] = {"a": {}, "b": {}}
        bad: dict[tuple[str, str], str] = {}
        for side, p in self.wanted:
            out = self.captured.get((self.side_of(side), p))
            if out is None:
                raise RuntimeError(f"feature point {p!r} of model_{side} was not reached in the forward pass")
            feats[side][p] = _to_4d(out, p)
            if not bool(torch.isfinite(feats[side][p]).all()):
                bad[(side, p)] = f"{p} of model_{side} contains NaN or Inf values"
        return feats, bad


def _update_pairs(objects: dict[tuple[str, str, str], Optional[Metric]], errors: dict[tuple[str, str, str], str],
                  feats: dict[str, dict[str, Tensor]], bad: dict[tuple[str, str], str],
                  points_a: list[str], points_b: list[str], block_size: int) -> None:
    """One batch into every streamed metric object: each kernel is built once per point (and matched variant),
    the Procrustes moments of all pairs come from a few stacked GEMMs. A pair that fails is dropped with its
    reason in ``errors``."""
    fa, fb = _Features(feats["a"], block_size), _Features(feats["b"], block_size)
    wants_moments = any(isinstance(obj, Procrustes) for obj in objects.values())
    moments = _all_moments(feats["a"], feats["b"], points_a, points_b) if wants_moments else {}
    for key, obj in objects.items():
        if obj is None:
            continue
        _, a, b = key
        try:
            for where in (("a", a), ("b", b)):
                if where in bad:
                    raise ValueError(bad[where])
            if isinstance(obj, CKA):
                hw = (max(fa.hw(a)[0], fb.hw(b)[0]), max(fa.hw(a)[1], fb.hw(b)[1]))
                c = max(fa.channels(a), fb.channels(b))
                obj.update(fa.gram(a, obj.kernel, obj.estimator, hw, c), fb.gram(b, obj.kernel, obj.estimator, hw, c))
            else:
                obj.update(moments[(a, b)])
        except ValueError as err:
            errors[key] = f"{type(err).__name__}: {err}"
            objects[key] = None


@torch.no_grad()
def similarity_matrix(
    model_a: nn.Module,
    model_b: nn.Module,
    dataloader: Iterable[Any],
    metrics: Sequence[str] = ("cka_linear", "cka_relu", "procrustes_relu", "procrustes_orthogonal"),
    points: Any = "all",
    cka_mode: str = "minibatch",
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    block_size: int = 128,
) -> list[dict[str, Any]]:
    """Every metric for every pair (point_a of ``model_a``, point_b of ``model_b``) of feature points.

    One pass of the data through each model (eval mode, no_grad; modes and devices restored afterwards), with
    forward hooks on the feature-point modules. Batches are tensors or (x, y) tuples. ``points``: "all", one
    list for both models, or a pair ``(list_a, list_b)``. ``cka_mode``: "minibatch" (every batch of the
    dataloader is a minibatch; memory independent of n) or "exact" (keeps every feature on the CPU, then
    builds n×n kernels, holding those of model_b while the points of model_a are done one at a time).
    Procrustes is always streamed.

    Returns rows ``{"point_a", "point_b", "metric", "value", "error"}``: ``value`` a float, NaN for a pair that
    could not be computed (degenerate features, …) with the reason in ``error`` (None otherwise).
    """
    for name in metrics:
        METRICS.get(name)
    if cka_mode not in MODES:
        raise ValueError(f"unknown cka_mode {cka_mode!r}; choose from {', '.join(MODES)}")
    points_a, points_b = _resolve_points(model_a, model_b, points)
    cka_names = [name for name in metrics if name.startswith("cka")]
    if cka_mode == "minibatch" and cka_names:
        _check_loader_tail(dataloader)
    models = [model_a] if model_a is model_b else [model_a, model_b]
    dev = torch.device(device) if device is not None else _device_of(model_a)
    saved = [(m.training, _device_of(m)) for m in models]

    pairs = [(a, b) for a in points_a for b in points_b]
    objects: dict[tuple[str, str, str], Optional[Metric]] = {}
    for name in metrics:
        if name in cka_names and cka_mode == "exact":
            continue  # computed from the stored features at the end
        kwargs = {"mode": cka_mode} if name in cka_names else {}
        for a, b in pairs:
            objects[(name, a, b)] = METRICS.build(name, **kwargs)
    errors: dict[tuple[str, str, str], str] = {}
    stored: dict[tuple[str, str], list[Tensor]] = {}
    exact: dict[tuple[str, str, str], Tensor] = {}

    bar = _progress(progress)
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("features", total=len(dataloader) if hasattr(dataloader, "__len__") else None)
        for m in models:
            m.eval().to(dev)
        seen = 0
        with _Recorder(model_a, model_b, points_a, points_b) as recorder:
            for batch in dataloader:
                x = _batch_input(batch).to(dev)
                feats, bad = recorder.run(x)
                seen += 1
                if cka_mode == "exact" and cka_names:  # kept on the CPU; one copy per module
                    kept = set()
                    for side, p in recorder.wanted:
                        key = (recorder.side_of(side), p)
                        if key not in kept:
                            kept.add(key)
                            stored.setdefault(key, []).append(feats[side][p].cpu())
                elif cka_names:
                    _check_n(x.shape[0], "minibatch CKA (a batch of the dataloader)")
                _update_pairs(objects, errors, feats, bad, points_a, points_b, block_size)
                if bar is not None:
                    bar.advance(task)
        if not seen:
            raise ValueError("the dataloader yielded no batches")
        if stored:
            exact = _exact_cka(cka_names, points_a, points_b, stored, model_a is model_b, dev, block_size, errors,
                               bar)
    finally:
        for m, (training, where) in zip(models, saved):
            m.train(training).to(where)
        if bar is not None:
            bar.stop()

    rows = []
    for name in metrics:
        for a, b in pairs:
            key = (name, a, b)
            value, error = math.nan, errors.get(key)
            if error is None:
                try:
                    obj = objects.get(key)
                    value = float(exact[key] if obj is None else obj.compute())
                    if not math.isfinite(value):
                        value, error = math.nan, "not a finite value"
                except ValueError as err:
                    value, error = math.nan, f"{type(err).__name__}: {err}"
            rows.append({"point_a": a, "point_b": b, "metric": name, "value": value, "error": error})
    return rows


def _exact_cka(cka_names: list[str], points_a: list[str], points_b: list[str],
               stored: dict[tuple[str, str], list[Tensor]], same: bool, dev: torch.device, block_size: int,
               errors: dict[tuple[str, str, str], str], bar: Any) -> dict[tuple[str, str, str], Tensor]:
    """Exact-mode CKA of every pair from the stored features (emptied on the way). One metric at a time: the
    n×n kernels of model_b's points are built once and kept, those of model_a one point at a time. Memory:
    the features, plus |points_b| + 1 kernels of n×n."""
    out: dict[tuple[str, str, str], Tensor] = {}
    full: dict[tuple[str, str], Tensor] = {}
    for key in list(stored):
        parts = stored.pop(key)
        try:
            full[key] = torch.cat(parts).to(dev)
        except RuntimeError as err:
            raise ValueError(f"exact CKA needs features of the same shape in every batch: {err}") from None
        del parts
    side = {"a": "a", "b": "a" if same else "b"}
    broken = {key: f"{key[1]} of model_{key[0]} contains NaN or Inf values"
              for key, t in full.items() if not bool(torch.isfinite(t).all())}
    task = bar.add_task("exact CKA", total=len(cka_names) * len(points_a)) if bar is not None else None
    for name in cka_names:
        probe = METRICS.build(name, mode="exact")
        side_b = _Features({p: full[(side["b"], p)] for p in points_b}, block_size, lean=True)
        for a in points_a:
            side_a = _Features({a: full[(side["a"], a)]}, block_size, lean=True)
            for b in points_b:
                key = (name, a, b)
                try:
                    for where in ((side["a"], a), (side["b"], b)):
                        if where in broken:
                            raise ValueError(broken[where])
                    hw = (max(side_a.hw(a)[0], side_b.hw(b)[0]), max(side_a.hw(a)[1], side_b.hw(b)[1]))
                    c = max(side_a.channels(a), side_b.channels(b))
                    out[key] = _cka_from_grams(side_a.gram(a, probe.kernel, probe.estimator, hw, c),
                                               side_b.gram(b, probe.kernel, probe.estimator, hw, c))
                except ValueError as err:
                    errors[key] = f"{type(err).__name__}: {err}"
            if bar is not None:
                bar.advance(task)
    return out


__all__ = [
    "CKA",
    "FUNCTIONS",
    "METRICS",
    "Procrustes",
    "cka",
    "hsic1",
    "match_features",
    "procrustes",
    "similarity",
    "similarity_matrix",
]
