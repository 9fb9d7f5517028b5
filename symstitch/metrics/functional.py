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

Defined behaviour at the edges, the same for every metric and every path (functional, streaming, all pairs):
a similarity compares how two representations vary over the inputs, so where that is not measured the result is
a ValueError naming the reason (a NaN with the reason in a :func:`~symstitch.metrics.similarity_matrix` row),
never a number:

* fewer than :data:`MIN_INPUTS` = 4 inputs (CKA's unbiased HSIC1 divides by n(n−3); with one input any two
  representations are orthogonally equivalent, and Procrustes of a handful scores high by chance);
* features that are the same for every input (bitwise: a representation that does not change with the input
  says nothing about it), all-zero features included;
* NaN or Inf values.

Beyond those: constant *channels* are fine (CKA centres them to zero: a channel whose centred norm is below
1e-8 of its norm counts as constant and is set exactly to zero, otherwise G_ReLU-CKA would blow rounding noise up
to a unit-norm channel; Procrustes, which does not centre, matches them like any channel). The value does not
depend on the scale of the input anywhere its dtype can hold it: CKA and Procrustes are scale-invariant,
Procrustes forms its products in float64, and CKA rescales features whose largest magnitude is outside
[2⁻⁴⁰, 2⁴⁰] by a power of two (exact) before its float32 kernel GEMMs (minibatch kernels carry the factor, so
their HSIC1 terms add up in one unit). The metrics are measurements: they are computed without gradients (``requires_grad`` inputs
are read, not differentiated). float16 and bfloat16 features are computed in float32.
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
are in :mod:`symstitch.metrics.streaming`, the all-pairs engine in :mod:`symstitch.metrics.pairwise`.
"""

from __future__ import annotations

import functools
import math
import threading
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
#: the fewest inputs any metric is defined for
MIN_INPUTS = 4
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
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


def _not_finite(t: Tensor, name: str, probe: Tensor) -> None:
    """Raise ValueError if ``t`` holds NaN or Inf. ``probe`` is a reduction of ``t`` computed anyway (a sum, a
    squared norm): NaN and Inf propagate into it, so a finite probe clears ``t`` without another pass. Only a
    non-finite probe (NaN/Inf in ``t``, or a sum that overflowed) pays for the exact elementwise check."""
    if not bool(torch.isfinite(probe).all()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _is_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t``: a sum first (one cheap pass), the elementwise check only when the sum is not
    finite (NaN/Inf present, or an overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: Tensor, name: str) -> None:
    if not _is_finite(t):
        raise ValueError(f"{name} contains NaN or Inf values")


def _identical_inputs(t: Tensor) -> bool:
    """Whether every input (first dim) gives bitwise the same features: almost always decided by comparing two
    inputs; the whole tensor is compared only when those agree."""
    if t.shape[0] < 2:
        return True
    if not torch.equal(t[1], t[0]) or not torch.equal(t[-1], t[0]):
        return False
    return torch.equal(t, t[:1].expand_as(t))


def _check_varies(t: Tensor, name: str, what: str) -> None:
    """ValueError when the features ``t`` (n first) are the same for every input (all zero included)."""
    if _identical_inputs(t):
        kind = "all zero" if not bool(t[:1].any()) else "the same for every input"
        raise ValueError(f"{what} is undefined: the features of {name} are {kind} (a representation that does "
                         "not change with the input says nothing about it)")


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


def _match_spatial(x: Tensor, y: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """Both as (n, C, H, W) on the larger spatial grid; checks n and (``check``) finiteness."""
    x, y = _to_4d(x, "x"), _to_4d(y, "y")
    _check_same_n(x, y)
    if check:
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


#: float64 elements of the two chunks of inputs that :func:`_moments` converts at a time
_MOMENT_BUDGET = 1 << 22
#: positions (inputs × H·W) side by side in one row of a Procrustes cross-product GEMM
_GROUP_WIDTH = 1024


def _flat(t: Tensor) -> Tensor:
    """(n, C, H, W) → (C, n·H·W) in float64: one copy (transposition and conversion together)."""
    n, c = t.shape[:2]
    out = torch.empty(c, n, t[0, 0].numel(), dtype=torch.float64, device=t.device)
    out.copy_(t.reshape(n, c, -1).transpose(0, 1))
    return out.view(c, -1)


def _side_chunk(t: Tensor, hw: tuple[int, int], grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A chunk of inputs of one side for :func:`_moments`: (C, rows·|grid|) float64 for the cross-product and
    its channels' squared norms on the matched grid ``hw``. ``grid`` is where the cross-product is computed:
    ``hw`` itself, or the coarser native grid of the other side when that one is uniformly upsampled to ``hw``
    (then this side is sum-pooled onto it: Σ_p up(X)_p Y_p = Σ_q X_q Σ_{p ↦ q} Y_p)."""
    if tuple(t.shape[2:]) != tuple(hw) and tuple(grid) == tuple(hw):
        t = F.interpolate(t, size=hw, mode="nearest")  # a non-uniform nearest upsampling, done explicitly
    if tuple(t.shape[2:]) == tuple(grid):
        flat = _flat(t)
        return flat, flat.square().sum(1)
    t64 = t.to(torch.float64)
    sq = t64.square().sum((0, 2, 3))
    fh, fw = t.shape[2] // grid[0], t.shape[3] // grid[1]
    return _flat(F.avg_pool2d(t64, (fh, fw)) * (fh * fw)), sq


