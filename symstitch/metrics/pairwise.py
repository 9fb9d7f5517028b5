"""Every similarity metric for every pair of feature points of two networks in one pass over the data
(:func:`similarity_matrix`).

The features are the modules' outputs as recorded by forward hooks (copied only when the forward pass changes
one in place). Each kernel is built once per feature point (and matched variant) and shared by all pairs; the
HSIC1 terms of all pairs of a minibatch come from one float64 GEMM of the stacked packed kernels, and the
Procrustes moments of all pairs from a few stacked float64 GEMMs. The sums over batches live in one torchmetrics
object per CKA metric and one for both Procrustes metrics (states summed under DDP), not one object per pair.
Exact-mode CKA keeps the features on the CPU and builds the n×n kernels at the end. The engines call the
internal contract of each family — :func:`~symstitch.metrics.cka._cka_update` and
:func:`~symstitch.metrics.cka._cka_compute`, :func:`~symstitch.metrics.procrustes._procrustes_update` (through
:func:`_moment_blocks`, its batched form for all pairs) and :func:`~symstitch.metrics.procrustes._procrustes_compute`
— as the streaming classes do; the formulas are in :mod:`symstitch.metrics.cka` and
:mod:`symstitch.metrics.procrustes`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from rich.progress import Progress
from torchmetrics import Metric

from symstitch.metrics.base import (
    MIN_INPUTS,
    _check_n,
    _identical_inputs,
    _is_finite,
    _Sums,
    _to_4d,
    _uniform_upsampling,
    _upsample,
)
from symstitch.metrics.cka import BLOCK_ROWS, MODES, _cka_compute, _cka_terms, _cka_update, _Gram, _gram
from symstitch.metrics.procrustes import _Moments, _procrustes_compute, _procrustes_update
from symstitch.graph import as_network
from symstitch.inputs import batch_images, loader_normalization
from symstitch.metrics.streaming import METRICS

Tensor = torch.Tensor

#: intertwiner group kind (:data:`symstitch.symmetry.GROUPS`) → the metrics of :data:`METRICS` invariant under
#: it: the G_ReLU metrics under every positive-scaled permutation, hence under permutations (a subgroup; they
#: also forgive positive channel scales, which a permutation-only metric would not), and linear CKA and
#: orthogonal Procrustes under every orthogonal map, hence under signed permutations
GROUP_METRICS: dict[str, tuple[str, ...]] = {
    "positive_scaled_permutations": ("procrustes_relu", "cka_relu"),
    "permutations": ("procrustes_relu", "cka_relu"),
    "signed_permutations": ("procrustes_orthogonal", "cka_linear"),
}


def point_group(net: nn.Module, point: str) -> Optional[str]:
    """The intertwiner group kind at a feature point (``permutations``, …), None where none is known."""
    from symstitch.symmetry import nonlinearity  # the activation → group table

    try:
        return nonlinearity(net.point_activation(point)).group
    except (ValueError, KeyError):
        return None


def _resolve_points(model_a: nn.Module, model_b: nn.Module, points: Any) -> tuple[list[str], list[str]]:
    def valid(model: nn.Module) -> tuple[str, ...]:
        found = getattr(model, "feature_points", None)
        if found is None:
            raise TypeError(f"{type(model).__name__} has no feature_points")
        return tuple(found)

    def check(model: nn.Module, chosen: Iterable[str]) -> list[str]:
        chosen, ok = list(chosen), valid(model)
        for p in chosen:
            if p not in ok:
                model.check_feature_point(p)  # a graph's features are at any of its points (else the nearest names)
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
    """Features of one side at the chosen points (one batch, or the whole run in exact mode), with a cache of
    what several pairs share: the packed kernels. ``lean`` (for n×n kernels of all inputs) caches only the
    kernels that are expensive to rebuild: max(K, 0) is derived from the cached K each time. ``side`` names the
    model in error messages. A point whose kernel cannot be built (NaN/Inf, seen in the sums that centring
    computes anyway) fails once, and every later request for it raises the same error."""

    def __init__(self, feats: dict[str, Tensor], block_size: int, lean: bool = False, side: str = "a"):
        self.feats = feats
        self.block_size = block_size
        self.lean = lean
        self.side = side
        self._grams: dict[tuple, _Gram] = {}
        self._failed: dict[str, ValueError] = {}

    def hw(self, point: str) -> tuple[int, int]:
        return tuple(self.feats[point].shape[2:])

    def channels(self, point: str) -> int:
        return self.feats[point].shape[1]

    def key(self, point: str, kernel: str, estimator: str, hw: tuple[int, int], pad_to: int) -> tuple:
        """Which kernel of ``point`` a pair with target grid ``hw`` and C = pad_to needs.

        Uniform nearest upsampling only repeats every position f times: the G_ReLU kernel is unchanged and the
        linear one scales by f (CKA is scale invariant), so the native grid is used then. Zero channels leave
        the linear kernel unchanged, turn the max kernel into max(K, 0) and enter the median as zeros."""
        native = self.hw(point)
        grid = native if _uniform_upsampling(native, hw) else tuple(hw)
        c = self.channels(point)
        if kernel == "linear":
            return (point, kernel, estimator, grid, c)
        if estimator == "max":
            return (point, kernel, estimator, grid, c + 1 if pad_to > c else c)  # c + 1: "padded", any width
        return (point, kernel, estimator, grid, max(pad_to, c))

    def gram(self, point: str, kernel: str, estimator: str, hw: tuple[int, int], pad_to: int) -> _Gram:
        """The kernel of the feature at ``point`` as matched for a pair with target grid ``hw`` and C = pad_to
        (:meth:`key`), built once and shared by every pair that needs it."""
        key = self.key(point, kernel, estimator, hw, pad_to)
        if key in self._grams:
            return self._grams[key]
        if point in self._failed:
            raise self._failed[point]
        grid, c = key[3], self.channels(point)
        if kernel == "relu" and estimator == "max" and pad_to > c:
            base = self.gram(point, kernel, estimator, grid, c)
            gram = _Gram.packed(base.tri.clamp(min=0), base.n, base.block, base.unit)  # max(K, 0); diagonal stays 0
        else:
            try:
                gram = _gram(_upsample(self.feats[point], grid), kernel, estimator, pad_to, self.block_size,
                             name=f"{point} of model_{self.side}")
            except ValueError as err:
                self._failed[point] = err
                raise
        if not (self.lean and kernel == "relu" and estimator == "max" and pad_to > c):
            self._grams[key] = gram
        return gram


def _grid_groups(feats: dict[str, Tensor], points: list[str]) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for p in dict.fromkeys(points):
        out.setdefault(tuple(feats[p].shape[2:]), []).append(p)
    return out


def _channel_slices(feats: dict[str, Tensor], groups: dict[tuple[int, int], list[str]]) \
        -> tuple[dict[str, slice], dict[tuple[int, int], slice], int]:
    """Where each point's channels (and each grid group's) lie in the channels stacked group by group."""
    points, grids, start = {}, {}, 0
    for grid, members in groups.items():
        first = start
        for p in members:
            points[p] = slice(start, start + feats[p].shape[1])
            start += feats[p].shape[1]
        grids[grid] = slice(first, start)
    return points, grids, start


def _native_stack(feats: dict[str, Tensor], points: list[str], rows: slice) -> Tensor:
    """The features of ``points`` (one grid) for the inputs ``rows``, channels stacked, as one float64 copy
    (rows, ΣC, h, w)."""
    parts = [feats[p][rows] for p in points]
    r, (h, w) = parts[0].shape[0], parts[0].shape[2:]
    out = torch.empty(r, sum(t.shape[1] for t in parts), h, w, dtype=torch.float64, device=parts[0].device)
    offset = 0
    for t in parts:
        out[:, offset:offset + t.shape[1]].copy_(t)
        offset += t.shape[1]
    return out


def _sum_pool(s: Tensor, to: tuple[int, int]) -> Tensor:
    """(r, C, H, W) summed over blocks of (H/h) × (W/w) positions onto (r, C, h, w): the adjoint of uniform nearest
    upsampling (Σ_p up(X)_p Y_p = Σ_q X_q Σ_{p ↦ q} Y_p). Sums of strided views, first along W, then along H."""
    fh, fw = s.shape[2] // to[0], s.shape[3] // to[1]
    for dim, f in ((3, fw), (2, fh)):
        if f > 1:
            parts = [s.narrow(dim, k, s.shape[dim] - f + 1)[..., ::f] if dim == 3 else
                     s.narrow(dim, k, s.shape[dim] - f + 1)[:, :, ::f] for k in range(f)]
            out = parts[0] + parts[1]
            for part in parts[2:]:
                out += part
            s = out
    return s


def _moment_blocks(fa: dict[str, Tensor], fb: dict[str, Tensor], points_a: list[str], points_b: list[str],
                   budget: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor, dict[str, slice], dict[str, slice]]:
    """Procrustes moments of every pair (a, b) for one batch, as blocks of three float64 matrices: ``cross``
    (ΣC_a × ΣC_b; the block of a pair is its channel cross-product on the matched grid), ``sq_x`` (ΣC_a × |points_b|:
    the squared norms of a's channels as matched for the pair with b) and ``sq_y`` (|points_a| × ΣC_b), with the
    channel slices of every point.

    Points are grouped by grid. Per chunk of inputs every group is converted once to float64 (one copy, which
    also gives its squared norms) and, where a pair needs a coarser grid, sum-pooled from the nearest finer
    stack; then one GEMM per pair of groups adds the cross-products of all their pairs (a batch of small
    per-input products X_i Y_iᵀ, or one product over the inputs when the per-input result would be larger than
    its inputs), on the coarser grid when the matched grid is reached by uniform upsampling (a pair of grids
    that is not is computed on its own, upsampled explicitly). The chunks keep the float64 copies near
    ``budget`` elements."""
    ga, gb = _grid_groups(fa, points_a), _grid_groups(fb, points_b)
    slices_a, groups_a, ca = _channel_slices(fa, ga)
    slices_b, groups_b, cb = _channel_slices(fb, gb)
    shared = list(ga.items()) == list(gb.items()) and all(fa[p] is fb[p] for ps in ga.values() for p in ps)
    index_a = {p: i for i, p in enumerate(points_a)}
    index_b = {p: j for j, p in enumerate(points_b)}
    device = next(iter(fa.values())).device
    factor = torch.ones(len(points_a), len(points_b), 2, dtype=torch.float64)  # ‖·‖² factors of a and b
    plans, explicit = [], []
    need_a = {g: {g} for g in ga}
    need_b = {g: {g} for g in gb}
    for grid_a, pa in ga.items():
        for grid_b, pb in gb.items():
            target = (max(grid_a[0], grid_b[0]), max(grid_a[1], grid_b[1]))
            if grid_a == grid_b:
                to = grid_a
            elif target == grid_b and _uniform_upsampling(grid_a, target):
                to = grid_a
            elif target == grid_a and _uniform_upsampling(grid_b, target):
                to = grid_b
            else:
                explicit += [(a, b) for a in pa for b in pb]
                continue
            plans.append((grid_a, grid_b, to))
            need_a[grid_a].add(to)
            need_b[grid_b].add(to)
            ra = (target[0] // grid_a[0]) * (target[1] // grid_a[1])  # matched positions per native position
            rb = (target[0] // grid_b[0]) * (target[1] // grid_b[1])
            for a in pa:
                for b in pb:
                    factor[index_a[a], index_b[b]] = torch.tensor([ra, rb], dtype=torch.float64)

    n = next(iter(fa.values())).shape[0]
    per_input = sum(fa[p][0].numel() for ps in ga.values() for p in ps)
    per_input += 0 if shared else sum(fb[p][0].numel() for ps in gb.values() for p in ps)
    chunk = max(1, budget // max(1, per_input))
    cross = torch.zeros(ca, cb, dtype=torch.float64, device=device)
    sq_a = torch.zeros(ca, dtype=torch.float64, device=device)
    sq_b = sq_a if shared else torch.zeros(cb, dtype=torch.float64, device=device)

    def stacks_of(feats, groups, need, sq, slices, rows) -> dict[tuple, Tensor]:
        out = {}
        for grid, members in groups.items():
            s = _native_stack(feats, members, rows)
            sq[slices[grid]] += torch.linalg.vector_norm(s.view(*s.shape[:2], -1), dim=2).square_().sum(0)
            out[(grid, grid)] = s
            done = [s]
            for to in sorted(need[grid] - {grid}, key=lambda g: -g[0] * g[1]):
                src = min((t for t in done if t.shape[2] % to[0] == 0 and t.shape[3] % to[1] == 0),
                          key=lambda t: t.shape[2] * t.shape[3])
                out[(grid, to)] = _sum_pool(src, to)
                done.append(out[(grid, to)])
        return out

    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        sa = stacks_of(fa, ga, need_a, sq_a, groups_a, rows)
        sb = sa if shared else stacks_of(fb, gb, need_b, sq_b, groups_b, rows)
        flat: dict[tuple, Tensor] = {}

        def channels_first(side: str, grid: tuple[int, int], to: tuple[int, int]) -> Tensor:
            if (side, grid, to) not in flat:
                stack = (sa if side == "a" else sb)[(grid, to)]
                flat[(side, grid, to)] = stack.transpose(0, 1).reshape(stack.shape[1], -1)
            return flat[(side, grid, to)]

        for grid_a, grid_b, to in plans:
            x, y = sa[(grid_a, to)], sb[(grid_b, to)]
            r, c1, c2, p = x.shape[0], x.shape[1], y.shape[1], to[0] * to[1]
            block = cross[groups_a[grid_a], groups_b[grid_b]]
            if c1 * c2 <= (c1 + c2) * p:  # one small GEMM per input, X_i Y_iᵀ, summed
                block += torch.bmm(x.view(r, c1, p), y.view(r, c2, p).transpose(1, 2)).sum(0)
            else:  # a product per input larger than its inputs: one GEMM over the inputs, channels first
                block.addmm_(channels_first("a", grid_a, to), channels_first("a" if shared else "b", grid_b, to).T)
        del sa, sb, flat

    rows_a = torch.empty(ca, dtype=torch.long)
    for p, s in slices_a.items():
        rows_a[s] = index_a[p]
    cols_b = torch.empty(cb, dtype=torch.long)
    for p, s in slices_b.items():
        cols_b[s] = index_b[p]
    factor = factor.to(device)
    sq_x = sq_a[:, None] * factor[rows_a.to(device), :, 0]  # (ΣC_a, |points_b|)
    sq_y = factor[:, cols_b.to(device), 1] * sq_b[None, :]  # (|points_a|, ΣC_b)
    for a, b in explicit:
        m = _procrustes_update(fa[a], fb[b])
        cross[slices_a[a], slices_b[b]] = m.cross
        sq_x[slices_a[a], index_b[b]] = m.sq_x
        sq_y[index_a[a], slices_b[b]] = m.sq_y
    return cross, sq_x, sq_y, slices_a, slices_b


def _all_moments(fa: dict[str, Tensor], fb: dict[str, Tensor], points_a: list[str], points_b: list[str],
                 budget: int = 1 << 22) -> dict[tuple[str, str], _Moments]:
    """Procrustes moments of every pair (a, b) for one batch (:func:`_moment_blocks`), pair by pair."""
    cross, sq_x, sq_y, sa, sb = _moment_blocks(fa, fb, points_a, points_b, budget)
    ia = {p: i for i, p in enumerate(points_a)}
    ib = {p: j for j, p in enumerate(points_b)}
    return {(a, b): _Moments(cross[sa[a], sb[b]], sq_x[sa[a], ib[b]], sq_y[ia[a], sb[b]])
            for a in points_a for b in points_b}


class _PairCKA(_Sums):
    """Minibatch CKA of every pair of feature points (the engine of :func:`similarity_matrix`): float64 sums over
    the minibatches of HSIC1(K_a, L_b), HSIC1(K_a, K_a) and HSIC1(L_b, L_b) as |points_a| × |points_b| matrices
    (the self terms per pair: a kernel depends on the pair it is matched for) and the number of minibatches, all
    summed under DDP: the states of a minibatch :class:`~symstitch.metrics.cka.CKA` for every pair. ``update``
    takes the three matrices of one minibatch (from :func:`_cka_update`); ``compute`` gives
    ``{(a, b): (value, error)}`` (:func:`_cka_compute`) with the value NaN and the reason when CKA is undefined
    for that pair."""

    def __init__(self, kernel: str, estimator: str, points_a: list[str], points_b: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.kernel, self.estimator = kernel, estimator
        self.points_a, self.points_b = list(points_a), list(points_b)
        self._add_sums("hsic_xy", "hsic_xx", "hsic_yy", shape=(len(self.points_a), len(self.points_b)))
        self._add_sums("batches")

    def update(self, hxy: Tensor, hxx: Tensor, hyy: Tensor) -> None:
        self._accumulate(hsic_xy=hxy, hsic_xx=hxx, hsic_yy=hyy, batches=1)

    def compute(self) -> dict[tuple[str, str], tuple[float, Optional[str]]]:
        k = float(self.batches)
        hxy, hxx, hyy = (t.cpu() for t in (self.hsic_xy, self.hsic_xx, self.hsic_yy))
        out = {}
        for i, a in enumerate(self.points_a):
            for j, b in enumerate(self.points_b):
                try:
                    out[(a, b)] = (float(_cka_compute(hxy[i, j], hxx[i, j], hyy[i, j], k)), None)
                except ValueError as err:
                    out[(a, b)] = (math.nan, f"{type(err).__name__}: {err}")
        return out


class _PairMoments(_Sums):
    """Procrustes moments of every pair of feature points (the engine of :func:`similarity_matrix`; both groups
    share them): float64 states ``cross`` (ΣC_a × ΣC_b, a block per pair), ``sq_x`` (ΣC_a × |points_b|) and
    ``sq_y`` (|points_a| × ΣC_b) as built by :func:`_moment_blocks`, summed under DDP. ``compute`` gives
    ``{(group, a, b): (value, error)}`` (:func:`_procrustes_compute` of each pair's moments)."""

    def __init__(self, groups: list[str], points_a: list[str], points_b: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.groups, self.points_a, self.points_b = list(groups), list(points_a), list(points_b)
        self.slices_a: dict[str, slice] = {}
        self.slices_b: dict[str, slice] = {}
        self._add_sums("cross", "sq_x", "sq_y")

    def update(self, cross: Tensor, sq_x: Tensor, sq_y: Tensor, slices_a: dict[str, slice],
               slices_b: dict[str, slice]) -> None:
        if self.cross.dim() == 2 and (self.cross.shape != cross.shape or self.slices_a != slices_a
                                      or self.slices_b != slices_b):
            raise ValueError(f"feature shapes changed between batches: {tuple(self.cross.shape)} channels before, "
                             f"{tuple(cross.shape)} now")
        self.slices_a, self.slices_b = slices_a, slices_b
        self._accumulate(cross=cross, sq_x=sq_x, sq_y=sq_y)

    def compute(self) -> dict[tuple[str, str, str], tuple[float, Optional[str]]]:
        out = {}
        for i, a in enumerate(self.points_a):
            for j, b in enumerate(self.points_b):
                sa, sb = self.slices_a[a], self.slices_b[b]
                m = _Moments(self.cross[sa, sb], self.sq_x[sa, j], self.sq_y[i, sb])
                for group in self.groups:
                    try:
                        out[(group, a, b)] = (float(_procrustes_compute(m, group)), None)
                    except ValueError as err:
                        out[(group, a, b)] = (math.nan, f"{type(err).__name__}: {err}")
        return out


class _Variation:
    """Which feature points gave bitwise the same features for every input so far (their first input's features
    are kept until another input differs: usually at once), and how many inputs there were: a pair with such a
    point, or fewer than MIN_INPUTS inputs, is undefined for every metric."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, str], Tensor] = {}
        self.varies: set[tuple[str, str]] = set()
        self.n = 0

    def update(self, feats: dict[str, dict[str, Tensor]], n: int) -> None:
        self.n += n
        for side, points in feats.items():
            for p, t in points.items():
                key = (side, p)
                if key in self.varies:
                    continue
                ref = self.first.setdefault(key, t[:1].clone())
                if not _identical_inputs(torch.cat([ref, t])):
                    self.varies.add(key)
                    del self.first[key]

    def reason(self, a: str, b: str, same: bool) -> Optional[str]:
        """Why the pair (a of model_a, b of model_b) is undefined, or None."""
        if self.n < MIN_INPUTS:
            return (f"ValueError: every metric needs at least {MIN_INPUTS} inputs; the dataloader gave "
                    f"{self.n}")
        for side, p in (("a", a), ("b", b)):
            if (side, p) in self.first:
                kind = "all zero" if not bool(self.first[side, p].any()) else "the same for every input"
                return (f"ValueError: the features of {p} of model_{'a' if same else side} are {kind} (a "
                        "representation that does not change with the input says nothing about it)")
        return None


def _progress(enabled: bool):
    """A progress bar redrawn when it advances, never by a refresh thread (on a 2-core machine a thread waking ten
    times a second takes its share from torch's compute threads)."""
    if not enabled:
        return None
    return _ManualProgress(transient=True, auto_refresh=False)


class _ManualProgress(Progress):
    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self.refresh()


class FeatureRecorder:
    """Forward hooks on the feature-point modules of both models (a context manager): ``run(x)`` gives the
    features of one batch as ``{"a": {point: (n, C, H, W)}, "b": {…}}`` (a network with a point that no module
    outputs, ``point_module(point)`` None — a graph node of a traced network — gives its points' features from a
    pass of its own, :meth:`~symstitch.network.PointNetwork.features`)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, points_a: list[str], points_b: list[str]):
        self.model_a, self.model_b = model_a, model_b
        self.same = model_a is model_b
        self.wanted = [("a", p) for p in dict.fromkeys(points_a)] + [("b", p) for p in dict.fromkeys(points_b)]
        self.captured: dict[tuple[str, str], tuple[Tensor, int]] = {}
        self.handles: list[Any] = []
        self.copy = False  # copy the features in the hooks (once an in-place operation has been seen)

    def side_of(self, side: str) -> str:
        """The model whose hooks record ``side`` (both are "a" when the two models are one)."""
        return "a" if self.same else side

    def __enter__(self) -> "FeatureRecorder":
        for side, p in dict.fromkeys((self.side_of(s), p) for s, p in self.wanted):
            model = self.model_a if side == "a" else self.model_b
            module = model.point_module(p)
            if module is None:
                continue  # its features come from the network's own pass (run)

            def hook(_module, _inputs, out, key=(side, p)):
                out = out.detach()
                self.captured[key] = (out.clone() if self.copy else out, out._version)

            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def run(self, x: Tensor) -> dict[str, dict[str, Tensor]]:
        """The features are the modules' outputs themselves, not copies, unless the forward pass changed one of
        them in place after its hook (seen from the tensor's version counter): then this batch is run again and
        every later one too with copies taken in the hooks. Finiteness is checked later, from sums that the
        metrics compute anyway."""
        self.captured.clear()
        for side, model in (("a", self.model_a), ("b", self.model_b))[: 1 if self.same else 2]:
            points = [p for s, p in self.wanted if self.side_of(s) == side]
            if any(model.point_module(p) is None for p in points):  # any point of a graph: one pass of its own
                for p, t in model.features(x, points).items():  # (its features are copies)
                    self.captured[(side, p)] = (t, t._version)
            else:
                model(x)
        if not self.copy and any(t._version != v for t, v in self.captured.values()):
            self.copy = True
            return self.run(x)
        feats: dict[str, dict[str, Tensor]] = {"a": {}, "b": {}}
        for side, p in self.wanted:
            out = self.captured.get((self.side_of(side), p))
            if out is None:
                raise RuntimeError(f"feature point {p!r} of model_{side} was not reached in the forward pass")
            feats[side][p] = _to_4d(out[0], p)
        self.captured.clear()
        return feats


def _cka_batch(obj: _PairCKA, name: str, fa: _Features, fb: _Features,
               errors: dict[tuple[str, str, str], str]) -> None:
    """One minibatch into the CKA engine of metric ``name``: every kernel a pair needs is built once (per point
    and matched variant) and the HSIC1 terms of all pairs come from one :func:`_cka_update`. A pair that fails is
    recorded in ``errors`` (its entries then hold NaN and are not read)."""
    shared = fa is fb
    index_a: dict[tuple, int] = {}
    index_b = index_a if shared else {}
    grams_a: list[_Gram] = []
    grams_b = grams_a if shared else []
    where = torch.full((len(obj.points_a), len(obj.points_b), 2), -1, dtype=torch.long)
    for i, a in enumerate(obj.points_a):
        for j, b in enumerate(obj.points_b):
            if (name, a, b) in errors:
                continue
            try:
                hw = (max(fa.hw(a)[0], fb.hw(b)[0]), max(fa.hw(a)[1], fb.hw(b)[1]))
                c = max(fa.channels(a), fb.channels(b))
                for k, (feats, point, index, grams) in enumerate(((fa, a, index_a, grams_a),
                                                                  (fb, b, index_b, grams_b))):
                    key = feats.key(point, obj.kernel, obj.estimator, hw, c)
                    if key not in index:
                        grams.append(feats.gram(point, obj.kernel, obj.estimator, hw, c))
                        index[key] = len(grams) - 1
                    where[i, j, k] = index[key]
            except ValueError as err:
                errors[(name, a, b)] = f"{type(err).__name__}: {err}"
    shape = (len(obj.points_a), len(obj.points_b))
    if not grams_a or not grams_b:
        nan = torch.full(shape, math.nan, dtype=torch.float64)
        obj.update(nan, nan, nan)
        return
    hab, haa, hbb = _cka_update(grams_a, grams_b)
    ia, ib = where[..., 0].to(hab.device), where[..., 1].to(hab.device)
    ok = (ia >= 0) & (ib >= 0)
    ia, ib = ia.clamp(min=0), ib.clamp(min=0)
    nan = torch.tensor(math.nan, dtype=torch.float64, device=hab.device)
    obj.update(torch.where(ok, hab[ia, ib], nan), torch.where(ok, haa[ia], nan), torch.where(ok, hbb[ib], nan))


def _update_pairs(engines: dict[str, Metric], errors: dict[tuple[str, str, str], str],
                  feats: dict[str, dict[str, Tensor]], points_a: list[str], points_b: list[str], block_size: int,
                  same: bool) -> None:
    """One batch into every engine: each kernel is built once per point (and matched variant) and shared by all
    pairs and both sides when the two models are one; the Procrustes moments of all pairs come from a few
    stacked GEMMs. A pair that fails is recorded with its reason in ``errors``. NaN/Inf features are found in
    sums computed anyway (the centring sums of CKA, the squared norms of Procrustes); the elementwise check
    runs only when such a sum is not finite."""
    if same:
        fa = fb = _Features({**feats["a"], **feats["b"]}, block_size)
    else:
        fa, fb = _Features(feats["a"], block_size, side="a"), _Features(feats["b"], block_size, side="b")
    for name, engine in engines.items():
        if isinstance(engine, _PairCKA):
            _cka_batch(engine, name, fa, fb, errors)
    moments = next((e for e in engines.values() if isinstance(e, _PairMoments)), None)
    if moments is None:
        return
    cross, sq_x, sq_y, sa, sb = _moment_blocks(feats["a"], feats["b"], moments.points_a, moments.points_b)
    for side, points, slices, finite in (("a", moments.points_a, sa, torch.isfinite(sq_x).all(1)),
                                         ("b", moments.points_b, sb, torch.isfinite(sq_y).all(0))):
        for p in points:
            if bool(finite[slices[p]].all()) or _is_finite(feats[side][p]):
                continue
            reason = f"ValueError: {p} of model_{'a' if same else side} contains NaN or Inf values"
            for a in [p] if side == "a" else moments.points_a:
                for b in [p] if side == "b" else moments.points_b:
                    for group in moments.groups:
                        errors.setdefault((f"procrustes_{group}", a, b), reason)
    moments.update(cross, sq_x, sq_y, sa, sb)


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
    block_size: int = BLOCK_ROWS,
    normalize: Optional[Any] = None,
) -> list[dict[str, Any]]:
    """Every metric for every pair (point_a of ``model_a``, point_b of ``model_b``) of feature points.

    ``model_a``, ``model_b``: networks of the zoo, or any ``nn.Module`` (wrapped in a
    :class:`~symstitch.graph.GraphNet`: its feature points are its activations, and any of its points — a graph
    node or module name — may be asked for). One pass of the data through each model (eval mode, no_grad; modes
    and devices restored afterwards). Batches are tensors, (x, y) tuples or dicts with ``image``; float
    batches are the inputs, uint8 batches are normalised by ``normalize`` (a
    :class:`~symstitch.inputs.Normalization`, a callable or a (mean, std) pair), by default by their dataset's
    own ``normalization`` (the :class:`~symstitch.data.DataModule`'s loaders carry it); a DataModule itself
    stands for its test loader (the paper's setting: the test images). ``points``: "all",
    one list for both models, or a pair ``(list_a, list_b)``. ``cka_mode``: "minibatch" (every batch of the
    dataloader is a minibatch; memory independent of n) or "exact" (keeps every feature on the CPU, then
    builds n×n kernels, holding those of model_b while the points of model_a are done one at a time).
    Procrustes is always streamed.

    Returns rows ``{"point_a", "point_b", "metric", "value", "error", "group_a", "group_b"}``: ``value`` a float,
    NaN for a pair that could not be computed (fewer than 4 inputs, features the same for every input, NaN/Inf
    features, a vanishing kernel; as the functional metrics refuse) with the reason in ``error`` (None
    otherwise); ``group_a``/``group_b`` the intertwiner group kind at each point (from the activation there,
    None where none is known; :data:`GROUP_METRICS` says which metrics it leaves invariant).
    """
    if not hasattr(dataloader, "__iter__") and callable(getattr(dataloader, "test_dataloader", None)):
        dataloader = dataloader.test_dataloader()  # a DataModule: its test split (the paper's setting)
    same = model_a is model_b
    model_a = as_network(model_a)
    model_b = model_a if same else as_network(model_b)
    for name in metrics:
        METRICS.get(name)
    if cka_mode not in MODES:
        raise ValueError(f"unknown cka_mode {cka_mode!r}; choose from {', '.join(MODES)}")
    points_a, points_b = _resolve_points(model_a, model_b, points)
    normalizer = loader_normalization(dataloader, normalize)
    cka_names = [name for name in metrics if name.startswith("cka")]
    if cka_mode == "minibatch" and cka_names:
        _check_loader_tail(dataloader)
    models = [model_a] if model_a is model_b else [model_a, model_b]
    dev = torch.device(device) if device is not None else _device_of(model_a)
    saved = [(m.training, _device_of(m)) for m in models]

    pairs = [(a, b) for a in points_a for b in points_b]
    unique_a, unique_b = list(dict.fromkeys(points_a)), list(dict.fromkeys(points_b))
    # one engine per CKA metric and one for both Procrustes metrics (torchmetrics objects, states summed under DDP)
    engines: dict[str, Metric] = {}
    for name in cka_names if cka_mode == "minibatch" else []:
        probe = METRICS.build(name, mode="minibatch")
        engines[name] = _PairCKA(probe.kernel, probe.estimator, unique_a, unique_b)
    groups = [METRICS.build(name).group for name in metrics if name not in cka_names]
    if groups:
        engines["procrustes"] = _PairMoments(groups, unique_a, unique_b)
    errors: dict[tuple[str, str, str], str] = {}
    stored: dict[tuple[str, str], list[Tensor]] = {}
    exact: dict[tuple[str, str, str], Tensor] = {}

    variation = _Variation()
    bar = _progress(progress)
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("features", total=len(dataloader) if hasattr(dataloader, "__len__") else None)
        for m in models:
            m.eval().to(dev)
        seen = 0
        with FeatureRecorder(model_a, model_b, points_a, points_b) as recorder:
            for batch in dataloader:
                x = batch_images(batch, normalizer).to(dev)
                feats = recorder.run(x)
                variation.update(feats, x.shape[0])
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
                _update_pairs(engines, errors, feats, unique_a, unique_b, block_size, model_a is model_b)
                del feats  # not held through the next forward pass
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

    groups = ({p: point_group(model_a, p) for p in points_a}, {p: point_group(model_b, p) for p in points_b})
    computed: dict[tuple[str, str, str], tuple[float, Optional[str]]] = {}
    for name, engine in engines.items():
        if isinstance(engine, _PairCKA):
            computed.update({(name, a, b): v for (a, b), v in engine.compute().items()})
        else:
            computed.update({(f"procrustes_{g}", a, b): v for (g, a, b), v in engine.compute().items()})
    rows = []
    for name in metrics:
        for a, b in pairs:
            key = (name, a, b)
            value, error = math.nan, variation.reason(a, b, same) or errors.get(key)
            if error is None:
                if key in exact:
                    value = float(exact[key])
                else:
                    value, error = computed[key]
                if error is None and not math.isfinite(value):
                    value, error = math.nan, "not a finite value"
            rows.append({"point_a": a, "point_b": b, "metric": name, "value": value, "error": error,
                         "group_a": groups[0][a], "group_b": groups[1][b]})
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
              for key, t in full.items() if not _is_finite(t)}
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
                    out[key] = _cka_compute(*_cka_terms(side_a.gram(a, probe.kernel, probe.estimator, hw, c),
                                                        side_b.gram(b, probe.kernel, probe.estimator, hw, c)))
                except ValueError as err:
                    errors[key] = f"{type(err).__name__}: {err}"
            if bar is not None:
                bar.advance(task)
    return out


__all__ = [
    "FeatureRecorder",
    "GROUP_METRICS",
    "point_group",
    "similarity_matrix",
]
