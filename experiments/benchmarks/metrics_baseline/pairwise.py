"""Every similarity metric for every pair of feature points of two networks in one pass over the data
(:func:`similarity_matrix`).

Kernels are built once per feature point (and matched variant) and shared by all pairs; the Procrustes moments of
all pairs come from a few stacked float64 GEMMs; exact-mode CKA keeps the features on the CPU and builds the n×n
kernels at the end. The metrics themselves are in :mod:`metrics_baseline.functional` and
:mod:`metrics_baseline.streaming`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from rich.progress import Progress
from torchmetrics import Metric

from metrics_baseline.functional import (
    MODES,
    _centre,
    _check_n,
    _cka_from_grams,
    _flat,
    _Gram,
    _kernel,
    _moments,
    _Moments,
    _to_4d,
    _uniform_upsampling,
    _upsample,
)
from metrics_baseline.streaming import CKA, METRICS, Procrustes

Tensor = torch.Tensor


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
    "similarity_matrix",
]