_WORKSPACES = threading.local()
#: bytes a thread may keep between calls for a scratch buffer of the moments (larger ones are freed)
_WORKSPACE_KEEP = 64 << 20


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch vector of at least ``numel`` elements, kept per thread, device and dtype between calls (up to
    _WORKSPACE_KEEP bytes): a fresh buffer of tens of MB costs more in page faults than the pass that fills it."""
    cache = _WORKSPACES.__dict__.setdefault("buffers", {})
    key = (device, dtype)
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        if numel * buffer.element_size() <= _WORKSPACE_KEEP:
            cache[key] = buffer
    return buffer[:numel]


def _cross_same_grid(x: Tensor, y: Tensor, chunk: int, cross: Tensor, sq_x: Tensor, sq_y: Tensor) -> None:
    """Adds Σ_i X_i Y_iᵀ and the channels' squared norms of two (n, C, P) sides on one grid, in float64.

    Each chunk of inputs is copied once into float64, g inputs side by side per channel (g·P ≈ _GROUP_WIDTH
    columns): one batched GEMM then multiplies (C1 × g·P) by (g·P × C2) per group, long enough rows for the
    GEMM to run near its rate while the result stays a small C1×C2 (a few inputs left over at the end form
    a last, shorter group)."""
    n, c1, c2 = x.shape[0], x.shape[1], y.shape[1]
    p = x[0, 0].numel()
    g = max(1, min(chunk, _GROUP_WIDTH // max(1, p)))
    chunk = max(g, chunk // g * g)
    z = _workspace(chunk * (c1 + c2) * p, torch.float64, x.device)
    for start in range(0, n, chunk):
        r = min(n, start + chunk) - start
        for s0, k in ((0, r // g * g), (r // g * g, r % g)):  # whole groups of g inputs, then the rest as one
            if k == 0:
                continue
            q, width = (k // g, g) if k % g == 0 else (1, k)
            zr = z[:q * (c1 + c2) * width * p].view(q, c1 + c2, width, p)
            rows = slice(start + s0, start + s0 + k)
            zr[:, :c1].copy_(x[rows].reshape(q, width, c1, p).transpose(1, 2))
            zr[:, c1:].copy_(y[rows].reshape(q, width, c2, p).transpose(1, 2))
            f = zr.view(q, c1 + c2, width * p)
            cross += torch.bmm(f[:, :c1], f[:, c1:].transpose(1, 2)).sum(0)
            sq = torch.linalg.vector_norm(f, dim=2).square_().sum(0)
            sq_x += sq[:c1]
            sq_y += sq[c1:]


def _moments(x: Tensor, y: Tensor) -> _Moments:
    """The moments of X and Y in float64, streamed over chunks of inputs: each chunk is converted once to
    float64 and gives the cross-product (batched GEMMs over groups of inputs when both sides share a grid,
    :func:`_cross_same_grid`) and the squared norms. A side uniformly upsampled to the matched grid is not
    upsampled: the cross-product is computed on its grid (the other side
    sum-pooled) and its squared norms scale by the upsampling factor. NaN/Inf raise (seen in the norms)."""
    x, y = _to_4d(x, "x"), _to_4d(y, "y")
    _check_same_n(x, y)
    hw = _target_hw(x, y)
    grid, fx, fy = hw, 1, 1
    gx, gy = tuple(x.shape[2:]), tuple(y.shape[2:])
    if gx != hw and gy == hw and _uniform_upsampling(gx, hw):
        grid, fx = gx, (hw[0] // gx[0]) * (hw[1] // gx[1])
    elif gy != hw and gx == hw and _uniform_upsampling(gy, hw):
        grid, fy = gy, (hw[0] // gy[0]) * (hw[1] // gy[1])
    n, c1, c2 = x.shape[0], x.shape[1], y.shape[1]
    per_input = (c1 * x[0, 0].numel() + c2 * y[0, 0].numel()) * (1 if grid == hw else 2)
    chunk = max(1, _MOMENT_BUDGET // max(1, per_input))
    device = x.device
    cross = torch.zeros(c1, c2, dtype=torch.float64, device=device)
    sq_x = torch.zeros(c1, dtype=torch.float64, device=device)
    sq_y = torch.zeros(c2, dtype=torch.float64, device=device)
    if gx == gy:
        _cross_same_grid(x, y, chunk, cross, sq_x, sq_y)
    for start in range(0, n if gx != gy else 0, chunk):
        rows = slice(start, min(n, start + chunk))
        ax, sx = _side_chunk(x[rows], hw, grid)
        ay, sy = _side_chunk(y[rows], hw, grid)
        cross.addmm_(ax, ay.T)
        sq_x += sx
        sq_y += sy
    _not_finite(x, "x", sq_x)
    _not_finite(y, "y", sq_y)
    return _Moments(cross, fx * sq_x, fy * sq_y)


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


@torch.no_grad()
def procrustes(x: Tensor, y: Tensor, group: str = "relu") -> Tensor:
    """Procrustes similarity 1 − d of X and Y (0-dim float64); ``group="relu"``: G_ReLU-Procrustes (optimal
    channel permutation after per-channel normalisation), ``"orthogonal"``: orthogonal Procrustes.

    See the module docstring for the formulas; cross-products and norms are float64.
    Raises ValueError for different n, fewer than 4 inputs, NaN/Inf, and features that are the same for every
    input (all zero included).
    """
    _check_group(group)
    x, y = _to_4d(x, "x"), _to_4d(y, "y")
    _check_same_n(x, y)
    _check_n(x.shape[0], "Procrustes")
    _check_varies(x, "x", "Procrustes")
    _check_varies(y, "y", "Procrustes")
    return _procrustes_value(_moments(x, y), group)  # float64 products: safe at every float32 scale


# ----------------------------------------------------------------------------------------------------------
# CKA: kernels and HSIC1


def _check_n(n: int, what: str = "CKA") -> None:
    if n < MIN_INPUTS:
        why = ("the unbiased HSIC1 divides by n(n−3)" if "CKA" in what or "HSIC" in what else
               "as every metric here: fewer inputs cannot tell two representations apart")
        raise ValueError(f"{what} needs at least {MIN_INPUTS} inputs ({why}); got n = {n}")


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
    diagonal are zero), with what HSIC1 needs of it alone: its row sums K1 and total 1ᵀK1 (float64), and
    HSIC1(K, K) once asked for. Σ K∘L of two kernels packed alike is 2 × the dot product of their vectors."""

    tri: Tensor
    n: int
    block: int
    rows: Tensor
    total: Tensor
    _self_hsic: Optional[Tensor] = None
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

    def self_hsic(self) -> Tensor:
        if self._self_hsic is None:
            self._self_hsic = _hsic1(self, self)
        return self._self_hsic


