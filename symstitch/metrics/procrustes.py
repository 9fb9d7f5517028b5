"""Procrustes similarity (docs/method.md §3), the G_ReLU and the orthogonal group: :func:`procrustes`, the streaming
:class:`Procrustes`, and their internal contract, which the all-pairs engine of
:func:`~symstitch.metrics.similarity_matrix` calls too: :func:`_procrustes_update` (the moments of a batch,
summed over batches) and :func:`_procrustes_compute` (the similarity from the moments).

Both groups need only the moments over (n, h, w) on the matched grid (:mod:`symstitch.metrics.base`): the
channel cross-products Σ X_a Y_b (C1×C2) and the channels' squared norms ‖X_a‖², ‖Y_b‖², all float64.

G_ReLU-Procrustes (invariant to positive-scaled permutations P·D of the channels)::

    X̂_a = X_a / ‖X_a‖            (a zero channel stays zero)
    M_ab = ⟨X̂_a, Ŷ_b⟩             π = Hungarian(M, maximize)
    d    = sqrt( max(0, ‖X̂‖² + ‖Ŷ‖² − 2 Σ_a M_{a,π(a)}) / (4C) )          similarity = 1 − d

Orthogonal Procrustes (invariant to orthogonal mixing of the channels)::

    X̂ = X / ‖X‖_F,   M = Σ_{n,h,w} X̂ Ŷᵀ  (C1×C2),
    d = sqrt( max(0, ‖X̂‖² + ‖Ŷ‖² − 2‖M‖_*) ) / 2                           similarity = 1 − d

Channel padding to C = max(C1, C2) is implicit: padded channels are zero, so they add nothing to ‖X̂‖², ‖Ŷ‖²,
‖M‖_* or any matching; they cap the score of a narrower layer: X with C1 channels against Y = [X | C2 − C1
other channels] gives G_ReLU-Procrustes exactly 1 − sqrt((C2 − C1) / (4 C2)), e.g. 0.646 for 32 against 64
channels. Procrustes does not centre: a constant channel is matched like any other. The products are formed in
float64, so no rescaling is needed at any float32 scale.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from symstitch.metrics.base import (
    _check_n,
    _check_same_n,
    _check_varies,
    _not_finite,
    _Sums,
    _target_hw,
    _to_4d,
    _uniform_upsampling,
)

Tensor = torch.Tensor

GROUPS = ("relu", "orthogonal")


@dataclass
class _Moments:
    """Sufficient statistics of Procrustes over (n, h, w) on the matched grid, all float64:
    ``cross`` = Σ X_a Y_b (C1×C2), ``sq_x`` = ‖X_a‖² (C1), ``sq_y`` = ‖Y_b‖² (C2)."""

    cross: Tensor
    sq_x: Tensor
    sq_y: Tensor


#: float64 elements of the two chunks of inputs that :func:`_procrustes_update` converts at a time
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
    """A chunk of inputs of one side for :func:`_procrustes_update`: (C, rows·|grid|) float64 for the cross-product and
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


def _procrustes_update(x: Tensor, y: Tensor) -> _Moments:
    """The moments of one batch of X and Y (:class:`_Moments`, float64; the moments of several batches are their
    sums). Streamed over chunks of inputs: each chunk is converted once to float64 and gives the cross-product
    (batched GEMMs over groups of inputs when both sides share a grid, :func:`_cross_same_grid`) and the squared
    norms. A side uniformly upsampled to the matched grid is not upsampled: the cross-product is computed on its
    grid (the other side sum-pooled) and its squared norms scale by the upsampling factor. NaN/Inf raise (seen
    in the norms)."""
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


def _procrustes_compute(m: _Moments, group: str) -> Tensor:
    """Similarity 1 − d of ``group`` from the moments of all inputs (channel padding to C = max(C1, C2) is
    implicit: padded channels are zero, so they add nothing to ‖X̂‖², ‖Ŷ‖², ‖M‖_* or any matching)."""
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
    return _procrustes_compute(_procrustes_update(x, y), group)  # float64 products: safe at every float32 scale



class Procrustes(_Sums):
    """Streaming Procrustes similarity: ``update(x, y)`` with batches of features of the same inputs,
    ``compute()`` = :func:`procrustes` on all of them.

    State (float64, summed across processes under DDP): the moments of :func:`_procrustes_update` — the channel
    cross-products Σ X_a Y_b (C1×C2) on the matched spatial grid and the per-channel squared norms of X and Y;
    memory does not grow with n. To refuse what is undefined as :func:`procrustes` does (fewer than 4 inputs,
    features the same for every input), it also counts the inputs and keeps the first input's features of each
    side with the largest deviation from them (reduced by max and min across processes, so inputs that differ
    between processes count as varying). The states take their shapes at the first ``update``, so every process
    must see at least one batch.
    """

    def __init__(self, group: str = "relu", **kwargs: Any):
        super().__init__(**kwargs)
        self.group = _check_group(group)
        self._add_sums("cross", "sq_x", "sq_y", "count")
        for side in ("x", "y"):
            self.add_state(f"first_{side}_max", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
            self.add_state(f"first_{side}_min", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="min")
            self.add_state(f"spread_{side}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        x4, y4 = _to_4d(x, "x"), _to_4d(y, "y")
        m = _procrustes_update(x4, y4)
        if self.cross.dim() == 2 and self.cross.shape != m.cross.shape:
            raise ValueError(f"channel counts changed between batches: {tuple(self.cross.shape)} before, "
                             f"{tuple(m.cross.shape)} now")
        self._accumulate(cross=m.cross, sq_x=m.sq_x, sq_y=m.sq_y, count=x4.shape[0])
        for side, t in (("x", x4), ("y", y4)):
            first = getattr(self, f"first_{side}_max")
            if first.dim() == 0:  # the first batch: its first input is the reference
                first = t[0].to(first.device, torch.float64)
                setattr(self, f"first_{side}_max", first)
                setattr(self, f"first_{side}_min", first.clone())
            deviation = (t.to(torch.float64) - first.to(t.device)).abs().amax().to(first.device)
            setattr(self, f"spread_{side}", torch.maximum(getattr(self, f"spread_{side}"), deviation))

    def compute(self) -> Tensor:
        if self.cross.dim() != 2:
            raise ValueError("Procrustes.compute() before any update")
        _check_n(int(self.count), "Procrustes")
        for side in ("x", "y"):
            same = bool(getattr(self, f"spread_{side}") == 0) and torch.equal(
                getattr(self, f"first_{side}_max"), getattr(self, f"first_{side}_min"))
            if same:
                kind = "all zero" if not bool(getattr(self, f"first_{side}_max").any()) else "the same for every input"
                raise ValueError(f"Procrustes is undefined: the features of {side} are {kind} (a representation "
                                 "that does not change with the input says nothing about it)")
        return _procrustes_compute(_Moments(self.cross, self.sq_x, self.sq_y), self.group)


__all__ = [
    "GROUPS",
    "Procrustes",
    "procrustes",
]
