"""CKA (docs/method.md §3), with the linear kernel or the G_ReLU kernel (max or median over channels), exact or
by minibatches: :func:`cka`, :func:`hsic1`, the streaming :class:`CKA`, and their internal contract, which the
all-pairs engine of :func:`~symstitch.metrics.similarity_matrix` calls too: the sample kernels of a minibatch
(:class:`_Gram`), :func:`_cka_update` (their HSIC1 terms, summed over minibatches) and :func:`_cka_compute`
(CKA from the sums).

Centre each channel (mean over n, h, w); then a sample kernel with zero diagonal::

    linear:  K_ij = Σ_{c,h,w} X_icHW X_jcHW              (no per-channel normalisation)
    G_ReLU:  X_c ← X_c / ‖X_c‖,  K_ij = max_c Σ_{h,w} X_icHW X_jcHW     (estimator="median": median over c)

    HSIC1(K, L) = [ Σ K∘L + (1ᵀK1)(1ᵀL1)/((n−1)(n−2)) − (2/(n−2)) (K1)ᵀ(L1) ] / (n(n−3))   (Song et al. 2012)
    CKA = HSIC1(K, L) / sqrt( HSIC1(K, K) · HSIC1(L, L) )

Exact mode uses all n inputs at once; minibatch mode (Nguyen, Raghu & Kornblith 2021) centres and builds the
kernels within each minibatch and reports mean HSIC1(K, L) / sqrt(mean HSIC1(K, K) · mean HSIC1(L, L)).

Shapes are matched as in :func:`~symstitch.metrics.base.match_features`: zero channels leave the linear kernel
unchanged and enter the G_ReLU kernel as candidates of value 0; a grid reached by uniform nearest upsampling
leaves the G_ReLU kernel unchanged and scales the linear one, which CKA ignores, so the native grid is used.

Numerics (docs/method.md §8). Means, norms and every HSIC sum are accumulated in float64; the kernel GEMMs run
in float32 for float32 features (they are the cost) and in float64 for float64 features. A channel whose
centred norm is below :data:`CONSTANT_TOL` of its norm counts as constant and is set exactly to zero (otherwise
G_ReLU-CKA would blow rounding noise up to a unit-norm channel). Features whose largest magnitude is outside
[2⁻⁴⁰, 2⁴⁰] are rescaled by a power of two (exact) before the float32 kernel GEMMs (minibatch kernels carry the
factor, so their HSIC1 terms add up in one unit).

* The max-over-channels kernel is not positive semi-definite, so G_ReLU-CKA can in principle leave [0, 1]
  (and HSIC1(K, K) can even be negative, which raises). Values are reported as computed, never clipped.
* ``estimator="median"`` uses ``torch.median``, the lower median when the channel count is even. Zero-padded
  channels enter the median as zeros; when they are at least half of all channels the kernel vanishes and CKA
  raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torchmetrics.utilities.data import dim_zero_cat

from symstitch.metrics.base import (
    _check_n,
    _check_same_n,
    _check_varies,
    _identical_inputs,
    _match_spatial,
    _not_finite,
    _Sums,
    _target_hw,
    _to_4d,
    _uniform_upsampling,
    _upsample,
)

Tensor = torch.Tensor

KERNELS = ("linear", "relu")
ESTIMATORS = ("max", "median")
MODES = ("exact", "minibatch")

#: a channel whose centred norm is at most this fraction of its norm is constant (set exactly to zero)
CONSTANT_TOL = 1e-8
#: features whose largest magnitude lies outside [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] are rescaled by a power of two
#: first: their float32 products would otherwise fall into subnormals (lost precision) or overflow
SAFE_EXPONENT = 40
#: elements of one temporary (channels × rows × columns) of the G_ReLU kernel: many channels per batched GEMM
#: for the running max, more for the median (which needs every channel of an entry at once)
_BUDGET = 1 << 21
_MEDIAN_BUDGET = 1 << 22
#: columns of one tile of a G_ReLU kernel row block (the tile's channel products share the buffer above)
_TILE_COLUMNS = 512
#: rows of one block of a packed sample kernel (at n = 2000, blocks of 256 rows ran 5–10 % faster than 128 on the
#: 2-core benchmark machine; at n = 500 the two were within noise)
BLOCK_ROWS = 256


def _rescaled(t: Tensor) -> tuple[Tensor, float]:
    """``(t, 1.0)``, or ``(t · s, s)`` with s a power of two (exact) when the largest magnitude of ``t`` is outside
    [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] (a new tensor; the caller's is untouched). Every metric is invariant to
    it; a minibatch kernel records it (:attr:`_Gram.unit`)."""
    peak = float(t.detach().abs().amax()) if t.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return t, 1.0
    exponent = math.frexp(peak)[1]
    if -SAFE_EXPONENT <= exponent <= SAFE_EXPONENT:
        return t, 1.0
    scale = 2.0 ** -exponent
    return t * scale, scale


def _check_kernel(kernel: str, estimator: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown CKA kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")


def _gemm_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _segments(n: int, block: int) -> list[tuple[int, int, int, int]]:
    """The row blocks of a packed kernel: ``(r0, b, m, offset)`` for rows r0 … r0 + b − 1 against columns
    r0 … n − 1 (b × m entries, row-major, at ``offset`` of the packed vector)."""
    out, offset = [], 0
    for r0 in range(0, n, block):
        b, m = min(block, n - r0), n - r0
        out.append((r0, b, m, offset))
        offset += b * m
    return out


def _packed_size(n: int, block: int) -> int:
    return sum(b * m for _, b, m, _ in _segments(n, block))


def _seal_block(v: Tensor, rows: Tensor, r0: int) -> None:
    """Keep only the strict upper triangle of a (b × m) block of rows r0 … (columns r0 …), in place, and add
    its entries to the row sums K1 of both triangles (float64)."""
    b = v.shape[0]
    v[:, :b].triu_(1)
    v64 = v.to(torch.float64)  # one conversion, then two float64 sums (summing with dtype=float64 ran slower)
    rows[r0:r0 + b] += v64.sum(1)
    rows[r0:] += v64.sum(0)


@dataclass
class _Gram:
    """A symmetric sample kernel K (n×n, zero diagonal), stored packed: the strict upper triangle in row blocks
    of ``block`` rows (:func:`_segments`; within the square part of a block the entries on and below the
    diagonal are zero), with what HSIC1 needs of it alone: its row sums K1 and total 1ᵀK1 (float64). Σ K∘L of
    two kernels packed alike is 2 × the dot product of their vectors."""

    tri: Tensor
    n: int
    block: int
    rows: Tensor
    total: Tensor
    #: how many times larger these entries are than those of the features as given (features rescaled by a
    #: power of two s for safe products, :func:`_rescaled`: s² for the linear kernel); every HSIC1 divides it out,
    #: so that minibatches rescaled alike or not add up in one unit
    unit: float = 1.0

    @classmethod
    def packed(cls, tri: Tensor, n: int, block: int, unit: float = 1.0) -> "_Gram":
        """From a packed strict upper triangle (row sums computed here)."""
        rows = torch.zeros(n, dtype=torch.float64, device=tri.device)
        for r0, b, m, off in _segments(n, block):
            _seal_block(tri[off:off + b * m].view(b, m), rows, r0)
        return cls(tri, n, block, rows, rows.sum(), unit=unit)

    @classmethod
    def of(cls, K: Tensor, block: int = BLOCK_ROWS) -> "_Gram":
        """From a full n×n kernel (its diagonal and lower triangle are ignored)."""
        n = K.shape[0]
        tri = torch.empty(_packed_size(n, block), dtype=K.dtype, device=K.device)
        for r0, b, m, off in _segments(n, block):
            tri[off:off + b * m].view(b, m).copy_(K[r0:r0 + b, r0:])
        return cls.packed(tri, n, block)

    def full(self) -> Tensor:
        """K as a symmetric n×n tensor."""
        K = torch.zeros(self.n, self.n, dtype=self.tri.dtype, device=self.tri.device)
        for r0, b, m, off in _segments(self.n, self.block):
            K[r0:r0 + b, r0:] = self.tri[off:off + b * m].view(b, m)
        return K + K.T

    def relayout(self, block: int) -> "_Gram":
        if block == self.block:
            return self
        gram = _Gram.of(self.full(), block)
        gram.unit = self.unit
        return gram



def _frobenius(K: Tensor, L: Tensor, block: int = 1024) -> Tensor:
    """Σ K∘L accumulated in float64, in row blocks (O(block·n) extra memory)."""
    total = torch.zeros((), dtype=torch.float64, device=K.device)
    for r in range(0, K.shape[0], block):
        total += (K[r:r + block].to(torch.float64) * L[r:r + block].to(torch.float64)).sum()
    return total


def _hsic_all(grams: Sequence[_Gram], chunk: int = 1 << 15) -> Tensor:
    """HSIC1 of every pair of the kernels ``grams`` (V × V, float64; the diagonal holds HSIC1(K, K)) in one pass
    over them: the packed kernels are stacked and converted to float64 a chunk of entries at a time, and one
    float64 GEMM per chunk adds all their Σ K∘L; (K1)ᵀ(L1) of all pairs is one more GEMM."""
    n, block = grams[0].n, grams[0].block
    for g in grams:
        if g.n != n:
            raise ValueError(f"kernels of different sizes: {n} and {g.n}")
    _check_n(n, "HSIC1")
    tris = [g.relayout(block).tri for g in grams]
    size, device = tris[0].numel(), tris[0].device
    kl = torch.zeros(len(tris), len(tris), dtype=torch.float64, device=device)
    z = torch.empty(len(tris), min(chunk, size), dtype=torch.float64, device=device)
    for s in range(0, size, chunk):
        e = min(size, s + chunk)
        for i, t in enumerate(tris):
            z[i, :e - s].copy_(t[s:e])
        kl.addmm_(z[:, :e - s], z[:, :e - s].T)
    rows = torch.stack([g.rows for g in grams])
    total = rows.sum(1)
    units = torch.tensor([g.unit for g in grams], dtype=torch.float64, device=device)
    # Σ K∘L = 2 Σ_{i<j} K_ij L_ij (zero diagonals)
    return (2 * kl + total[:, None] * total[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)) / (
        n * (n - 3)) / (units[:, None] * units[None, :])


@torch.no_grad()
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


def _centre(x: Tensor, kernel: str, name: str = "features", dtype: Optional[torch.dtype] = None,
            into: Optional[Tensor] = None, minibatch: bool = False) -> tuple[Tensor, float]:
    """The features a kernel's GEMMs read, from (n, C, H, W), in two passes over them and one write.

    Pass 1 sums every (input, channel) over its h·w positions in the GEMM dtype (few terms; NaN/Inf are
    caught from these sums, :func:`_not_finite`), and over the n inputs in float64: the channel means. The
    write subtracts them (in the GEMM dtype; the caller's tensor is untouched): ``(n, C, H·W)`` for the
    linear kernel, ``(C, n, H·W)`` — the layout of the channel-batched GEMMs — for the G_ReLU kernel. Pass 2
    reads the result for the centred channel norms (float64 over n). A channel whose centred norm is at most
    CONSTANT_TOL of its norm is constant and becomes exactly zero; for the G_ReLU kernel every other channel
    is scaled to unit norm in the same in-place pass. ``into``: a contiguous tensor of the GEMM dtype, no longer
    needed, whose memory is reused for the result when it is large enough (no fresh pages to fault in).
    Returns the result and the kernel's unit (:attr:`_Gram.unit`: s² when the features were rescaled by s and
    the kernel is linear, else 1). Features that are the same for every input raise, unless ``minibatch``: one
    minibatch of a stream may be so, its kernel then vanishes exactly (zero terms of the means).
    """
    n, c = x.shape[:2]
    dtype = dtype or _gemm_dtype(x)
    x, scale = _rescaled(x)
    unit = scale * scale if kernel == "linear" else 1.0  # the G_ReLU kernel normalises every channel
    xf = x.reshape(n, c, -1)
    count = n * xf.shape[2]
    sums = xf.sum(2, dtype=dtype)
    total = sums.to(torch.float64).sum(0)
    _not_finite(x, name, total)
    identical = n > 1 and torch.equal(sums[1], sums[0]) and _identical_inputs(x)  # sums agree: the exact check
    if identical and not minibatch:
        _check_varies(x, name, "CKA")
    mean = (total / count).to(dtype)
    shape = (c, n, xf.shape[2]) if kernel == "relu" else (n, c, xf.shape[2])
    if (into is not None and into.dtype == dtype and into.device == x.device and into.is_contiguous()
            and into.numel() >= math.prod(shape)):
        out = into.view(-1)[:math.prod(shape)].view(shape)
    else:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    if kernel == "relu":
        torch.sub(xf.transpose(0, 1), mean[:, None, None], out=out)
        sq_c = torch.linalg.vector_norm(out, dim=2).to(torch.float64).square().sum(1)
    else:
        torch.sub(xf, mean[None, :, None], out=out)
        sq_c = torch.linalg.vector_norm(out, dim=2).to(torch.float64).square().sum(0)
    sq = sq_c + count * (total / count).square()  # Σ x² = Σ (x − m)² + count·m²
    constant = sq_c <= (CONSTANT_TOL ** 2) * sq
    if kernel == "relu":
        scale = torch.where(constant, torch.zeros_like(sq_c), sq_c.clamp(min=torch.finfo(torch.float64).tiny).rsqrt())
        out.mul_(scale.to(dtype)[:, None, None])
    elif bool(constant.any()):
        out.mul_((~constant).to(dtype)[None, :, None])
    if identical:  # its kernel is constant, whose HSIC1 terms vanish: exactly zero instead of rounding noise
        out.zero_()
    return out, unit


def _linear_gram(xc: Tensor, block_size: int) -> _Gram:
    """The linear kernel K = X Xᵀ of centred (n, C, P) features: one GEMM per row block, upper triangle only."""
    n = xc.shape[0]
    flat = xc.reshape(n, -1)
    block = max(1, min(block_size, n))
    tri = torch.empty(_packed_size(n, block), dtype=xc.dtype, device=xc.device)
    rows = torch.zeros(n, dtype=torch.float64, device=xc.device)
    for r0, b, m, off in _segments(n, block):
        v = tri[off:off + b * m].view(b, m)
        torch.mm(flat[r0:r0 + b], flat[r0:].T, out=v)
        _seal_block(v, rows, r0)
    return _Gram(tri, n, block, rows, rows.sum())


def _max_over_channels(rows: Tensor, cols: Tensor, out: Tensor, step: int, buffer: Tensor) -> None:
    """out_ij = max_c Σ_p rows_cip cols_cpj, ``step`` channels per batched GEMM into ``buffer``; ``out`` may be a
    strided view (a tile of a packed row block)."""
    c, b, w = rows.shape[0], rows.shape[1], cols.shape[2]
    for c0 in range(0, c, step):
        s = min(step, c - c0)
        prod = torch.bmm(rows[c0:c0 + s], cols[c0:c0 + s], out=buffer[:s * b * w].view(s, b, w))
        if c0 == 0:
            torch.amax(prod, 0, out=out)
        else:
            part = buffer[s * b * w:(s + 1) * b * w].view(b, w)
            torch.amax(prod, 0, out=part)
            torch.maximum(out, part, out=out)


def _relu_gram(A: Tensor, estimator: str, pad_to: int, block_size: int) -> _Gram:
    """K_ij = max_c Σ_p A_cip A_cjp (or the median over c) of (C, n, P) unit-channel features, with
    ``pad_to − C`` zero channels appended implicitly (each adds the value 0 to every entry's candidates).

    Built in row blocks of the upper triangle (K is symmetric), each in tiles of at most _TILE_COLUMNS columns,
    with channel-batched GEMMs: one (b×P)·(P×w) product per channel into a reused buffer, then a running
    elementwise max, so the peak extra memory is bounded by _BUDGET (or _MEDIAN_BUDGET) elements plus the
    packed result. Tiles keep many channels in one GEMM call and one max without making the buffer large.
    """
    c, n, _ = A.shape
    At = A.transpose(1, 2)  # (C, P, n)
    pad_to = max(pad_to, c)
    if estimator == "median":
        block = max(1, min(block_size, _MEDIAN_BUDGET // max(1, pad_to * n)))
    else:
        block = max(1, min(block_size, n))
    tri = torch.empty(_packed_size(n, block), dtype=A.dtype, device=A.device)
    rows = torch.zeros(n, dtype=torch.float64, device=A.device)
    buffer = torch.empty(0, dtype=A.dtype, device=A.device)
    for r0, b, m, off in _segments(n, block):
        acc = tri[off:off + b * m].view(b, m)
        if estimator == "max":
            for j0 in range(0, m, _TILE_COLUMNS):
                w = min(_TILE_COLUMNS, m - j0)
                step = max(1, _BUDGET // (b * w))
                need = (min(step, c) + (1 if c > step else 0)) * b * w
                if buffer.numel() < need:
                    buffer = torch.empty(need, dtype=A.dtype, device=A.device)
                _max_over_channels(A[:, r0:r0 + b], At[:, :, r0 + j0:r0 + j0 + w], acc[:, j0:j0 + w], step, buffer)
            if pad_to > c:
                acc.clamp_(min=0)  # max(…, 0) over the zero channels
        else:
            prod = torch.bmm(A[:, r0:r0 + b], At[:, :, r0:])
            if pad_to > c:
                prod = torch.cat([prod, prod.new_zeros(pad_to - c, b, m)])
            acc.copy_(prod.median(0).values)
        _seal_block(acc, rows, r0)
    return _Gram(tri, n, block, rows, rows.sum())


def _native_or_matched(t: Tensor, hw: tuple[int, int]) -> Tensor:
    """``t`` on its own grid when nearest upsampling to ``hw`` only repeats every position f times (the G_ReLU
    kernel is then unchanged and the linear one scales by f, which CKA ignores), else upsampled to ``hw``."""
    return t if _uniform_upsampling(t.shape[2:], hw) else _upsample(t, hw)


def _kernel_gram(xc: Tensor, kernel: str, estimator: str, pad_to: int, block_size: int, unit: float = 1.0) -> _Gram:
    """The packed zero-diagonal kernel of features prepared by :func:`_centre` (``unit``: its unit)."""
    gram = _linear_gram(xc, block_size) if kernel == "linear" else _relu_gram(xc, estimator, pad_to, block_size)
    gram.unit = unit
    return gram


def _gram(x: Tensor, kernel: str, estimator: str = "max", pad_to: int = 0, block_size: int = BLOCK_ROWS,
          name: str = "features") -> _Gram:
    """The zero-diagonal sample kernel of (n, C, H, W) features with its HSIC1 statistics (a part of a stream:
    features that are the same for every input give a vanishing kernel, not an error)."""
    xc, unit = _centre(x, kernel, name, minibatch=True)
    _check_n(x.shape[0])
    return _kernel_gram(xc, kernel, estimator, pad_to, block_size, unit)


def _cka_update(grams_x: Sequence[_Gram], grams_y: Sequence[_Gram]) -> tuple[Tensor, Tensor, Tensor]:
    """The HSIC1 terms of one minibatch (of all inputs at once for exact CKA), float64: HSIC1(K, L) of every
    kernel K of ``grams_x`` with every kernel L of ``grams_y`` (|x| × |y|), HSIC1(K, K) (|x|) and HSIC1(L, L)
    (|y|), from one pass over the kernels (:func:`_hsic_all`). ``grams_y`` may be ``grams_x`` itself: each
    kernel is then read once. Summed over the minibatches, they are what :func:`_cka_compute` takes."""
    shared = grams_y is grams_x
    h = _hsic_all(grams_x if shared else [*grams_x, *grams_y])
    own = h.diagonal()
    if shared:
        return h, own, own
    v = len(grams_x)
    return h[:v, v:], own[:v], own[v:]


def _cka_terms(gx: _Gram, gy: _Gram) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_cka_update` of one pair of kernels: HSIC1(K, L), HSIC1(K, K), HSIC1(L, L) (0-dim float64)."""
    hxy, hxx, hyy = _cka_update([gx], [gy])
    return hxy[0, 0], hxx[0], hyy[0]


def _cka_compute(hxy: Tensor, hxx: Tensor, hyy: Tensor, batches: Union[Tensor, int] = 1) -> Tensor:
    """CKA = mean HSIC1(K, L) / sqrt(mean HSIC1(K, K) · mean HSIC1(L, L)) from the sums of the HSIC1 terms over
    ``batches`` minibatches (one for exact CKA); ValueError when a self-term is not positive."""
    hxy, hxx, hyy = hxy / batches, hxx / batches, hyy / batches
    for h, name in ((hxx, "x"), (hyy, "y")):
        value = float(h)
        if math.isnan(value):
            raise ValueError(f"HSIC1 of {name} with itself is NaN")
        if value == 0.0:
            raise ValueError(f"CKA is undefined: HSIC1 of {name} with itself is 0, i.e. its kernel vanishes: the "
                             f"features of {name} are the same for every input (or all zero), or (median "
                             "estimator) zero-padded channels are half of all channels or more")
        if not value > 0.0:
            raise ValueError(f"CKA is undefined: HSIC1 of {name} with itself is {value:.3g} ≤ 0 (the G_ReLU "
                             "max-over-channels kernel is not positive semi-definite, or n is too small)")
    value = hxy / (hxx.sqrt() * hyy.sqrt())
    if not bool(torch.isfinite(value)):
        raise ValueError(f"CKA is not finite ({float(value)})")
    return value.to(torch.float64)


@torch.no_grad()
def cka(x: Tensor, y: Tensor, kernel: str = "linear", estimator: str = "max", *, block_size: int = BLOCK_ROWS) -> Tensor:
    """CKA of X and Y (0-dim float64) with the linear kernel or the G_ReLU kernel (``kernel="relu"``, max or
    median over channels), on all n inputs at once.

    Shapes are matched as in :func:`~symstitch.metrics.base.match_features` (zero channels enter the G_ReLU
    kernel as candidates of value 0; they do not change the linear kernel). ``block_size`` bounds the rows of a G_ReLU kernel block.

    Raises ValueError for n ≤ 3, different n, NaN/Inf, features that are the same for every input (all zero
    included) or whose kernel vanishes otherwise (HSIC1(K, K) = 0), and a non-positive HSIC1(K, K) of the (not
    PSD) G_ReLU kernel. The value is not clipped to [0, 1].
    """
    _check_kernel(kernel, estimator)
    x, y = _to_4d(x, "x"), _to_4d(y, "y")
    _check_same_n(x, y)
    dtype = _gemm_dtype(torch.empty(0, dtype=torch.promote_types(x.dtype, y.dtype)))
    hw, c = _target_hw(x, y), max(x.shape[1], y.shape[1])
    _check_n(x.shape[0])
    xc, unit = _centre(_native_or_matched(x, hw), kernel, "x", dtype)
    gx = _kernel_gram(xc, kernel, estimator, c, block_size, unit)
    yc, unit = _centre(_native_or_matched(y, hw), kernel, "y", dtype, into=xc)  # x's centred copy is done with
    del xc
    gy = _kernel_gram(yc, kernel, estimator, c, block_size, unit)
    return _cka_compute(*_cka_terms(gx, gy))


class CKA(_Sums):
    """Streaming CKA: ``update(x, y)`` with batches of features of the same inputs, then ``compute()``.

    * ``mode="exact"``: keeps the batches (list states, concatenated across processes under DDP; float64
      batches stay float64, lower precisions are stored as float32) and computes :func:`cka` on all of them.
      Memory grows with n (features, then n×n kernels).
    * ``mode="minibatch"`` (Nguyen, Raghu & Kornblith 2021): every update is one minibatch; its kernels are
      centred and built within it, and float64 sums of its HSIC1 terms (:func:`_cka_update`: HSIC1(K, L),
      HSIC1(K, K), HSIC1(L, L)) and the number of minibatches are kept (summed under DDP). ``compute`` =
      :func:`_cka_compute` of the sums; memory does not grow with n. Every minibatch needs n ≥ 4.
    """

    def __init__(self, kernel: str = "linear", estimator: str = "max", mode: str = "exact",
                 block_size: int = BLOCK_ROWS, **kwargs: Any):
        super().__init__(**kwargs)
        _check_kernel(kernel, estimator)
        if mode not in MODES:
            raise ValueError(f"unknown CKA mode {mode!r}; choose from {', '.join(MODES)}")
        self.kernel, self.estimator, self.mode, self.block_size = kernel, estimator, mode, block_size
        if mode == "exact":
            self.add_state("xs", default=[], dist_reduce_fx="cat")
            self.add_state("ys", default=[], dist_reduce_fx="cat")
        else:
            self._add_sums("hsic_xy", "hsic_xx", "hsic_yy", "batches")

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        if self.mode == "exact":
            x4, y4 = _to_4d(x, "x"), _to_4d(y, "y")
            _check_same_n(x4, y4)
            keep = (lambda t: t.detach() if t.dtype == torch.float64 else t.detach().to(torch.float32))
            self.xs.append(keep(x))
            self.ys.append(keep(y))
            return
        xm, ym = _match_spatial(x, y)
        _check_n(xm.shape[0], "a CKA minibatch")
        c = max(xm.shape[1], ym.shape[1])
        gx = _gram(xm, self.kernel, self.estimator, c, self.block_size)
        gy = _gram(ym, self.kernel, self.estimator, c, self.block_size)
        hxy, hxx, hyy = _cka_terms(gx, gy)
        self._accumulate(hsic_xy=hxy, hsic_xx=hxx, hsic_yy=hyy, batches=1)

    def compute(self) -> Tensor:
        if self.mode == "exact":
            if isinstance(self.xs, list) and not self.xs:
                raise ValueError("CKA.compute() before any update")
            return cka(dim_zero_cat(self.xs), dim_zero_cat(self.ys), self.kernel, self.estimator,
                       block_size=self.block_size)
        if float(self.batches) == 0:
            raise ValueError("CKA.compute() before any update")
        return _cka_compute(self.hsic_xy, self.hsic_xx, self.hsic_yy, self.batches)


__all__ = [
    "CKA",
    "CONSTANT_TOL",
    "ESTIMATORS",
    "KERNELS",
    "MODES",
    "cka",
    "hsic1",
]