def _dot64(a: Tensor, b: Tensor, chunk: int = 1 << 16) -> Tensor:
    """Σ a·b of two vectors in float64 (float32 vectors are converted a cache-sized chunk at a time)."""
    if a.dtype == b.dtype == torch.float64:
        return torch.dot(a, b)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.numel(), chunk):
        total += torch.dot(a[s:s + chunk].to(torch.float64), b[s:s + chunk].to(torch.float64))
    return total


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


def _hsic1(a: _Gram, b: _Gram) -> Tensor:
    """HSIC1(K, L) = [ Σ K∘L + (1ᵀK1)(1ᵀL1)/((n−1)(n−2)) − (2/(n−2)) (K1)ᵀ(L1) ] / (n(n−3)), from packed
    kernels: Σ K∘L = 2 Σ_{i<j} K_ij L_ij (zero diagonals)."""
    n = a.n
    if b.n != n:
        raise ValueError(f"kernels of different sizes: {a.n} and {b.n}")
    _check_n(n, "HSIC1")
    b = b.relayout(a.block)
    kl = 2 * _dot64(a.tri, b.tri)
    return (kl + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * torch.dot(a.rows, b.rows)) / (
        n * (n - 3)) / (a.unit * b.unit)


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


def _cka_value(hxy: Tensor, hxx: Tensor, hyy: Tensor) -> Tensor:
    """HSIC1(K, L) / sqrt(HSIC1(K, K) · HSIC1(L, L)); ValueError when a self-term is not positive."""
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


def _cka_from_grams(gx: _Gram, gy: _Gram) -> Tensor:
    h = _hsic_all([gx, gy])
    return _cka_value(h[0, 1], h[0, 0], h[1, 1])


@torch.no_grad()
def cka(x: Tensor, y: Tensor, kernel: str = "linear", estimator: str = "max", *, block_size: int = BLOCK_ROWS) -> Tensor:
    """CKA of X and Y (0-dim float64) with the linear kernel or the G_ReLU kernel (``kernel="relu"``, max or
    median over channels), on all n inputs at once.

    Shapes are matched as in :func:`match_features` (zero channels enter the G_ReLU kernel as candidates of
    value 0; they do not change the linear kernel). ``block_size`` bounds the rows of a G_ReLU kernel block.

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
    "MIN_INPUTS",
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
